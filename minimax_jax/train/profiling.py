"""Profiling: traces a few train steps (``TrainConfig.profile_steps``) and attributes their device time to the
model's named scopes (``scripts/trace_summary.py`` prints the tables).

Attribution: every device event of a JAX profiler trace names the HLO instruction it ran (``args.hlo_op``); the
compiled module's text (``HLO_FILE``, saved beside the trace by the trainer) gives that instruction's source
``op_name``, e.g. ``jit(train_step)/transpose(jvp(moe))/experts/dot_general``; its ``jax.named_scope`` names
(``PROFILE_SCOPES``) and whether it is a backward op (``transpose(...)``) make the group ``moe/experts bwd``.
"""

from __future__ import annotations

import collections
import os
import re
from collections.abc import Callable
from pathlib import Path

import jax

WARMUP_STEPS = 3
HLO_FILE = "train_step.after_optimizations.txt"  # in the profile directory

# jax.named_scope names set by the model and the train step, outermost first in a group's label
PROFILE_SCOPES = ("embed", "lightning_attention", "softmax_attention", "norms_residual", "moe", "router",
                  "dispatch", "experts", "combine", "loss", "grad_accumulation", "grad_norm", "optimizer")


def per_op_gpu_events() -> None:
    """Turns off XLA's CUDA graphs (command buffers) for this process, so that a GPU trace names the HLO op of
    each kernel instead of one ``command_buffer_*`` for many. Call before JAX initializes its backends.

    Kernel times are unchanged; launch gaps may grow, so measure throughput in a run without profiling.
    """
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        raise RuntimeError("per_op_gpu_events() must run before JAX initializes its backends")
    flag = "--xla_gpu_enable_command_buffer="
    if flag not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()


class StepProfiler:
    """Starts a trace before step ``WARMUP_STEPS`` of this run and stops it ``num_steps`` steps later."""

    def __init__(self, directory: Path, num_steps: int, *, enabled: bool = True):
        self.directory, self.num_steps, self.enabled = directory, num_steps, enabled and num_steps > 0
        self.active = False

    def save_hlo(self, hlo_text: Callable[[], str]) -> None:
        """Writes the compiled step's HLO (``HLO_FILE``) beside the trace, for attributing ops to scopes."""
        if self.enabled:
            self.directory.mkdir(parents=True, exist_ok=True)
            (self.directory / HLO_FILE).write_text(hlo_text())

    def before_step(self, steps_done: int) -> None:
        if self.enabled and steps_done == WARMUP_STEPS:
            self.directory.mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(str(self.directory))
            self.active = True

    def after_step(self, steps_done: int, outputs) -> None:
        if self.active and steps_done == WARMUP_STEPS + self.num_steps:
            jax.block_until_ready(outputs)
            self.stop()

    def stop(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False


def _device_pids(trace: dict) -> set:
    """Process ids of the trace's GPU/TPU devices."""
    return {event["pid"] for event in trace["traceEvents"]
            if event.get("ph") == "M" and event.get("name") == "process_name"
            and any(tag in event["args"]["name"] for tag in ("/device:GPU", "/device:TPU"))}


def device_op_times(trace: dict) -> dict[str, list[float]]:
    """Durations (us) of the ops a trace ran, by HLO instruction name (``args.hlo_op``) where the event has one.

    The events of GPU/TPU device processes; in a CPU-only trace, the XLA:CPU events that name an HLO op.
    """
    device_pids = _device_pids(trace)
    times: dict[str, list[float]] = collections.defaultdict(list)
    for event in trace["traceEvents"]:
        if event.get("ph") != "X":
            continue
        hlo_op = event.get("args", {}).get("hlo_op")
        if event.get("pid") in device_pids or (not device_pids and hlo_op):
            times[hlo_op or event["name"]].append(float(event.get("dur", 0.0)))
    if not times:
        raise ValueError("no device ops in the trace (no GPU/TPU process and no event naming an HLO op)")
    return times


def device_busy(trace: dict) -> tuple[float, float]:
    """``(busy_us, span_us)`` of the GPU/TPU processes: the union of their op intervals and first start to last
    end. ``busy / span`` below 1 means the device idled (waiting on the host: launches, syncs, input)."""
    device_pids = _device_pids(trace)
    intervals = sorted((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0.0))) for e in trace["traceEvents"]
                       if e.get("ph") == "X" and e.get("pid") in device_pids and "ts" in e)
    if not intervals:
        return 0.0, 0.0
    busy, (current_start, current_end) = 0.0, intervals[0]
    for start, end in intervals[1:]:
        if start > current_end:
            busy += current_end - current_start
            current_start, current_end = start, end
        else:
            current_end = max(current_end, end)
    busy += current_end - current_start
    return busy, max(end for _, end in intervals) - intervals[0][0]


