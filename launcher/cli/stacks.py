"""`python -m launcher.stacks RUN_DIR`: every rank's Python stacks (all threads) of a live run, without stopping it.

Each rank of the run answers within a second (launcher/distributed/stacks.py); the answers stay in RUN_DIR/stacks/,
one file per rank, and are printed here: where training stands on that rank, then each thread's stack.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from launcher.distributed.stacks import ANSWER_WAIT_S, FOLDER, ask, gather


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launcher.stacks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="the run's directory (runs/<recipe>/<name>, or its run.dir)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if not (args.run_dir / "history.jsonl").is_file():
        print(f"launcher.stacks: error: {args.run_dir} holds no run (no history.jsonl)", file=sys.stderr)
        return 2
    folder = args.run_dir / FOLDER
    answers = gather(folder, ask(folder), ranks=None)
    if not answers:
        print(f"launcher.stacks: error: no rank answered within {ANSWER_WAIT_S:g} s: is a run training in "
              f"{args.run_dir}?", file=sys.stderr)
        return 1
    for rank in sorted(answers):
        header = answers[rank]
        print(f"== rank {rank} ({header['host']}, pid {header['pid']}): step {header['step']}, {header['phase']}, "
              f"in {header['at']}")
        print((folder / f"rank_{rank}.txt").read_text().partition("\n")[2].strip(), end="\n\n")
    print(f"{len(answers)} rank(s) answered; their stacks are in {folder}")
    return 0
