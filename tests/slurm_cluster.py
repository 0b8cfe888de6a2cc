"""A real Slurm cluster on localhost for the tests: munged, slurmctld and two slurmd "nodes" (n1, n2) on one host.

Started as root with its state in a temporary directory, stopped by the daemons' process ids.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("/usr/sbin/munged", "/usr/sbin/slurmctld", "/usr/sbin/slurmd", "/usr/bin/sbatch")
NODES = ("n1", "n2")


def missing_daemons() -> list[str]:
    return [path for path in DAEMONS if not Path(path).exists()]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def node_hardware() -> str:
    """This host's CPUs and memory as `slurmd -C` reports them, for the NodeName lines."""
    line = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout.splitlines()[0]
    return " ".join(field for field in line.split() if not field.startswith(("NodeName=", "UpTime=")))


class SlurmCluster:
    def __init__(self, folder: Path):
        self.folder = folder
        self.conf = folder / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.pid_files: list[Path] = []
        self.started_munged = False

    def write_config(self) -> None:
        hardware, host, f = node_hardware(), socket.gethostname(), self.folder
        nodes = "\n".join(
            f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={free_port()} {hardware} State=UNKNOWN"
            for name in NODES
        )
        (f / "state").mkdir()
        (f / "spool").mkdir()
        self.conf.write_text(f"""\
ClusterName=launchertest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
MpiDefault=none
StateSaveLocation={f}/state
SlurmdSpoolDir={f}/spool/%n
SlurmctldPidFile={f}/slurmctld.pid
SlurmdPidFile={f}/slurmd-%n.pid
SlurmctldLogFile={f}/slurmctld.log
SlurmdLogFile={f}/slurmd-%n.log
{nodes}
PartitionName=debug Nodes={",".join(NODES)} Default=YES MaxTime=INFINITE State=UP
""")

    def start(self) -> None:
        self.write_config()
        if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode != 0:
            Path("/run/munge").mkdir(parents=True, exist_ok=True)
            shutil.chown("/run/munge", "munge", "munge")
            subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True)
            self.started_munged = True
        subprocess.run(["slurmctld", "-f", str(self.conf)], check=True, env=self.env)
        self.pid_files.append(self.folder / "slurmctld.pid")
        for name in NODES:
            subprocess.run(["slurmd", "-f", str(self.conf), "-N", name], check=True, env=self.env)
            self.pid_files.append(self.folder / f"slurmd-{name}.pid")
        self.wait_for(lambda: self.run("sinfo", "-h", "-o", "%T").split() == ["idle"], "nodes idle", 30)

    def stop(self) -> None:
        # Jobs first: a job step outliving its slurmd keeps that slurmd's port, and the next cluster cannot start.
        subprocess.run(["scancel", "--full", "--quiet", "--user=root"], env=self.env, capture_output=True)
        try:
            self.wait_for(lambda: not self.run("squeue", "-h").strip(), "all jobs gone", 60)
        except TimeoutError:
            pass  # stop the daemons all the same
        for pid_file in self.pid_files:
            if pid_file.exists():
                try:
                    os.kill(int(pid_file.read_text()), signal.SIGTERM)
                except ProcessLookupError:
                    pass
        if self.started_munged and Path("/run/munge/munged.pid").exists():
            os.kill(int(Path("/run/munge/munged.pid").read_text()), signal.SIGTERM)

    def run(self, *command: str) -> str:
        return subprocess.run(command, capture_output=True, text=True, env=self.env).stdout

    def sbatch(self, *args: str, cwd: Path, env: dict | None = None) -> int:
        result = subprocess.run(["sbatch", "--parsable", *args], capture_output=True, text=True, cwd=cwd,
                                env={**self.env, **(env or {})})
        assert result.returncode == 0, result.stderr
        return int(result.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ...); works without accounting."""
        text = self.run("scontrol", "show", "job", str(job_id))
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def wait_for(self, condition, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                log = (self.folder / "slurmctld.log").read_text()[-3000:]
                raise TimeoutError(f"Slurm: {what} not reached in {timeout} s\nslurmctld.log:\n{log}")
            time.sleep(0.5)

    def wait_until_done(self, job_id: int, timeout: float = 300) -> dict[str, str]:
        finished = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
        self.wait_for(lambda: self.job(job_id).get("JobState") in finished, f"job {job_id} finished", timeout)
        return self.job(job_id)
