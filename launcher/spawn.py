"""Starting worker processes from a plain `python -m launcher ...` through torch's own torchrun."""

from __future__ import annotations

import logging

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, run

log = logging.getLogger(__name__)


def launch_workers(argv: list[str], nproc_per_node: int, run_id: str) -> int:
    """Run ``python -m launcher <argv>`` in ``nproc_per_node`` processes on this node; returns the exit code.

    The run id becomes torchrun's rendezvous id, which the workers read as the job id (and so agree on the run
    directory without talking to each other).
    """
    args = parse_args([
        "--nnodes=1",
        f"--nproc-per-node={nproc_per_node}",
        "--rdzv-backend=c10d",
        "--rdzv-endpoint=localhost:0",
        f"--rdzv-id={run_id}",
        "-m",
        "launcher",
        *argv,
    ])
    try:
        run(args)
    except ChildFailedError as error:
        # The workers have printed their own errors; torchrun's report above names the failed ranks.
        rank, failure = error.get_first_failure()
        log.error("launcher: worker rank %d failed with exit code %d", rank, failure.exitcode)
        return failure.exitcode if failure.exitcode > 0 else 1
    return 0
