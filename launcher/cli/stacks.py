"""`python -m launcher.stacks RUN_DIR`: every rank's Python stacks (all threads) of a live run, without stopping it.

Each rank of the run answers within a second (launcher/distributed/stacks.py): where training stands on that rank,
then each thread's stack, printed here; the request and its answers are then removed from RUN_DIR/stacks/.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from launcher.distributed.stacks import ANSWER_WAIT_S, FOLDER, ask, forget, gather


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launcher.stacks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="the run's directory (runs/<recipe>/<name>, or its run.dir)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if not (args.run_dir / "history.jsonl").is_file():
        print(f"launcher.stacks: error: {args.run_dir} holds no run (no history.jsonl)", file=sys.stderr)
        return 2
    folder = args.run_dir / FOLDER
    try:
        request = ask(folder)
    except OSError as error:
        print(f"launcher.stacks: error: cannot ask the run's ranks through {folder} ({error.strerror}): it must be "
              "writable by whoever asks", file=sys.stderr)
        return 1
    try:
        answers = gather(folder, request, ranks=None)
        if not answers:
            print(f"launcher.stacks: error: no rank answered within {ANSWER_WAIT_S:g} s: is a run training in "
                  f"{args.run_dir}?", file=sys.stderr)
            return 1
        for rank in sorted(answers):
            header = answers[rank]
            print(f"== rank {rank} ({header['host']}, pid {header['pid']}): step {header['step']}, {header['phase']}, "
                  f"in {header['at']}")
            print((folder / request / f"rank_{rank}.txt").read_text().partition("\n")[2].strip(), end="\n\n")
        print(f"{len(answers)} rank(s) answered")
    finally:
        forget(folder, request)
    return 0
