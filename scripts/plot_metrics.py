"""Draw the loss curve of a run (``<workdir>/metrics.jsonl``) to a PNG.

    python scripts/plot_metrics.py --workdir=runs/tiny            # writes runs/tiny/loss.png
    python scripts/plot_metrics.py --workdir=runs/tiny --output=/tmp/loss.png
"""

from __future__ import annotations

import json
from pathlib import Path

from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", "runs/tiny", "run folder holding metrics.jsonl")
_OUTPUT = flags.DEFINE_string("output", None, "PNG path (default: <workdir>/loss.png)")


def read_metrics(path: Path) -> list[dict]:
    """The JSON records of a metrics.jsonl file, in order."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_loss(records: list[dict], output: Path) -> None:
    """Loss (and aux loss on a second axis) against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r["loss"] for r in records], label="loss (cross-entropy)", color="tab:blue")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    aux = ax.twinx()
    aux.plot(steps, [r["aux_loss"] for r in records], label="router aux loss", color="tab:orange", alpha=0.6)
    aux.set_ylabel("aux loss")
    fig.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(output, dpi=120)
    plt.close(fig)


def main(argv: list[str]) -> None:
    del argv
    workdir = Path(_WORKDIR.value)
    records = read_metrics(workdir / "metrics.jsonl")
    output = Path(_OUTPUT.value) if _OUTPUT.value else workdir / "loss.png"
    plot_loss(records, output)
    print(f"{len(records)} points -> {output}")


if __name__ == "__main__":
    app.run(main)
