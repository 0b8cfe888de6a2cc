"""Shared test helpers: run the real launcher in real processes, write real Fashion-MNIST IDX files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

TORCHRUN = str(Path(sys.executable).parent / "torchrun")


def launch(args: list[str], cwd: Path, nproc: int | None = None, env: dict | None = None, timeout: float = 300,
           torchrun_args: tuple = ()):
    """`torchrun --standalone --nproc_per_node N -m launcher ARGS` (nproc given) or `python -m launcher ARGS`."""
    if nproc:
        command = [TORCHRUN, "--standalone", f"--nproc_per_node={nproc}", *torchrun_args, "-m", "launcher", *args]
    else:
        command = [sys.executable, "-m", "launcher", *args]
    # No W&B credentials: wandb.mode=auto then logs offline, never to a server.
    merged = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_API_KEY": None, **(env or {})}
    environ = {key: value for key, value in merged.items() if value is not None}  # None: unset it
    return subprocess.run(command, cwd=cwd, env=environ, capture_output=True, text=True, timeout=timeout)


def check_ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"exit {result.returncode}\nSTDOUT:\n{result.stdout}\nSTDERR:\n{result.stderr}"
    return result


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def epoch_records(run_dir: Path) -> list[dict]:
    return [record for record in read_metrics(run_dir) if "time/epoch_s" in record]


def load_weights(run_dir: Path) -> dict:
    return torch.load(run_dir / "model.pt", weights_only=True)


def write_idx(folder: Path, split: str, images: torch.Tensor, labels: torch.Tensor) -> None:
    """uint8 images (N, 28, 28) and labels (N,) in the IDX format Fashion-MNIST ships in (big-endian header)."""
    folder.mkdir(parents=True, exist_ok=True)
    count = len(labels)
    header = lambda magic, *dims: b"".join(x.to_bytes(4, "big") for x in (magic, count, *dims))  # noqa: E731
    (folder / f"{split}-images-idx3-ubyte").write_bytes(header(2051, 28, 28) + images.numpy().tobytes())
    (folder / f"{split}-labels-idx1-ubyte").write_bytes(header(2049) + labels.numpy().tobytes())


def synthetic_fashion(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Learnable stand-ins for Fashion-MNIST: class k is a bright bar at row 2k + 4, on noise."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (count,), generator=generator, dtype=torch.uint8)
    images = torch.randint(0, 60, (count, 28, 28), generator=generator, dtype=torch.uint8)
    for i, label in enumerate(labels.tolist()):
        images[i, 2 * label + 4, 4:24] = 250
    return images, labels


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


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (torchrun starts its workers in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def start(args: list[str], cwd: Path, nproc: int | None = None, env: dict | None = None,
          torchrun_args: tuple = ()) -> subprocess.Popen:
    """What ``launch`` runs, started in the background (its output in the file ``.output`` names, in ``cwd``)."""
    if nproc:
        command = [TORCHRUN, "--standalone", f"--nproc_per_node={nproc}", *torchrun_args, "-m", "launcher", *args]
    else:
        command = [sys.executable, "-m", "launcher", *args]
    merged = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_API_KEY": None, **(env or {})}
    environ = {key: value for key, value in merged.items() if value is not None}
    output = cwd / f"job-{len(list(cwd.glob('job-*.out')))}.out"
    process = subprocess.Popen(command, cwd=cwd, env=environ, stdout=output.open("w"), stderr=subprocess.STDOUT,
                               text=True)
    process.output = output  # where its stdout and stderr go
    return process


def wait_for(condition, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
