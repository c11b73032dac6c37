"""Generate golden reference data for minimax-jax from Hugging Face transformers' MiniMax port.

Run with the reference venv (Python 3.11, torch 2.13.0 CPU, transformers 5.23.0), from the repo root:

    .ref-venv/bin/python tests/golden/make_golden.py

Two variants of one tiny random model are written under ``tests/golden/<variant>/``:

``hf_full_rope``
    transformers exactly as it is: RoPE over the full head (rotary_dim = head_dim) and transformers' own
    slope formula (``/(L - 1 + 1e-5)``). Sharded checkpoint written by ``save_pretrained`` (several
    ``model-XXXXX-of-XXXXX.safetensors`` plus ``model.safetensors.index.json``), transformers-format config.json.
    The four derived lightning buffers (slope_rate, query_decay, key_decay, diagonal_decay) are kept, so a
    loader must ignore them.

``official_partial_rope``
    The released MiniMax-Text-01 semantics: RoPE (rotate-half) on the first head_dim / 2 dims only, and the
    official decay ``s_{h,l} = 2 ** (-8 (h + 1) / H) * (1 - l / (L - 1) + 1e-5)``. Both are monkeypatched into
    transformers here (and only here). One ``model.safetensors`` without the derived buffers, and a config.json
    rewritten in the official ``MiniMaxText01ForCausalLM`` format.

Per variant: the checkpoint, ``config.json``, ``input_ids.npy`` (int32 [batch, seq]), ``logits.npy`` (float32
[batch, seq, vocab], computed in float32 by transformers) and ``generate_ids.npy`` (int32 [batch, seq + new]:
prompt followed by the greedy continuation of ``model.generate(do_sample=False, max_new_tokens=8)``).

Weights are stored in bfloat16 (as the released checkpoint is) to keep the committed data small; every parameter
is rounded to a bfloat16 value before the float32 reference is computed, so upcasting the stored tensors to
float32 reproduces exactly the weights the logits were computed with.

The script also runs an independent float64 re-implementation of the spec's math (``spec_forward``, written from
/work/shared/spec/minimax_text_01.md, not from transformers) against transformers, checks that the saved
checkpoints reproduce the saved logits, and prints sensitivity numbers showing that wrong details (full vs partial
RoPE, decay scale, lightning norm grouping, ...) move the logits by far more than a test tolerance of ~1e-4.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
import transformers
from transformers import MiniMaxConfig, MiniMaxForCausalLM
from transformers.models.minimax import modeling_minimax as mm

OUT_DIR = Path(__file__).resolve().parent

SEED = 1234
BATCH, SEQ, NEW_TOKENS = 2, 37, 8

VOCAB, HIDDEN, INTER = 256, 64, 32
NUM_LAYERS, HEADS, KV_HEADS, HEAD_DIM = 8, 4, 2, 16
EXPERTS, TOP_K, BLOCK = 4, 2, 8
ATTN_TYPE_LIST = [0, 0, 0, 1] * 2  # 0 lightning, 1 softmax; the last layer is softmax
ALPHA = (2 * NUM_LAYERS) ** 0.25
BETA = 1.0
ROPE_THETA = 1e4
RMS_EPS = 1e-5
LIGHTNING_NORM_EPS = 1e-6  # transformers' MiniMaxRMSNorm default, used by the lightning output norm
MAX_POS = 4096
PARTIAL_ROTARY_DIM = HEAD_DIM // 2

SHARD_SIZE = "200KB"  # small enough that the hf_full_rope checkpoint is split into several files
DERIVED_BUFFERS = ("slope_rate", "query_decay", "key_decay", "diagonal_decay")


# ----------------------------------------------------------------------------------------------------------------
# Slopes
# ----------------------------------------------------------------------------------------------------------------


def official_slopes(layer_idx: int, num_heads: int = HEADS, num_layers: int = NUM_LAYERS) -> torch.Tensor:
    """Official decay rate per head, [H] float32 (power-of-two H)."""
    h = torch.arange(num_heads, dtype=torch.float64)
    s = 2.0 ** (-8.0 * (h + 1) / num_heads) * (1 - layer_idx / (num_layers - 1) + 1e-5)
    return s.to(torch.float32)


def hf_slopes(layer_idx: int, num_heads: int = HEADS, num_layers: int = NUM_LAYERS) -> torch.Tensor:
    """transformers 5.23's formula, reproduced (float32, like its ``get_slope_rate``)."""
    base = 1 / (2 ** (8 / num_heads))
    exponent = torch.arange(num_heads) + 1
    factor = 1 - layer_idx / (num_layers - 1 + 1e-5) + 1e-5
    return (base**exponent) * factor


