"""Model configuration: every field of the released MiniMax-Text-01 config, validated on construction.

Field names follow the official ``config.json`` of ``MiniMaxAI/MiniMax-Text-01`` so that reading and writing it is
a rename-free mapping. Readers accept the official format, the transformers (``MiniMaxConfig``) format, and a config
carrying both key sets (what the HF exporter writes, so that transformers and official readers each find their
keys); in the last case both readings must give the same model. Keys that would change the math but that this
implementation does not model are errors, never silently dropped.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Mapping
from typing import Any

LIGHTNING = 0
SOFTMAX = 1

# The lightning mixer's output RMSNorm uses a fixed eps, not the config's rms_norm_eps (see the spec).
LIGHTNING_NORM_EPS = 1e-6

_log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A config value that is invalid or not supported; the message names the field."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a MiniMax-01 style hybrid model (lightning + softmax attention, MoE in every layer)."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    attn_type_list: tuple[int, ...]  # per layer: 0 = lightning, 1 = softmax
    num_local_experts: int
    num_experts_per_tok: int
    intermediate_size: int  # per expert
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10_000_000.0
    rotary_dim: int | None = None  # None: head_dim // 2, as in the released model
    postnorm: bool = True
    layernorm_linear_attention_alpha: float = 1.0
    layernorm_linear_attention_beta: float = 1.0
    layernorm_full_attention_alpha: float = 1.0
    layernorm_full_attention_beta: float = 1.0
    layernorm_mlp_alpha: float = 1.0
    layernorm_mlp_beta: float = 1.0
    max_position_embeddings: int = 10_240_000
    router_aux_loss_coef: float = 0.001
    router_jitter_noise: float = 0.0
    shared_intermediate_size: int = 0
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "attn_type_list", tuple(int(t) for t in self.attn_type_list))
        if self.rotary_dim is None:
            object.__setattr__(self, "rotary_dim", self.head_dim // 2)
        self._validate()

    # ------------------------------------------------------------------ validation
    def _validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "num_local_experts", "num_experts_per_tok",
                     "intermediate_size", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be divisible by "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if self.rotary_dim % 2 or not 0 < self.rotary_dim <= self.head_dim:
            raise ConfigError(
                f"rotary_dim must be even and in (0, head_dim={self.head_dim}], got {self.rotary_dim}")
        if len(self.attn_type_list) != self.num_hidden_layers:
            raise ConfigError(
                f"attn_type_list has {len(self.attn_type_list)} entries but num_hidden_layers is "
                f"{self.num_hidden_layers}")
        if any(t not in (LIGHTNING, SOFTMAX) for t in self.attn_type_list):
            raise ConfigError(f"attn_type_list entries must be 0 (lightning) or 1 (softmax): {self.attn_type_list}")
        if self.num_experts_per_tok > self.num_local_experts:
            raise ConfigError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds num_local_experts "
                f"({self.num_local_experts})")
        if not self.postnorm:
            raise ConfigError("postnorm=false is not supported: MiniMax-Text-01 uses postnorm=true")
        if self.shared_intermediate_size:
            raise ConfigError(
                f"shared_intermediate_size={self.shared_intermediate_size}: a shared expert is not supported")
        if self.tie_word_embeddings:
            raise ConfigError("tie_word_embeddings=true is not supported: MiniMax-Text-01 has an untied lm_head")
        if self.hidden_act != "silu":
            raise ConfigError(f"hidden_act={self.hidden_act!r} is not supported: only 'silu'")
        if self.rms_norm_eps <= 0:
            raise ConfigError(f"rms_norm_eps must be positive, got {self.rms_norm_eps}")
        if self.rope_theta <= 0:
            raise ConfigError(f"rope_theta must be positive, got {self.rope_theta}")
        if self.router_jitter_noise < 0:
            raise ConfigError(f"router_jitter_noise must be >= 0, got {self.router_jitter_noise}")

    # ------------------------------------------------------------------ derived layout
    @property
    def layer_group_size(self) -> int:
        """Length of the shortest period of ``attn_type_list`` (8 for the released 7+1 pattern).

        The model scans over ``num_hidden_layers // layer_group_size`` identical groups, so compile time does not
        grow with depth. A list with no shorter period gives one group of all layers.
        """
        n = self.num_hidden_layers
        for period in range(1, n + 1):
            if n % period == 0 and self.attn_type_list == self.attn_type_list[:period] * (n // period):
                return period
        raise AssertionError("unreachable: the full list is always a period")

    @property
    def num_layer_groups(self) -> int:
        return self.num_hidden_layers // self.layer_group_size

    @property
    def group_pattern(self) -> tuple[int, ...]:
        return self.attn_type_list[: self.layer_group_size]

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ config.json readers/writers
    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> ModelConfig:
        """Build from a config.json dict: official format, transformers format, or both (detected by its keys).

        A config with both ``attn_type_list`` and ``layer_types`` is read both ways; every field must agree
        (``ConfigError`` naming the field otherwise), except that ``rotary_dim`` is only compared with
        ``rope_parameters.partial_rotary_factor`` when that key is present.
        """
        official, transformers = "attn_type_list" in raw, "layer_types" in raw
        if official and transformers:
            _reject_unknown(raw, _OFFICIAL_KEYS | _TRANSFORMERS_KEYS, "official+transformers")
            return _check_same_model(cls._from_official(raw), cls._from_transformers(raw), raw)
        if official:
            _reject_unknown(raw, _OFFICIAL_KEYS, "official")
            return cls._from_official(raw)
        if transformers:
            _reject_unknown(raw, _TRANSFORMERS_KEYS, "transformers")
            config = cls._from_transformers(raw)
            if config.rotary_dim == config.head_dim:
                _log.warning("transformers-format config: RoPE on all %d dims, as transformers computes; the "
                             "released MiniMax-Text-01 weights were trained with rotary_dim=%d", config.head_dim,
                             config.head_dim // 2)
            return config
        raise ConfigError(
            "config has neither 'attn_type_list' (official MiniMax-Text-01 format) nor 'layer_types' "
            "(transformers MiniMaxConfig format)")

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> ModelConfig:
        """Read a config.json file (or a folder holding one) in either format."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"no config.json at {path}")
        with open(path) as f:
            return cls.from_dict(json.load(f))

    def to_official_dict(self) -> dict[str, Any]:
        """The official MiniMax-Text-01 config.json contents for this configuration."""
        fields = dataclasses.asdict(self)
        fields["attn_type_list"] = list(self.attn_type_list)
        return {"architectures": ["MiniMaxText01ForCausalLM"], "model_type": "minimax_text_01", **fields}

    def to_transformers_keys(self) -> dict[str, Any]:
        """transformers' ``MiniMaxConfig`` names for the fields it spells differently (same values).

        transformers 5.23 does not read ``attn_type_list``, ``layernorm_*``, ``postnorm`` or ``rotary_dim``
        (it would silently build alternating layers with alpha = 1). ``partial_rotary_factor`` is its usual name
        for partial RoPE, but its MiniMax port ignores it and rotates the full head (a known defect).
        """
        return {
            "layer_types": [_LAYER_TYPE_NAMES[t] for t in self.attn_type_list],
            **{key: getattr(self, field) for key, field in _FACTOR_KEYS.items()},
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta,
                                "partial_rotary_factor": self.rotary_dim / self.head_dim},
        }

    def to_export_dict(self, dtype: str) -> dict[str, Any]:
        """config.json of an exported safetensors folder: the official keys plus transformers' keys.

        ``model_type``/``architectures`` are transformers' (``minimax`` / ``MiniMaxForCausalLM``): AutoConfig
        dispatches on ``model_type`` and knows no ``minimax_text_01``. ``dtype`` is written under both the official
        (``torch_dtype``) and the transformers 5 (``dtype``) name.
        """
        return {**self.to_official_dict(), **self.to_transformers_keys(), "architectures": ["MiniMaxForCausalLM"],
                "model_type": "minimax", "torch_dtype": dtype, "dtype": dtype}

    @classmethod
    def _from_official(cls, raw: Mapping[str, Any]) -> ModelConfig:
        _require(raw, _REQUIRED_KEYS + ("attn_type_list",), "official")
        kwargs = {k: raw[k] for k in _FIELD_NAMES if k in raw}
        _check_no_rope_scaling(raw)
        _check_inert(raw)
        if "head_dim" not in kwargs:
            kwargs["head_dim"] = _infer_head_dim(raw)
        if "eos_token_id" in kwargs:
            kwargs["eos_token_id"] = _first_eos(kwargs["eos_token_id"])
        return cls(**kwargs)

    @classmethod
    def _from_transformers(cls, raw: Mapping[str, Any]) -> ModelConfig:
        """The model transformers' ``MiniMaxConfig`` describes (its defaults for absent keys), ignoring other keys."""
        _require(raw, _REQUIRED_KEYS + ("layer_types",), "transformers")
        _check_inert(raw)
        kinds = {name: kind for kind, name in _LAYER_TYPE_NAMES.items()}
        try:
            attn_types = tuple(kinds[t] for t in raw["layer_types"])
        except KeyError as e:
            raise ConfigError(f"layer_types: unknown layer type {e.args[0]!r}; expected one of {list(kinds)}") from None
        rope = dict(raw.get("rope_parameters") or {})
        if "rope_theta" in raw:  # transformers < 5 wrote rope_theta at the top level
            rope.setdefault("rope_theta", raw["rope_theta"])
        if rope.get("rope_type", "default") != "default":
            raise ConfigError(f"rope_parameters.rope_type={rope['rope_type']!r} is not supported: only 'default'")
        unknown_rope = set(rope) - {"rope_type", "rope_theta", "partial_rotary_factor"}
        if unknown_rope:
            raise ConfigError(f"rope_parameters has unsupported keys {sorted(unknown_rope)}")
        _check_no_rope_scaling(raw)
        head_dim = raw.get("head_dim") or _infer_head_dim(raw)
        # transformers rotates the whole head (it has no rotary_dim); the trained model rotates half of it.
        rotary_dim = round(head_dim * rope.get("partial_rotary_factor", 1.0))
        return cls(
            vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"],
            num_hidden_layers=raw["num_hidden_layers"], num_attention_heads=raw["num_attention_heads"],
            num_key_value_heads=raw["num_key_value_heads"], head_dim=head_dim, attn_type_list=attn_types,
            num_local_experts=raw["num_local_experts"], num_experts_per_tok=raw["num_experts_per_tok"],
            intermediate_size=raw["intermediate_size"], rms_norm_eps=raw.get("rms_norm_eps", 1e-5),
            rope_theta=rope.get("rope_theta", _TRANSFORMERS_DEFAULT_THETA), rotary_dim=rotary_dim, postnorm=True,
            **{field: raw.get(key, 1.0) for key, field in _FACTOR_KEYS.items()},
            max_position_embeddings=raw.get("max_position_embeddings", 10_240_000),
            router_aux_loss_coef=raw.get("router_aux_loss_coef", 0.001),
            router_jitter_noise=raw.get("router_jitter_noise", 0.0),
            tie_word_embeddings=raw.get("tie_word_embeddings", False),
            hidden_act=raw.get("hidden_act", "silu"),
            bos_token_id=raw.get("bos_token_id"), eos_token_id=_first_eos(raw.get("eos_token_id")),
        )


