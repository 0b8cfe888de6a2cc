"""`python -m launcher.tokens --out DIR PATHS...`: a token corpus (launcher/data/tokens.py) from text files.

Directories are read for the files matching ``--glob``, in sorted order (never those under ``--out``). With
``--eval-every N`` (default 10) every N-th file goes to ``DIR/eval`` and the rest to ``DIR/train`` (no file in both),
as `recipe=gpt data.tokens=DIR` reads them; ``--eval-every 0`` writes one corpus into ``DIR``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from launcher.data.tokens import write_shards
from launcher.errors import LauncherError, UserError


def text_files(paths: list[Path], pattern: str) -> list[Path]:
    """The files named, and those under the folders named that match ``pattern``, each folder's sorted."""
    files = []
    for path in paths:
        if path.is_dir():
            files += sorted(file for file in path.rglob(pattern) if file.is_file())
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"{path}: no such file or folder")
    if not files:
        raise UserError(f"no files matching {pattern} in {', '.join(map(str, paths))}")
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launcher.tokens", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", type=Path, help="text files, or folders of them")
    parser.add_argument("--out", type=Path, required=True, help="the corpus folder to write")
    parser.add_argument("--glob", default="*", help="which files of a folder (default: all)")
    parser.add_argument("--eval-every", type=int, default=10, help="every N-th file to DIR/eval (0: no split)")
    parser.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard")
    parser.add_argument("--tokenizer", default="bytes", help="bytes (each byte a token, a vocabulary of 256)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.out.exists() and not args.out.is_dir():
            raise UserError(f"--out {args.out} is a file: name a folder to write the corpus into")
        out = args.out.resolve()
        files = [file for file in text_files(args.paths, args.glob) if not file.resolve().is_relative_to(out)]
        n = args.eval_every
        if n > 0 and len(files) < 2:
            raise UserError(f"{len(files)} file(s) cannot be split into train/ and eval/: give more files, or write "
                            "one corpus with --eval-every 0 (into --out itself, e.g. --out DIR/train)")
        splits = {args.out: files} if n <= 0 else {
            args.out / "train": [file for i, file in enumerate(files) if i % n],
            args.out / "eval": [file for i, file in enumerate(files) if i % n == 0]}
        for folder, part in splits.items():
            meta = write_shards(part, folder, args.shard_tokens, args.tokenizer)
            tokens = sum(shard["tokens"] for shard in meta["shards"])
            print(f"{folder}: {tokens:,} tokens from {len(part)} files in {len(meta['shards'])} shard(s)")
    except LauncherError as error:
        print(f"launcher.tokens: error: {error}", file=sys.stderr)
        return error.exit_code
    return 0
