"""Ranks the device ops of a JAX profiler trace by total time: where a step's time goes.

    python3 scripts/trace_summary.py <dir holding plugins/profile/*/*.trace.json.gz> [--top=30]

Reads the newest ``*.trace.json.gz`` under the directory (written by ``jax.profiler``, e.g. by
``--config.profile_steps`` of scripts/train.py), keeps complete events of device (GPU/TPU) processes, and prints
for each op name: total ms, share of all device time, count and mean us.
"""

from __future__ import annotations

import collections
import gzip
import json
from pathlib import Path

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_integer("top", 30, "ops to list")
flags.DEFINE_string("out_md", "", "also write the table here")


def newest_trace(directory: Path) -> Path:
    traces = sorted(directory.rglob("*.trace.json.gz"), key=lambda p: p.stat().st_mtime)
    if not traces:
        raise FileNotFoundError(f"no *.trace.json.gz under {directory}")
    return traces[-1]


def device_op_times(trace: dict) -> dict[str, list[float]]:
    """Durations (us) of the complete events of device processes, by op name."""
    device_pids = {event["pid"] for event in trace["traceEvents"]
                   if event.get("ph") == "M" and event.get("name") == "process_name"
                   and any(tag in event["args"]["name"] for tag in ("/device:GPU", "/device:TPU"))}
    if not device_pids:
        names = sorted({event["args"]["name"] for event in trace["traceEvents"]
                        if event.get("ph") == "M" and event.get("name") == "process_name"})
        raise ValueError(f"no device process in the trace (processes: {names})")
    times: dict[str, list[float]] = collections.defaultdict(list)
    for event in trace["traceEvents"]:
        if event.get("ph") == "X" and event.get("pid") in device_pids:
            times[event["name"]].append(float(event.get("dur", 0.0)))
    return times


def summary(times: dict[str, list[float]], top: int) -> str:
    total = sum(sum(v) for v in times.values())
    rows = sorted(times.items(), key=lambda item: -sum(item[1]))[:top]
    lines = [f"device time {total / 1e3:.2f} ms over {sum(len(v) for v in times.values())} events", "",
             "| op | total ms | share | count | mean us |", "|---|---:|---:|---:|---:|"]
    for name, durations in rows:
        lines.append(f"| `{name[:90]}` | {sum(durations) / 1e3:.3f} | {sum(durations) / total:.1%} | "
                     f"{len(durations)} | {sum(durations) / len(durations):.1f} |")
    return "\n".join(lines)


def main(argv) -> None:
    if len(argv) != 2:
        raise app.UsageError("usage: trace_summary.py <trace directory>")
    path = newest_trace(Path(argv[1]))
    with gzip.open(path, "rb") as f:
        table = summary(device_op_times(json.load(f)), FLAGS.top)
    print(f"{path}\n{table}")
    if FLAGS.out_md:
        Path(FLAGS.out_md).write_text(table + "\n")


if __name__ == "__main__":
    app.run(main)
