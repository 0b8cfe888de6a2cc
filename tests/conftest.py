"""Shared test helpers: run the real launcher in real processes, write real Fashion-MNIST IDX files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import synthetic_fashion, write_idx

E2E = Path(__file__).resolve().parent / "e2e"


def pytest_collection_modifyitems(items):
    """The layers: tests/unit runs in this process (``pytest -m "not e2e and not slurm"``, under a minute);
    tests/e2e starts real launcher processes (marked e2e); those that submit to Slurm are marked slurm too."""
    for item in items:
        if E2E in Path(item.fspath).resolve().parents:
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def fashion_root(tmp_path_factory) -> Path:
    """A data.root holding a small Fashion-MNIST (256 train, 64 test images) as real IDX files."""
    root = tmp_path_factory.mktemp("fashion")
    raw = root / "FashionMNIST" / "raw"
    write_idx(raw, "train", *synthetic_fashion(256, seed=0))
    write_idx(raw, "t10k", *synthetic_fashion(64, seed=1))
    return root


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A real Slurm cluster on localhost (two nodes on this host); needs root and Debian's slurm-wlm and munge."""
    from slurm_cluster import SlurmCluster, missing_daemons

    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("the Slurm tests need root on CI (they start munged, slurmctld and slurmd)")
        pytest.skip("not root: the Slurm tests start munged, slurmctld and slurmd")
    missing = missing_daemons()
    assert not missing, f"{missing} not installed: apt-get install -y slurm-wlm munge (as .ci/run does)"
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


