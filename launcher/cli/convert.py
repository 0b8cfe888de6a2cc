"""`python -m launcher.convert CHECKPOINT [--out FILE]`: a checkpoint's model weights as a model.pt.

The checkpoint is a folder of shards written under dist.strategy=fsdp, or a single-file one. The model.pt holds the
whole, unwrapped state_dict, loadable with ``torch.load(..., weights_only=True)`` into the recipe's freshly built model.
Runs in one process, with no GPU.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from launcher.checkpoint.files import BadCheckpoint, save_model
from launcher.checkpoint.formats import format_of, is_checkpoint, load_checkpoint, step_files, step_of
from launcher.errors import LauncherError


def convert(checkpoint: Path, out: Path | None) -> tuple[Path, int]:
    """Write ``checkpoint``'s model weights to ``out``; returns the file and its number of tensors.

    ``out`` defaults to model_<checkpoint's name>.pt in the run directory, beside checkpoints/.
    """
    if not checkpoint.exists():
        raise LauncherError(f"{checkpoint}: no such checkpoint (a checkpoints/step_<N> folder or step_<N>.pt file)")
    try:
        saved = load_checkpoint(checkpoint)  # verified: every record's and every shard's checksum
    except BadCheckpoint as error:
        raise LauncherError(f"{checkpoint} does not load ({error})") from None
    if not is_checkpoint(saved):
        raise LauncherError(f"{checkpoint} is already a model state_dict, not a checkpoint")
    weights = format_of(checkpoint).weights(checkpoint, saved)
    out = out or checkpoint.parent.parent / f"model_{checkpoint.name.removesuffix('.pt')}.pt"
    save_model(weights, out)
    return out, len(weights)


def named(checkpoint: Path) -> Path:
    """The checkpoint ``checkpoint`` names: itself, else its folder's step_<N> file or folder.

    So checkpoints/step_<N> names a run's step N whatever its kind (step_<N>.pt under ddp, a folder under fsdp), with
    N written with or without its leading zeros.
    """
    wanted = re.fullmatch(r"step_(\d+)(\.pt)?", checkpoint.name)
    if checkpoint.exists() or not wanted or not checkpoint.parent.is_dir():
        return checkpoint
    return next((path for path in step_files(checkpoint.parent) if step_of(path) == int(wanted[1])), checkpoint)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launcher.convert", description=__doc__)
    parser.add_argument("checkpoint", type=Path, help="a checkpoint: run.dir/checkpoints/step_<N> (or step_<N>.pt)")
    parser.add_argument("--out", type=Path, help="the file to write (default: run.dir/model_step_<N>.pt)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    checkpoint = named(args.checkpoint)
    try:
        out, tensors = convert(checkpoint, args.out)
    except LauncherError as error:
        print(f"launcher.convert: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {out}: the model's {tensors} tensors from {checkpoint}")
    return 0