# ----------------------------------------------------------------------------------------------------------------
# Monkeypatches (active only inside ``semantics``)
# ----------------------------------------------------------------------------------------------------------------


def _partial_apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    """Rotate-half RoPE on the first ``cos.shape[-1]`` dims of q and k; the remaining dims pass through."""
    rd = cos.shape[-1]
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)

    def rot(x: torch.Tensor) -> torch.Tensor:
        xr, xp = x[..., :rd], x[..., rd:]
        return torch.cat([xr * cos + mm.rotate_half(xr) * sin, xp], dim=-1)

    return rot(q), rot(k)


def _make_rope_init(rotary_dim: int) -> Callable:
    def compute_default_rope_parameters(config, *args, **kwargs):
        base = config.rope_parameters["rope_theta"]
        inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float) / rotary_dim))
        return inv_freq, 1.0

    return staticmethod(compute_default_rope_parameters)


def _make_slope_fn(slope_fn: Callable[[int], torch.Tensor], scale: float) -> Callable:
    def get_slope_rate(self, device=None):
        return (slope_fn(self.layer_idx) * scale)[:, None, None].to(device=device)

    return get_slope_rate


@contextlib.contextmanager
def semantics(rotary_dim: int | None = None, slope_fn=None, decay_scale: float = 1.0) -> Iterator[None]:
    """Patch transformers' MiniMax to partial RoPE and/or another slope formula.

    Must be active both when the model is BUILT (inv_freq and the decay buffers are computed in ``__init__`` and
    again in ``_init_weights``) and when it RUNS (``apply_rotary_pos_emb`` is looked up at call time).
    ``rotary_dim=None`` and ``slope_fn=None`` leave transformers untouched.
    """
    saved = (
        mm.apply_rotary_pos_emb,
        mm.MiniMaxRotaryEmbedding.__dict__["compute_default_rope_parameters"],
        mm.MiniMaxLightningAttention.get_slope_rate,
    )
    try:
        if rotary_dim is not None:
            mm.apply_rotary_pos_emb = _partial_apply_rotary_pos_emb
            mm.MiniMaxRotaryEmbedding.compute_default_rope_parameters = _make_rope_init(rotary_dim)
        if slope_fn is not None or decay_scale != 1.0:
            fn = slope_fn if slope_fn is not None else hf_slopes
            mm.MiniMaxLightningAttention.get_slope_rate = _make_slope_fn(fn, decay_scale)
        yield
    finally:
        mm.apply_rotary_pos_emb = saved[0]
        mm.MiniMaxRotaryEmbedding.compute_default_rope_parameters = saved[1]
        mm.MiniMaxLightningAttention.get_slope_rate = saved[2]


# ----------------------------------------------------------------------------------------------------------------
# Model construction
# ----------------------------------------------------------------------------------------------------------------


def make_config() -> MiniMaxConfig:
    return MiniMaxConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTER,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        num_local_experts=EXPERTS,
        num_experts_per_tok=TOP_K,
        layer_types=["linear_attention" if t == 0 else "full_attention" for t in ATTN_TYPE_LIST],
        block_size=BLOCK,
        full_attn_alpha_factor=ALPHA,
        full_attn_beta_factor=BETA,
        linear_attn_alpha_factor=ALPHA,
        linear_attn_beta_factor=BETA,
        mlp_alpha_factor=ALPHA,
        mlp_beta_factor=BETA,
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
        rms_norm_eps=RMS_EPS,
        max_position_embeddings=MAX_POS,
        tie_word_embeddings=False,
        # No eos/bos: generate() must run exactly NEW_TOKENS steps for both rows.
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        attn_implementation="eager",
    )


