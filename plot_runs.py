"""Training runs side by side: loss, held-out loss and throughput per step, from train.py's metrics.jsonl files.

    python plot_runs.py runs/longgen runs/full -o curves.png [--smooth 10]

Each argument is a run directory (its metrics.jsonl) or a metrics file; the legend uses the file's stem, or the
directory's name. Training loss is drawn raw (faint) and as a trailing mean over --smooth steps.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from errors import UserError, run_cli


def read_metrics(path: str) -> tuple[str, list[dict]]:
    """(run name, records) of one run directory or metrics file."""
    p = Path(path)
    file = p / "metrics.jsonl" if p.is_dir() else p
    if not file.is_file():
        raise UserError(f"No metrics at {file}; give a train.py out_dir or its metrics.jsonl.")
    try:
        records = [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise UserError(f"{file} is not a metrics file of train.py (line {e.lineno} is not JSON).") from None
    return (p.name if p.is_dir() else p.stem), records


def by_step(records: list[dict], key: str) -> list[dict]:
    """The records holding `key`, one per step in step order, as the run's history stands. train.py keeps one record
    per step; older files may hold a step twice, or steps that a resume from an earlier checkpoint discarded. A setup
    record marks each (re)start: records logged before it, of steps after its `resumed_at`, are dropped, and of a step
    logged twice the later record counts."""
    kept: dict[int, dict] = {}
    for r in records:
        if r.get("event") == "setup":
            kept = {step: old for step, old in kept.items() if step <= r.get("resumed_at", 0)}
        elif key in r:
            kept[r["step"]] = r
    return sorted(kept.values(), key=lambda r: r["step"])


def trailing_mean(values: list[float], n: int) -> list[float]:
    return [sum(values[max(0, i - n + 1):i + 1]) / (i + 1 - max(0, i - n + 1)) for i in range(len(values))]


def plot(runs: list[tuple[str, list[dict]]], out: str, smooth: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_eval, ax_speed) = plt.subplots(1, 3, figsize=(15, 4))
    for name, records in runs:
        steps, evals = by_step(records, "loss"), by_step(records, "eval_loss")
        x = [r["step"] for r in steps]
        line, = ax_loss.plot(x, trailing_mean([r["loss"] for r in steps], smooth), label=name)
        ax_loss.plot(x, [r["loss"] for r in steps], color=line.get_color(), alpha=0.2, linewidth=0.8)
        if evals:
            ax_eval.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label=name)
        ax_speed.plot(x, [r["tokens_per_s"] for r in steps], label=name)
    for ax, title in ((ax_loss, f"training loss (mean of {smooth} steps)"), (ax_eval, "held-out loss"),
                      (ax_speed, "tokens / s")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run directories (out_dir of train.py) or metrics.jsonl files")
    p.add_argument("-o", "--out", default="curves.png", help="the PNG to write")
    p.add_argument("--smooth", type=int, default=10, help="steps in the trailing mean of the training loss")
    args = p.parse_args(argv)
    if args.smooth < 1:
        raise UserError("--smooth must be at least 1.")
    plot([read_metrics(r) for r in args.runs], args.out, args.smooth)
    print(f"Wrote {args.out}.")


if __name__ == "__main__":
    run_cli(main)
