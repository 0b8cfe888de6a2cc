"""Smoke runs of the benchmarks in bench/: each script runs end to end, on a few steps, and emits its JSON.

The timings themselves are not asserted (a loaded CI machine makes them meaningless); what the launcher does per
step, which does not depend on the machine, is: no host reads or collectives beyond the plain loop's, except the
stop agreement every dist.stop_check_every steps.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def run_bench(args: list[str], cwd: Path, timeout: float = 600) -> str:
    result = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    return result.stdout


def run_json_lines(args: list[str], cwd: Path) -> list[dict]:
    return [json.loads(line) for line in run_bench(args, cwd).splitlines()]


def test_overhead_bench_runs_and_the_launcher_adds_no_per_step_syncs(tmp_path):
    lines = run_json_lines([str(BENCH / "overhead.py"), "--archs", "mlp", "--procs", "2", "--reps", "1",
                            "--chunks", "2", "--chunk-steps", "50", "--warmup", "50", "--workdir", str(tmp_path)],
                           tmp_path)
    run, summary = lines
    assert summary["summary"] and summary["procs"] == 2 and summary["runs"] == 1
    assert run["launcher_steps_per_s"] > 0 and run["plain_steps_per_s"] > 0 and run["ratio"] > 0
    # Both log the loss every 50 steps (one host read); the launcher adds the stop flag every 10 steps.
    assert run["plain_host_reads_per_step"] == pytest.approx(0.02)
    assert run["launcher_host_reads_per_step"] == pytest.approx(0.02 + 0.1)
    assert run["plain_collectives_per_step"] == 0 and run["launcher_collectives_per_step"] == pytest.approx(0.1)


def test_startup_bench_times_every_command(tmp_path):
    lines = run_json_lines([str(BENCH / "startup.py"), "--reps", "1"], tmp_path)
    assert {line["command"] for line in lines} >= {"python -m launcher", "torchrun x2 plain_ddp.py"}
    assert all(0 < line["first_step_s"] < line["exit_s"] for line in lines)


def test_checkpoint_bench_compares_with_torch_save(tmp_path):
    results = json.loads(run_bench([str(BENCH / "checkpoint.py"), "--params", "1000000", "--dir", str(tmp_path)],
                                   tmp_path))
    assert {result["case"] for result in results} == {"launcher", "torch.save"}
