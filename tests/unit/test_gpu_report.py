"""bench/gpu_report.py: bench/gpu.sh's results against BENCHMARKS.md's GPU goals, read from what the H200 gave
(bench/results/h200.jsonl, three runs of bench/gpu.sh) and from a run that measured nothing."""

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"


def report(results: Path) -> str:
    done = subprocess.run([sys.executable, str(BENCH / "gpu_report.py"), str(results)], capture_output=True, text=True,
                          check=True)
    return done.stdout


def row(text: str, start: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(start))


def test_the_h200_results_read_against_the_goals():
    text = report(BENCH / "results" / "h200.jsonl")
    assert row(text, "| ResNet-18 b256 bf16 compiled, CUDA graphs: launcher images/s").endswith(
        "| 65,205 | >= 45,000 | met |")  # the second run's, with every side compiled alike, replaces the first's
    assert row(text, "| ResNet-18 b256 bf16 eager, DataLoader: launcher images/s").endswith("| NOT MET |")
    assert row(text, "| gpt: MFU").endswith("| 0.464 | >= 40% | met |")
    assert row(text, "| async stall / synchronous save").endswith("| 0.0137 | <= 20% | met |")
    assert row(text, "| activation checkpointing full:").startswith("| activation checkpointing full: activation MiB "
                                                                   "(time vs off) | 1,811 | time x1.23 |")
    assert "| smoke_gpt_fsdp | 60 | step_000000020, step_000000040, step_000000060 | 2 |" in text  # resumed at 40


def test_sections_that_failed_or_ran_out_of_time_are_not_measured(tmp_path):
    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps(line) + "\n" for line in (
        {"section": "overhead", "rc": 1, "seconds": 12}, {"section": "gpt_100m", "rc": "skipped: out of time",
                                                          "seconds": 0},
        {"measured": "gpt_100m", "records": [], "checkpoints": [], "profile": []})))
    text = report(results)
    assert "| overhead | 1 | 12 |" in text and "| gpt_100m | skipped: out of time | 0 |" in text
    assert row(text, "| ResNet-18 b256 bf16 eager, data on the GPU |").endswith("| not measured |  |  |")
    assert row(text, "| gpt: MFU").endswith("| not measured | >= 40% |  |")
