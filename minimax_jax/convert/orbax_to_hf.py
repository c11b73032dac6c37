"""An orbax params checkpoint (converted or trained) -> sharded official-name safetensors + a two-format config.json.

Each official tensor is read as one slice of its stacked parameter with tensorstore (no cache), laid out and cast,
and streamed into a safetensors file whose header was written first; host memory is one tensor (or, for a
checkpoint saved with whole-parameter chunks, one storage chunk). Output goes to a temporary folder renamed at the
end, so a failed export leaves nothing that looks complete.

The tensors are exactly the released checkpoint's (official names, no derived lightning buffers). config.json
carries the official keys and transformers' ``MiniMaxConfig`` keys with the same values (``ModelConfig
.to_export_dict``), so the folder loads with ``from_pretrained`` and with transformers'
``AutoModelForCausalLM.from_pretrained`` (which fuses the expert tensors on load and recomputes the derived buffers
from the config; its load report lists those buffers as missing). transformers 5.23 rotates the full head whatever
``rotary_dim`` says, so its logits match this model's only when rotary_dim == head_dim.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from typing import TextIO

import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath
from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils

from minimax_jax.checkpoint import CheckpointError, param_to_official
from minimax_jax.config import ModelConfig
from minimax_jax.convert.hf_to_orbax import ConversionReport
from minimax_jax.convert.plan import ParamPlan, conversion_plan
from minimax_jax.convert.progress import Progress
from minimax_jax.convert.safetensors_format import TensorSpec, write_folder

_log = logging.getLogger(__name__)


def _stored_arrays(params: str) -> dict[tuple[str, ...], tuple[tuple[int, ...], np.dtype]]:
    """Key path -> (shape, dtype) of every array in the params item, from orbax's metadata."""
    tree = ocp.StandardCheckpointer().metadata(params).item_metadata.tree
    out = {}

    def walk(node, prefix):
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, prefix + (str(key),))
        else:
            out[prefix] = (tuple(node.shape), np.dtype(node.dtype))

    walk(tree, ())
    return out


def check_stored(plans: list[ParamPlan], stored: dict) -> None:
    """Raises ``CheckpointError`` naming every missing, unexpected and mis-shaped parameter."""
    expected = {p.key: p.shape for p in plans}
    problems = [f"missing: {'.'.join(k)}" for k in sorted(set(expected) - set(stored))]
    problems += [f"unexpected: {'.'.join(k)}" for k in sorted(set(stored) - set(expected))]
    problems += [f"mis-shaped: {'.'.join(k)}: expected {expected[k]}, found {stored[k][0]}"
                 for k in sorted(set(expected) & set(stored)) if stored[k][0] != expected[k]]
    if problems:
        raise CheckpointError("orbax checkpoint does not match the config:\n  " + "\n  ".join(problems))


def _open(params: str, key: tuple[str, ...], use_zarr3: bool, context: ts.Context):
    info = ocp.type_handlers.ParamInfo(name=".".join(key), parent_dir=epath.Path(params), is_ocdbt_checkpoint=True,
                                       use_zarr3=use_zarr3, ts_context=context)
    spec = ts_utils.build_array_read_spec(info, use_ocdbt=True)
    return ts.open(ts.Spec(spec.json), open=True, read=True, context=context).result()


def _torch_dtype_name(dtype: np.dtype) -> str:
    """The config.json dtype name of the exported tensors (torch's spelling)."""
    return {"bfloat16": "bfloat16", "float16": "float16"}.get(np.dtype(dtype).name, "float32")


def convert_orbax_to_hf(params: str, output: str, config: ModelConfig, *, dtype: np.dtype | str | None = None,
                        max_shard_bytes: int = 5 * 10**9, overwrite: bool = False,
                        progress_stream: TextIO | None = sys.stderr) -> ConversionReport:
    """Writes ``output`` (safetensors shards + index + official config.json) from the params item ``params``.

    ``dtype``: the safetensors dtype (default: the stored dtype of each parameter).
    """
    start = time.perf_counter()
    if config.rotary_dim != config.head_dim:
        _log.warning("rotary_dim=%d < head_dim=%d: transformers 5.23 ignores rotary_dim and rotates the full head, "
                     "so transformers' logits on this export will differ from this model's", config.rotary_dim,
                     config.head_dim)
    stored = _stored_arrays(params)
    plans = conversion_plan(config, dtype or next(iter(stored.values()))[1])
    check_stored(plans, stored)
    with open(os.path.join(params, "_METADATA")) as f:
        use_zarr3 = bool(json.load(f).get("use_zarr3", False))
    if os.path.exists(output):
        if not overwrite:
            raise FileExistsError(f"{output} exists (pass overwrite=True / --overwrite to replace it)")
        shutil.rmtree(output)

    context = ts_utils.get_ts_context(use_ocdbt=True)
    stores, plan_of, specs = {}, {}, []
    for plan in plans:
        out_dtype = np.dtype(dtype) if dtype else stored[plan.key][1]
        for m in plan.mappings:
            plan_of[m.name] = (plan, m)
            specs.append(TensorSpec(m.name, out_dtype, m.official_shape))
    progress = Progress(len(specs), sum(s.nbytes for s in specs), "orbax -> hf", progress_stream)

    def produce(spec: TensorSpec) -> np.ndarray:
        plan, m = plan_of[spec.name]
        if plan.key not in stores:
            stores.clear()  # one open parameter at a time
            stores[plan.key] = _open(params, plan.key, use_zarr3, context)
        block = stores[plan.key][tuple(m.index)].read().result()
        return param_to_official(m, np.asarray(block)).astype(spec.dtype)

    tmp = f"{os.path.abspath(output)}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        write_folder(tmp, specs, produce, max_shard_bytes, on_tensor=lambda s: progress.update(1, s.nbytes))
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config.to_export_dict(_torch_dtype_name(specs[0].dtype)), f, indent=2)
        os.replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    progress.close()
    total = sum(s.nbytes for s in specs)
    return ConversionReport(output, len(specs), sum(p.nbytes for p in plans), total, (), time.perf_counter() - start)