_FIELD_NAMES = tuple(f.name for f in dataclasses.fields(ModelConfig))

# Keys that never change the forward math (bookkeeping, generation defaults, transformers plumbing).
_INERT_KEYS = frozenset({
    "architectures", "auto_map", "model_type", "transformers_version", "torch_dtype", "dtype", "use_cache",
    "output_router_logits", "initializer_range", "pad_token_id", "return_dict", "output_hidden_states",
    "output_attentions", "tokenizer_class", "id2label", "label2id", "problem_type", "chunk_size_feed_forward",
    "is_encoder_decoder", "add_cross_attention", "tie_encoder_decoder", "prefix", "task_specific_params",
    "sep_token_id", "decoder_start_token_id", "cross_attention_hidden_size", "finetuning_task", "_name_or_path",
    "torchscript", "use_bfloat16", "pruned_heads", "is_decoder", "attention_dropout", "sliding_window",
    "shared_moe_mode", "rope_scaling", "quantization_config", "mlp_bias", "attention_bias",
    "block_size",  # transformers' lightning block length: a kernel choice that does not change the math
})
# Inert keys whose value must still be the harmless one; anything else changes the math.
_INERT_REQUIRED = {
    "attention_dropout": (0, 0.0, None),
    "sliding_window": (None,),
    "rope_scaling": (None,),
    "quantization_config": (None,),
    "mlp_bias": (False, None),
    "attention_bias": (False, None),
}
_OFFICIAL_KEYS = frozenset(_FIELD_NAMES) | _INERT_KEYS
_TRANSFORMERS_KEYS = _INERT_KEYS | {
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "layer_types", "num_local_experts", "num_experts_per_tok", "intermediate_size", "rms_norm_eps",
    "rope_parameters", "rope_theta", "max_position_embeddings", "router_aux_loss_coef",
    "router_jitter_noise", "tie_word_embeddings", "hidden_act", "bos_token_id", "eos_token_id",
    "full_attn_alpha_factor", "full_attn_beta_factor", "linear_attn_alpha_factor", "linear_attn_beta_factor",
    "mlp_alpha_factor", "mlp_beta_factor",
}