def _bf16_round(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16).to(torch.float32)


def random_parameters(model: MiniMaxForCausalLM, seed: int) -> dict[str, torch.Tensor]:
    """Large-ish random weights (bf16-exact values) so that every detail of the math shows in the logits.

    Linear maps use std gain / sqrt(fan_in); norm weights are uniform in [0.6, 1.4].
    """
    g = torch.Generator().manual_seed(seed)
    gains = {
        "qkv_proj": 1.0,
        "output_gate": 1.0,
        "out_proj": 1.0,
        "q_proj": 1.5,
        "k_proj": 1.5,
        "v_proj": 1.0,
        "o_proj": 1.0,
        "mlp.gate": 2.0,  # decisive routing: large gaps between the 2nd and 3rd expert probabilities
        "lm_head": 2.0,
    }
    params = {}
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            t = 0.6 + 0.8 * torch.rand(p.shape, generator=g)
        elif name == "model.embed_tokens.weight":
            t = torch.randn(p.shape, generator=g)
        elif name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj"):
            t = torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1])
        else:
            gain = next((v for k, v in gains.items() if k in name), None)
            assert gain is not None and p.ndim == 2, name
            t = gain * torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1])
        params[name] = _bf16_round(t)
    return params


def build(params: dict[str, torch.Tensor], **sem) -> MiniMaxForCausalLM:
    """Build a float32 eval model under ``semantics(**sem)`` and load ``params`` (parameters only)."""
    with semantics(**sem):
        torch.manual_seed(0)
        model = MiniMaxForCausalLM(make_config()).eval()
    missing, unexpected = model.load_state_dict(params, strict=False)
    assert not unexpected, unexpected
    assert all(any(m.endswith(b) for b in DERIVED_BUFFERS) for m in missing), missing
    return model


@torch.no_grad()
def run_logits(model, ids: torch.Tensor, **sem) -> torch.Tensor:
    with semantics(**sem):
        return model(input_ids=ids, use_cache=False).logits.float()


# ----------------------------------------------------------------------------------------------------------------
# Independent re-implementation of the spec (float64, naive recurrence-free form)
# ----------------------------------------------------------------------------------------------------------------


def _rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


