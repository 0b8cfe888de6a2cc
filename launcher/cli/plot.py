"""`python -m launcher.plot RUN_DIR [--out FILE]`: train loss and eval metrics against step, as a PNG.

Made from RUN_DIR/metrics.jsonl, for everyone without wandb.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from launcher.tracking.metrics import read_records


def run_records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"launcher.plot: error: {path} does not exist: pass a run directory (run.dir)")
    return read_records(path)


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(record["step"], record[key]) for record in records if key in record]
    return [step for step, _ in points], [value for _, value in points]


def plot(run_dir: Path, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    records = run_records(run_dir)
    steps = [r for r in records if "time/epoch_s" not in r]  # every train.log_every steps
    epochs = [r for r in records if "time/epoch_s" in r]
    eval_keys = sorted({key for r in epochs for key in r if key.startswith("eval/") and key != "eval/loss"})
    fig, axes = plt.subplots(1, 1 + len(eval_keys), figsize=(6 * (1 + len(eval_keys)), 4.5), squeeze=False)
    loss_axis = axes[0][0]
    loss_axis.plot(*series(steps, "train/loss"), label="train loss (every log_every steps)", alpha=0.6)
    loss_axis.plot(*series(epochs, "train/loss"), "o-", label="train loss (epoch mean)")
    loss_axis.plot(*series(epochs, "eval/loss"), "s-", label="eval loss")
    loss_axis.set(title="loss", xlabel="step", yscale="log")
    loss_axis.legend()
    for axis, key in zip(axes[0][1:], eval_keys):
        axis.plot(*series(epochs, key), "s-", color="tab:green")
        axis.set(title=key, xlabel="step")
    fig.suptitle(str(run_dir))
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launcher.plot", description=__doc__)
    parser.add_argument("run_dir", type=Path, help="a run directory (run.dir) holding metrics.jsonl")
    parser.add_argument("--out", type=Path, help="the PNG to write (default: RUN_DIR/metrics.png)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    out = plot(args.run_dir, args.out or args.run_dir / "metrics.png")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