_LAYER_TYPE_NAMES = {LIGHTNING: "linear_attention", SOFTMAX: "full_attention"}  # transformers' layer_types
# transformers' residual factor name -> official field (transformers' default for an absent one is 1).
_FACTOR_KEYS = {
    "linear_attn_alpha_factor": "layernorm_linear_attention_alpha",
    "linear_attn_beta_factor": "layernorm_linear_attention_beta",
    "full_attn_alpha_factor": "layernorm_full_attention_alpha",
    "full_attn_beta_factor": "layernorm_full_attention_beta",
    "mlp_alpha_factor": "layernorm_mlp_alpha",
    "mlp_beta_factor": "layernorm_mlp_beta",
}
# Where transformers reads a field whose official name it does not use (for error messages).
_TRANSFORMERS_NAME = {"attn_type_list": "layer_types", "rope_theta": "rope_parameters.rope_theta",
                      "rotary_dim": "rope_parameters.partial_rotary_factor",
                      **{field: key for key, field in _FACTOR_KEYS.items()}}
_TRANSFORMERS_DEFAULT_THETA = 1_000_000.0  # MiniMaxConfig.default_theta, used when no rope_theta is given

_REQUIRED_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                  "num_local_experts", "num_experts_per_tok", "intermediate_size")


def _same_value(a: Any, b: Any) -> bool:
    """Equal, with floats compared to 1e-12 relative (a few ulps of a JSON-printed value)."""
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, int | float) and isinstance(b, int | float) and math.isclose(a, b, rel_tol=1e-12)
    return a == b


