"""Where a step's device time goes: ranks the ops of a JAX profiler trace, and with the compiled HLO groups them by
the model's named scopes (``minimax_jax.train.profiling``).

    python3 scripts/trace_summary.py <dir holding plugins/profile/*/*.trace.json.gz> [--top=30]
        [--hlo=<file or XLA dump directory>] [--out_md=summary.md]

``--hlo``: the compiled module's text, or a directory holding ``*after_optimizations.txt`` files (an XLA
``--xla_dump_to`` dump). Default: the file the trainer saves beside its trace (``profiling.HLO_FILE``).
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from absl import app, flags

from minimax_jax.train.profiling import HLO_FILE, device_busy, device_op_times, hlo_op_names, time_by_scope

FLAGS = flags.FLAGS
flags.DEFINE_integer("top", 30, "ops to list")
flags.DEFINE_string("hlo", "", "compiled HLO text file, or an XLA dump directory, for the by-scope table")
flags.DEFINE_string("out_md", "", "also write the tables here")


def newest_trace(directory: Path) -> Path:
    traces = sorted(directory.rglob("*.trace.json.gz"), key=lambda p: p.stat().st_mtime)
    if not traces:
        raise FileNotFoundError(f"no *.trace.json.gz under {directory}")
    return traces[-1]


def read_hlo(path: Path) -> dict[str, str]:
    files = sorted(path.rglob("*after_optimizations.txt")) if path.is_dir() else [path]
    if not files:
        raise FileNotFoundError(f"no *after_optimizations.txt under {path}")
    names: dict[str, str] = {}
    for file in files:
        names.update(hlo_op_names(file.read_text()))
    return names


def op_table(times: dict[str, list[float]], top: int, op_names: dict[str, str]) -> str:
    total = sum(sum(v) for v in times.values())
    rows = sorted(times.items(), key=lambda item: -sum(item[1]))[:top]
    lines = [f"device time {total / 1e3:.2f} ms over {sum(len(v) for v in times.values())} events", "",
             "| op | total ms | share | count | mean us | source |", "|---|---:|---:|---:|---:|---|"]
    for name, durations in rows:
        source = op_names.get(name, "")[-80:]
        lines.append(f"| `{name[:60]}` | {sum(durations) / 1e3:.3f} | {sum(durations) / total:.1%} | "
                     f"{len(durations)} | {sum(durations) / len(durations):.1f} | `{source}` |")
    return "\n".join(lines)


def scope_table(times: dict[str, list[float]], op_names: dict[str, str], *, with_op: bool, top: int) -> str:
    totals = time_by_scope(times, op_names, with_op=with_op)
    grand = sum(totals.values())
    lines = [f"| scope{': op' if with_op else ''} | ms | share |", "|---|---:|---:|"]
    for label, us in sorted(totals.items(), key=lambda item: -item[1])[:top]:
        lines.append(f"| {label} | {us / 1e3:.3f} | {us / grand:.1%} |")
    return "\n".join(lines)


def main(argv) -> None:
    if len(argv) != 2:
        raise app.UsageError("usage: trace_summary.py <trace directory>")
    path = newest_trace(Path(argv[1]))
    with gzip.open(path, "rb") as f:
        trace = json.load(f)
    times = device_op_times(trace)
    busy, span = device_busy(trace)
    hlo = Path(FLAGS.hlo) if FLAGS.hlo else Path(argv[1]) / HLO_FILE
    op_names = read_hlo(hlo) if FLAGS.hlo or hlo.exists() else {}
    tables = op_table(times, FLAGS.top, op_names)
    if span:
        tables = (f"device busy {busy / 1e3:.2f} ms of a {span / 1e3:.2f} ms span ({busy / span:.1%}; the rest it "
                  f"waited on the host)\n" + tables)
    if any(name.startswith("command_buffer") for name in times):
        tables += ("\n\nOps ran inside CUDA graphs (command_buffer_*): for per-op names run with "
                   "XLA_FLAGS=--xla_gpu_enable_command_buffer= (scripts/train.py does when profiling).")
    if op_names:
        tables += "\n\n" + scope_table(times, op_names, with_op=False, top=len(times))
        tables += "\n\n" + scope_table(times, op_names, with_op=True, top=FLAGS.top)
    print(f"{path}\n{tables}")
    if FLAGS.out_md:
        Path(FLAGS.out_md).write_text(tables + "\n")


if __name__ == "__main__":
    app.run(main)