@torch.no_grad()
def spec_forward(
    params: dict[str, torch.Tensor],
    ids: torch.Tensor,
    rotary_dim: int,
    slope_fn: Callable[[int], torch.Tensor],
    *,
    decay_scale: float = 1.0,
    lightning_norm_groups: int = 1,
    lightning_qk_scale: float = 1.0,
    gate_reads_output: bool = False,
    renormalize_topk: bool = True,
) -> torch.Tensor:
    """The math of the spec (minimax_text_01.md) in float64, written from the spec, not from transformers.

    The keyword arguments switch on deliberate mistakes, for the sensitivity report.
    """
    p = {k: v.double() for k, v in params.items()}
    B, T = ids.shape
    H, D, KVH = HEADS, HEAD_DIM, KV_HEADS
    h = p["model.embed_tokens.weight"][ids]
    pos = torch.arange(T, dtype=torch.float64)
    inv = ROPE_THETA ** (-torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    ang = pos[:, None] * inv[None]
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()  # [T, rd]
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    dist = (pos[:, None] - pos[None, :]).clamp(min=0)

    def rope(x):  # x [B, T, n, D]
        xr, xp = x[..., :rotary_dim], x[..., rotary_dim:]
        x1, x2 = xr[..., : rotary_dim // 2], xr[..., rotary_dim // 2 :]
        rot = torch.cat([-x2, x1], -1)
        return torch.cat([xr * cos[:, None] + rot * sin[:, None], xp], -1)

    for layer, kind in enumerate(ATTN_TYPE_LIST):
        pre = f"model.layers.{layer}."
        xn = _rms(h, p[pre + "input_layernorm.weight"], RMS_EPS)
        if kind == 0:
            qkv = torch.nn.functional.silu(xn @ p[pre + "self_attn.qkv_proj.weight"].T).view(B, T, H, 3 * D)
            q, k, v = qkv.split(D, dim=-1)
            s = slope_fn(layer).double() * decay_scale  # [H]
            decay = torch.exp(-s[:, None, None] * dist[None]) * causal[None]  # [H, T, T]
            scores = torch.einsum("bthd,bshd->bhts", q, k) * lightning_qk_scale * decay[None]
            o = torch.einsum("bhts,bshd->bthd", scores, v)
            o = o.reshape(B, T, lightning_norm_groups, -1)
            w = p[pre + "self_attn.norm.weight"].view(lightning_norm_groups, -1)
            o = _rms(o, w, LIGHTNING_NORM_EPS).reshape(B, T, H * D)
            gate_in = o if gate_reads_output else xn
            wg = p[pre + "self_attn.output_gate.weight"]
            o = torch.sigmoid(gate_in @ wg.T) * o
            mix = o @ p[pre + "self_attn.out_proj.weight"].T
        else:
            q = rope((xn @ p[pre + "self_attn.q_proj.weight"].T).view(B, T, H, D))
            k = rope((xn @ p[pre + "self_attn.k_proj.weight"].T).view(B, T, KVH, D))
            v = (xn @ p[pre + "self_attn.v_proj.weight"].T).view(B, T, KVH, D)
            k = k.repeat_interleave(H // KVH, dim=2)
            v = v.repeat_interleave(H // KVH, dim=2)
            a = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(D)
            a = a.masked_fill(~causal, float("-inf")).softmax(-1)
            mix = torch.einsum("bhts,bshd->bthd", a, v).reshape(B, T, H * D) @ p[pre + "self_attn.o_proj.weight"].T
        h1 = ALPHA * xn + BETA * mix
        hn = _rms(h1, p[pre + "post_attention_layernorm.weight"], RMS_EPS)
        x = hn.reshape(B * T, HIDDEN)
        probs = (x @ p[pre + "mlp.gate.weight"].T).softmax(-1)
        w, e = probs.topk(TOP_K, dim=-1)
        if renormalize_topk:
            w = w / w.sum(-1, keepdim=True)
        gate_up, down = p[pre + "mlp.experts.gate_up_proj"], p[pre + "mlp.experts.down_proj"]
        y = torch.zeros_like(x)
        for j in range(TOP_K):
            w1, w3 = gate_up[e[:, j], :INTER], gate_up[e[:, j], INTER:]  # [N, I, hidden]
            act = torch.nn.functional.silu(torch.einsum("nih,nh->ni", w1, x)) * torch.einsum("nih,nh->ni", w3, x)
            y = y + w[:, j : j + 1] * torch.einsum("nhi,ni->nh", down[e[:, j]], act)
        h = ALPHA * hn + BETA * y.view(B, T, HIDDEN)
    return _rms(h, p["model.norm.weight"], RMS_EPS) @ p["lm_head.weight"].T


# ----------------------------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------------------------


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


@torch.no_grad()
def router_margin(model, ids: torch.Tensor, **sem) -> float:
    """Smallest gap between the TOP_K-th and (TOP_K+1)-th router LOGIT over all layers and tokens.

    The top-k choice flips if an implementation's router logits err by more than half this gap.
    """
    with semantics(**sem):
        out = model(input_ids=ids, use_cache=False, output_router_logits=True)
    gaps = []
    for z in out.router_logits:
        zs = z.float().sort(-1, descending=True).values
        gaps.append((zs[:, TOP_K - 1] - zs[:, TOP_K]).min())
    return float(min(gaps))


def argmax_margin(logits: torch.Tensor) -> float:
    top2 = logits.topk(2, dim=-1).values
    return float((top2[..., 0] - top2[..., 1]).min())


@torch.no_grad()
def greedy(model, ids: torch.Tensor, **sem) -> tuple[torch.Tensor, torch.Tensor]:
    """model.generate greedy continuation, checked against a cache-free greedy loop. Returns (ids, margins)."""
    with semantics(**sem):
        gen = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=NEW_TOKENS,
            pad_token_id=0,
        )
        seq, margins = ids, []
        for _ in range(NEW_TOKENS):
            last = model(input_ids=seq, use_cache=False).logits[:, -1].float()
            margins.append(argmax_margin(last))
            seq = torch.cat([seq, last.argmax(-1, keepdim=True)], dim=1)
    assert gen.shape == (BATCH, SEQ + NEW_TOKENS), gen.shape
    assert torch.equal(gen, seq), (gen, seq)
    return gen, torch.tensor(margins)


# ----------------------------------------------------------------------------------------------------------------
# Writers
# ----------------------------------------------------------------------------------------------------------------


def save_arrays(d: Path, ids: torch.Tensor, logits: torch.Tensor, gen: torch.Tensor) -> None:
    np.save(d / "input_ids.npy", ids.numpy().astype(np.int32))
    np.save(d / "logits.npy", logits.numpy().astype(np.float32))
    np.save(d / "generate_ids.npy", gen.numpy().astype(np.int32))


def save_bf16(model: MiniMaxForCausalLM, d: Path, **kwargs) -> None:
    m = copy.deepcopy(model).to(torch.bfloat16)
    m.save_pretrained(d, **kwargs)


def official_config() -> dict:
    """config.json in the released MiniMax-Text-01 (remote code) format."""
    return {
        "architectures": ["MiniMaxText01ForCausalLM"],
        "attention_dropout": 0.0,
        "attn_type_list": ATTN_TYPE_LIST,
        "bos_token_id": None,
        "eos_token_id": None,
        "head_dim": HEAD_DIM,
        "hidden_act": "silu",
        "hidden_size": HIDDEN,
        "initializer_range": 0.02,
        "intermediate_size": INTER,
        "layernorm_full_attention_alpha": ALPHA,
        "layernorm_full_attention_beta": BETA,
        "layernorm_linear_attention_alpha": ALPHA,
        "layernorm_linear_attention_beta": BETA,
        "layernorm_mlp_alpha": ALPHA,
        "layernorm_mlp_beta": BETA,
        "max_position_embeddings": MAX_POS,
        "model_type": "minimax_text_01",
        "num_attention_heads": HEADS,
        "num_experts_per_tok": TOP_K,
        "num_hidden_layers": NUM_LAYERS,
        "num_key_value_heads": KV_HEADS,
        "num_local_experts": EXPERTS,
        "output_router_logits": False,
        "postnorm": True,
        "rms_norm_eps": RMS_EPS,
        "rope_theta": ROPE_THETA,
        "rotary_dim": PARTIAL_ROTARY_DIM,
        "router_aux_loss_coef": 0.001,
        "router_jitter_noise": 0.0,
        "shared_intermediate_size": 0,
        "shared_moe_mode": "sigmoid",
        "sliding_window": None,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": VOCAB,
    }


def from_official_names(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official checkpoint names -> transformers' in-memory names (fused experts), float32; buffers dropped."""
    out, experts = {}, {}
    for k, v in tensors.items():
        if k.endswith(DERIVED_BUFFERS):
            continue
        if ".block_sparse_moe.experts." in k:
            pre, rest = k.split(".block_sparse_moe.experts.")
            e, w, _ = rest.split(".")
            experts.setdefault(pre, {})[(int(e), w)] = v.float()
        else:
            out[k.replace(".block_sparse_moe.gate.", ".mlp.gate.")] = v.float()
    for pre, ws in experts.items():
        n = 1 + max(e for e, _ in ws)
        out[pre + ".mlp.experts.gate_up_proj"] = torch.stack([torch.cat([ws[e, "w1"], ws[e, "w3"]]) for e in range(n)])
        out[pre + ".mlp.experts.down_proj"] = torch.stack([ws[e, "w2"] for e in range(n)])
    return out


def main() -> None:
    torch.set_grad_enabled(False)
    torch.use_deterministic_algorithms(True)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}")

    ids = torch.from_numpy(np.random.default_rng(SEED).integers(0, VOCAB, size=(BATCH, SEQ))).long()
    base = MiniMaxForCausalLM(make_config()).eval()
    params = random_parameters(base, SEED)

    hf_sem: dict = {}
    off_sem = {"rotary_dim": PARTIAL_ROTARY_DIM, "slope_fn": official_slopes}
    hf = build(params, **hf_sem)
    off = build(params, **off_sem)

    # --- the patches took effect -------------------------------------------------------------------------------
    print("\nslopes per lightning layer (hf buffer | official-variant buffer | official formula):")
    for layer, kind in enumerate(ATTN_TYPE_LIST):
        if kind:
            continue
        a = hf.model.layers[layer].self_attn.slope_rate.flatten()
        b = off.model.layers[layer].self_attn.slope_rate.flatten()
        assert torch.allclose(a, hf_slopes(layer), rtol=0, atol=0)
        assert torch.allclose(b, official_slopes(layer), rtol=1e-7, atol=0)
        assert torch.allclose(
            off.model.layers[layer].self_attn.query_decay[:, :, 0], torch.exp(-b[:, None] * (torch.arange(BLOCK) + 1))
        )
        print(f"  layer {layer}: {a.tolist()} | {b.tolist()} | rel diff {float(((a - b) / b).abs().max()):.2e}")
    print("inv_freq hf:", hf.model.rotary_emb.inv_freq.tolist())
    print("inv_freq official:", off.model.rotary_emb.inv_freq.tolist())
    assert off.model.rotary_emb.inv_freq.numel() == PARTIAL_ROTARY_DIM // 2

    # --- reference logits --------------------------------------------------------------------------------------
    logits_hf = run_logits(hf, ids, **hf_sem)
    logits_off = run_logits(off, ids, **off_sem)
    for name, lg in (("hf_full_rope", logits_hf), ("official_partial_rope", logits_off)):
        print(f"{name}: max |logit| {float(lg.abs().max()):.3f}, std {float(lg.std()):.3f}")

    # cache-free forward is independent of block size / cached path: compare with spec_forward (float64)
    spec_hf = spec_forward(params, ids, HEAD_DIM, hf_slopes)
    spec_off = spec_forward(params, ids, PARTIAL_ROTARY_DIM, official_slopes)
    print("\nspec_forward (float64, independent) vs transformers (float32):")
    print(f"  hf_full_rope          max|diff| = {maxdiff(spec_hf, logits_hf):.3e}")
    print(f"  official_partial_rope max|diff| = {maxdiff(spec_off, logits_off):.3e}")
    assert maxdiff(spec_hf, logits_hf) < 1e-3 and maxdiff(spec_off, logits_off) < 1e-3

    # --- robustness: no near-ties in routing or greedy decoding ------------------------------------------------
    rm_hf, rm_off = router_margin(hf, ids, **hf_sem), router_margin(off, ids, **off_sem)
    print(f"\nmin router logit gap (top-{TOP_K} vs next): hf {rm_hf:.3e}, official {rm_off:.3e}")
    print(
        f"min top1-top2 logit gap over prompt positions: hf {argmax_margin(logits_hf):.3e}, "
        f"official {argmax_margin(logits_off):.3e}"
    )

    # --- sensitivity -------------------------------------------------------------------------------------------
    print("\nsensitivity (max |delta logits| against the official_partial_rope reference):")
    sens = {
        "(i) full RoPE instead of partial (transformers, patched)": maxdiff(
            run_logits(build(params, slope_fn=official_slopes), ids, slope_fn=official_slopes), logits_off
        ),
        "(ii) decay rate x1.1 (transformers, patched)": maxdiff(
            run_logits(
                build(params, rotary_dim=PARTIAL_ROTARY_DIM, slope_fn=official_slopes, decay_scale=1.1),
                ids,
                rotary_dim=PARTIAL_ROTARY_DIM,
                slope_fn=official_slopes,
                decay_scale=1.1,
            ),
            logits_off,
        ),
        "transformers slope formula instead of official (expected tiny)": maxdiff(
            run_logits(build(params, rotary_dim=PARTIAL_ROTARY_DIM), ids, rotary_dim=PARTIAL_ROTARY_DIM),
            logits_off,
        ),
    }
    spec_mistakes = {
        "lightning norm per head instead of over all H*D (spec_forward)": {"lightning_norm_groups": HEADS},
        "lightning q scaled by 1/sqrt(D) (spec_forward)": {"lightning_qk_scale": 1 / math.sqrt(HEAD_DIM)},
        "output gate reads the attention output, not xn (spec_forward)": {"gate_reads_output": True},
        "top-k weights not renormalized (spec_forward)": {"renormalize_topk": False},
    }
    for label, kw in spec_mistakes.items():
        sens[label] = maxdiff(spec_forward(params, ids, PARTIAL_ROTARY_DIM, official_slopes, **kw), spec_off)
    for label, v in sens.items():
        print(f"  {label}: {v:.3e}")
    assert sens["(i) full RoPE instead of partial (transformers, patched)"] > 1e-2
    assert sens["(ii) decay rate x1.1 (transformers, patched)"] > 1e-2

    # --- greedy generation -------------------------------------------------------------------------------------
    gen_hf, m_hf = greedy(hf, ids, **hf_sem)
    gen_off, m_off = greedy(off, ids, **off_sem)
    print(
        f"\ngenerate == cache-free greedy loop for both variants; min top1-top2 margin: hf {float(m_hf.min()):.3e},"
        f" official {float(m_off.min()):.3e}"
    )
    print("  hf_full_rope new tokens:", gen_hf[:, SEQ:].tolist())
    print("  official_partial_rope new tokens:", gen_off[:, SEQ:].tolist())
    print(
        f"min router logit gap over prompt + generated tokens: hf {router_margin(hf, gen_hf, **hf_sem):.3e}, "
        f"official {router_margin(off, gen_off, **off_sem):.3e}"
    )

    # transformers' cache length after a prefill (layer 0 is lightning)
    with semantics(**hf_sem):
        cache = hf(input_ids=ids, use_cache=True).past_key_values
    print(f"\nMiniMaxCache.get_seq_length() after a {SEQ}-token prefill: {cache.get_seq_length()}")

    # --- write --------------------------------------------------------------------------------------------------
    d = OUT_DIR / "hf_full_rope"
    shutil.rmtree(d, ignore_errors=True)
    save_bf16(hf, d, max_shard_size=SHARD_SIZE)
    gen_cfg = d / "generation_config.json"
    gen_cfg.unlink(missing_ok=True)
    save_arrays(d, ids, logits_hf, gen_hf)

    d = OUT_DIR / "official_partial_rope"
    shutil.rmtree(d, ignore_errors=True)
    save_bf16(off, d)
    (d / "generation_config.json").unlink(missing_ok=True)
    sd = safetensors.torch.load_file(d / "model.safetensors")
    sd = {k: v for k, v in sd.items() if not k.endswith(DERIVED_BUFFERS)}
    safetensors.torch.save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    (d / "config.json").write_text(json.dumps(official_config(), indent=2) + "\n")
    save_arrays(d, ids, logits_off, gen_off)

    # --- reload check: official names -> in-memory layout -> spec_forward reproduces logits.npy ---------------
    for name, rd, slope_fn in (
        ("hf_full_rope", HEAD_DIM, hf_slopes),
        ("official_partial_rope", PARTIAL_ROTARY_DIM, official_slopes),
    ):
        d = OUT_DIR / name
        files = sorted(d.glob("*.safetensors"))
        tensors = {}
        for f in files:
            tensors.update(safetensors.torch.load_file(f))
        n_buf = sum(k.endswith(DERIVED_BUFFERS) for k in tensors)
        loaded = from_official_names(tensors)
        assert loaded.keys() == params.keys()
        assert all(torch.equal(loaded[k], params[k]) for k in params), name
        ref = torch.from_numpy(np.load(d / "logits.npy"))
        err = maxdiff(spec_forward(loaded, torch.from_numpy(np.load(d / "input_ids.npy")).long(), rd, slope_fn), ref)
        print(
            f"{name}: {len(tensors)} tensors ({n_buf} derived buffers) in {len(files)} file(s), dtypes "
            f"{sorted({str(v.dtype) for v in tensors.values()})}; weights equal the reference parameters; "
            f"spec_forward(reloaded) vs logits.npy max|diff| {err:.2e}"
        )
        assert err < 1e-3
    print("\ndone")


if __name__ == "__main__":
    main()