def _check_same_model(official: ModelConfig, transformers: ModelConfig, raw: Mapping[str, Any]) -> ModelConfig:
    """A config carrying both key sets must describe one model whichever set is read; returns that model.

    ``rotary_dim`` is compared only when ``rope_parameters.partial_rotary_factor`` is given: transformers ignores
    partial RoPE anyway (a known defect), so a released config (rotary_dim = head_dim / 2) without it stays valid.
    """
    skip = set() if "partial_rotary_factor" in (raw.get("rope_parameters") or {}) else {"rotary_dim"}
    for name in _FIELD_NAMES:
        a, b = getattr(official, name), getattr(transformers, name)
        if name not in skip and not _same_value(a, b):
            key = _TRANSFORMERS_NAME.get(name, name)
            raise ConfigError(f"{name}: inconsistent config.json: official {name!r} means {a!r}, transformers' "
                              f"{key!r} means {b!r} (an absent key means its format's default)")
    return official


def _require(raw: Mapping[str, Any], keys: tuple[str, ...], fmt: str) -> None:
    missing = [k for k in keys if k not in raw]
    if missing:
        raise ConfigError(f"{fmt}-format config.json is missing required keys {missing}")


def _reject_unknown(raw: Mapping[str, Any], known: frozenset[str], fmt: str) -> None:
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"unknown keys in {fmt}-format config.json (they may change the math): {unknown}")