_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_COMPUTATION = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_CALLS = re.compile(r"calls=%?([\w.\-]+)")


def hlo_op_names(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> source ``op_name`` for every instruction of a compiled module's text.

    A fusion without metadata of its own takes the op_name of the first instruction of its fused computation
    that has one (fusions are named after that computation's ops, which share a scope in practice).
    """
    own: dict[str, str] = {}
    calls: dict[str, str] = {}
    first_of_computation: dict[str, str] = {}
    computation = None
    for line in hlo_text.splitlines():
        header = _COMPUTATION.match(line)
        if header and "=" not in line.split("(")[0]:
            computation = header.group(1)
            continue
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        name, rest = match.groups()
        op_name = _OP_NAME.search(rest)
        own[name] = op_name.group(1) if op_name else ""
        if op_name and op_name.group(1) and computation is not None:
            first_of_computation.setdefault(computation, op_name.group(1))
        called = _CALLS.search(rest)
        if called:
            calls[name] = called.group(1)
    resolved = dict(own)
    for name, computation_name in calls.items():
        if not resolved[name] and computation_name in first_of_computation:
            resolved[name] = first_of_computation[computation_name]
    return resolved


def scope_of(op_name: str, scopes: tuple[str, ...] = PROFILE_SCOPES) -> str:
    """``jit(f)/transpose(jvp(moe))/experts/dot_general`` -> ``moe/experts bwd``.

    Outside every scope the label names the op instead: ``(unscoped dynamic_index_in_dim) fwd``.
    """
    if not op_name:
        return "(no op_name: inserted by XLA)"
    words = re.findall(r"[A-Za-z_]\w*", op_name)
    found = [word for word in dict.fromkeys(words) if word in scopes]
    label = "/".join(found) if found else f"(unscoped {words[-1]})"
    return label + (" bwd" if "transpose(" in op_name else " fwd")


def source_op(op_name: str) -> str:
    """The JAX-level op of an ``op_name``: ``.../moe/experts/dot_general`` -> ``dot_general``,
    ``.../jit(mha)/mha_forward/pallas_call`` -> ``mha_forward/pallas_call``."""
    parts = [part for part in op_name.split("/") if part]
    if not parts:
        return "?"
    if parts[-1] in ("pallas_call", "custom_call", "mpmd_map") and len(parts) > 1:
        return f"{parts[-2]}/{parts[-1]}"
    return parts[-1]


def time_by_scope(times: dict[str, list[float]], op_names: dict[str, str], *,
                  with_op: bool = False) -> dict[str, float]:
    """Total us per scope label (``scope_of``), or per ``label: source_op`` with ``with_op``; ops missing from
    ``op_names`` go to ``(not in the HLO)``."""
    totals: dict[str, float] = collections.defaultdict(float)
    for name, durations in times.items():
        if name not in op_names:
            label = "(not in the HLO)"
        else:
            label = scope_of(op_names[name])
            if with_op and op_names[name]:
                label += f": {source_op(op_names[name])}"
        totals[label] += sum(durations)
    return dict(totals)
