"""Starting worker processes from a plain `python -m launcher ...` through torch's own torchrun."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, run

from launcher.cli.outcome import STATUS_FILE_ENV, read_status
from launcher.distributed.stop import STOP_EXIT_CODE, STOP_SIGNALS

log = logging.getLogger(__name__)

# torchrun passes these on to the workers when this process gets them (its default list lacks SIGUSR1/2, which
# would otherwise end this process at once and leave the workers running); after the workers' graceful stop it
# waits this long (torch's TORCH_ELASTIC_SHUTDOWN_TIMEOUT, 30 s by default, too short for a large checkpoint).
FORWARDED_SIGNALS = ",".join(sorted({sig.name for sig in STOP_SIGNALS} | {"SIGHUP", "SIGQUIT"}))
SHUTDOWN_TIMEOUT_S = "600"


def launch_workers(argv: list[str], nproc_per_node: int, run_id: str) -> int:
    """Run ``python -m launcher <argv>`` in ``nproc_per_node`` processes on this node; returns the exit code.

    The run id becomes torchrun's rendezvous id, which the workers read as the job id. A stop signal to this
    process reaches every worker (which stops gracefully) and ends it with 75, as a worker's own stop does; a
    second one aborts.
    """
    args = parse_args([
        "--nnodes=1",
        f"--nproc-per-node={nproc_per_node}",
        "--rdzv-backend=c10d",
        "--rdzv-endpoint=localhost:0",
        f"--rdzv-id={run_id}",
        f"--signals-to-handle={FORWARDED_SIGNALS}",
        "-m",
        "launcher",
        *argv,
    ])
    os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", SHUTDOWN_TIMEOUT_S)
    with tempfile.TemporaryDirectory(prefix="launcher-") as folder:
        status_file = os.environ.setdefault(STATUS_FILE_ENV, str(Path(folder) / "status"))
        try:
            run(args)
        except ChildFailedError as error:
            # The workers have printed their own errors; torchrun's report above names the failed ranks.
            rank, failure = error.get_first_failure()
            if failure.exitcode != STOP_EXIT_CODE:
                log.error("launcher: worker rank %d failed with exit code %d", rank, failure.exitcode)
            return failure.exitcode if failure.exitcode > 0 else 1
        except SignalException as caught:
            status = read_status(status_file)
            if status == "stopped":  # the workers stopped gracefully and said so
                return STOP_EXIT_CODE
            if status == "finished":
                return 0
            log.error("launcher: %s: the workers ended without a checkpoint", caught.sigval.name)
            return 128 + caught.sigval
    return 0