def _check_inert(raw: Mapping[str, Any]) -> None:
    for key, allowed in _INERT_REQUIRED.items():
        if key in raw and raw[key] not in allowed:
            raise ConfigError(f"{key}={raw[key]!r} is not supported (only {allowed[0]!r})")


def _check_no_rope_scaling(raw: Mapping[str, Any]) -> None:
    if raw.get("rope_scaling") is not None:
        raise ConfigError(f"rope_scaling={raw['rope_scaling']!r} is not supported")


def _infer_head_dim(raw: Mapping[str, Any]) -> int:
    hidden, heads = raw["hidden_size"], raw["num_attention_heads"]
    if hidden % heads:
        raise ConfigError(f"head_dim missing and hidden_size ({hidden}) not divisible by heads ({heads})")
    return hidden // heads


def _first_eos(eos: Any) -> int | None:
    return eos[0] if isinstance(eos, list | tuple) and eos else eos


# ---------------------------------------------------------------------- presets
def _alpha(num_layers: int) -> float:
    """The released residual factor (2 L) ** 0.25 (DeepNorm-style)."""
    return (2 * num_layers) ** 0.25


def _preset(num_layers: int, pattern: tuple[int, ...], **fields: Any) -> ModelConfig:
    alpha = _alpha(num_layers)
    return ModelConfig(
        num_hidden_layers=num_layers,
        attn_type_list=pattern * (num_layers // len(pattern)),
        layernorm_linear_attention_alpha=alpha,
        layernorm_full_attention_alpha=alpha,
        layernorm_mlp_alpha=alpha,
        **fields,
    )


_SEVEN_PLUS_ONE = (LIGHTNING,) * 7 + (SOFTMAX,)


def minimax_text_01() -> ModelConfig:
    """The released MiniMax-Text-01 (456B total, 45.9B active)."""
    return _preset(
        80, _SEVEN_PLUS_ONE, vocab_size=200_064, hidden_size=6144, num_attention_heads=64,
        num_key_value_heads=8, head_dim=128, num_local_experts=32, num_experts_per_tok=2,
        intermediate_size=9216, rope_theta=10_000_000.0, rotary_dim=64, eos_token_id=200_020,
    )


def small() -> ModelConfig:
    """About 1B parameters: the released head_dim, 7+1 layer pattern and top-2 of 32 experts; fits one H100."""
    return _preset(
        16, _SEVEN_PLUS_ONE, vocab_size=65_536, hidden_size=1024, num_attention_heads=8,
        num_key_value_heads=2, head_dim=128, num_local_experts=32, num_experts_per_tok=2,
        intermediate_size=512, rope_theta=10_000_000.0, rotary_dim=64, max_position_embeddings=1_048_576,
    )


def tiny() -> ModelConfig:
    """A few hundred thousand parameters, for CPU tests: two 3+1 layer groups."""
    return _preset(
        8, (LIGHTNING,) * 3 + (SOFTMAX,), vocab_size=512, hidden_size=64, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2, intermediate_size=32,
        rope_theta=10_000.0, rotary_dim=8, max_position_embeddings=4096,
    )


PRESETS = {"minimax_text_01": minimax_text_01, "small": small, "tiny": tiny}


def get_preset(name: str) -> ModelConfig:
    """A preset by name; the error lists the known names."""
    try:
        return PRESETS[name]()
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; known: {sorted(PRESETS)}") from None

