"""What the in-process Trainer tests share."""

import signal

import pytest
import torch
from helpers import RECIPE

from launcher.distributed.stop import STOP_SIGNALS


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """One intra-op thread, as the launched tests have (OMP_NUM_THREADS=1): with two, torch splits a reduction by
    the batch's size, so a whole batch and its accumulated micro-batches round differently (3e-5 after an epoch)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def trainer_dir(tmp_path, monkeypatch):
    """Each test in its own folder (run directories, the recipe's marker file), with the interruptible recipe there,
    and this process's signal handlers as they were afterwards."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "interruptible.py").write_text(RECIPE)
    handlers = {signum: signal.getsignal(signum) for signum in (*STOP_SIGNALS, signal.SIGHUP)}
    yield tmp_path
    for signum, handler in handlers.items():
        signal.signal(signum, handler)
