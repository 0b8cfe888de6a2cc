"""`python -m launcher.stacks RUN_DIR`: every rank's Python stacks (all threads) of a live run, without stopping it.

Each rank of the run answers within a second or two (launcher/distributed/stacks.py): where training stands on that
rank, then each thread's stack (and those of the DataLoader workers it waits for), printed here; the request and its
answers are then removed from RUN_DIR/stacks/.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from launcher.distributed.stacks import ANSWER_WAIT_S, FOLDER, Refused, answer_text, ask, forget, gather


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
    except Refused as refused:
        print(f"launcher.stacks: error: {refused}", file=sys.stderr)
        return 1
    except OSError as error:
        print(f"launcher.stacks: error: cannot ask the run's ranks through {folder} ({error.strerror}): it must be "
              "writable by whoever asks", file=sys.stderr)
        return 1
    try:
        return _show(folder, request, args.run_dir)
    except Refused as refused:  # planted while the ranks answered: they did not write through it either
        print(f"launcher.stacks: error: {refused}", file=sys.stderr)
        return 1
    except OSError as error:
        print(f"launcher.stacks: error: cannot read the ranks' answers in {folder} ({error.strerror})", file=sys.stderr)
        return 1
    finally:
        forget(folder, request)


def _show(folder: Path, request: str, run_dir: Path) -> int:
    """Print every rank's answer to ``request``; the exit code."""
    answers = gather(folder, request, ranks=None)
    if not answers:
        print(f"launcher.stacks: error: no rank answered within {ANSWER_WAIT_S:g} s: is a run training in "
              f"{run_dir}?", file=sys.stderr)
        return 1
    for rank in sorted(answers):
        header = answers[rank]
        print(f"== rank {rank} ({header['host']}, pid {header['pid']}): step {header['step']}, {header['phase']}, "
              f"in {header['at']}")
        print(answer_text(folder, request, rank).partition("\n")[2].strip(), end="\n\n")
    print(f"{len(answers)} rank(s) answered")
    return 0
