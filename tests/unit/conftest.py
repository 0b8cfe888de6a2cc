"""What the in-process Trainer tests share."""

import signal

import pytest
from helpers import RECIPE

from launcher.distributed.stop import STOP_SIGNALS


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
