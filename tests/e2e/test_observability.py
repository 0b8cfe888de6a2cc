"""Seeing inside a run on 2 real processes: a straggler named, FLOPs, memory and a profile.

(A stuck rank named with its line, and a live run's stacks: tests/e2e/test_ending.py.)
"""

import json
import textwrap

import pytest
from helpers import launch, read_metrics

SLOW_RANK = textwrap.dedent("""
    import os, time
    import torch.nn.functional as F
    from launcher.recipes.digits import build_model, DEFAULTS, build_datasets

    def loss(outputs, targets):
        if os.environ["RANK"] == "1":
            time.sleep(0.03)  # a straggler: a slow disk, a busy CPU
        return F.cross_entropy(outputs, targets)
""")


def test_a_slow_rank_is_named_and_the_reports_carry_flops_memory_and_a_profile(tmp_path):
    (tmp_path / "slow.py").write_text(SLOW_RANK)
    result = launch(["recipe=slow.py", "run.dir=run", "train.epochs=2", "train.log_every=5",
                     "dist.stop_check_every=5", "profile.steps=3-4", "wandb.mode=disabled"], tmp_path, nproc=2)
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    assert "rank 1 is slower than the others: its own time (data and forward) exceeded the median rank's by " in output
    assert "per rank: weights 58.8 KB, gradients 58.8 KB, optimizer state 58.8 KB" in output  # SGD with momentum
    records = read_metrics(tmp_path / "run")
    named = [record for record in records if "perf/slowest_rank" in record]
    assert named and all(record["perf/slowest_rank"] == 1 and record["perf/slowest_vs_median"] > 1.3
                         for record in named)
    epochs = [record for record in records if "time/epoch_s" in record]
    # digits' CNN: 3,643,392 FLOPs a sample, forward and backward; no MFU on a CPU (no peak to measure it against).
    for record in epochs:
        assert record["perf/tflops"] == pytest.approx(record["throughput/samples_per_s"] * 3_643_392 / 2 / 1e12)
        assert "perf/mfu" not in record and record["memory/peak_rss_gib"] > 0.1 and record["memory/peak_rank"] in (0, 1)
    assert "TFLOP/s per device | peak memory " in output
    for rank in (0, 1):
        trace = json.loads((tmp_path / "run" / "profile" / f"rank_{rank}.json").read_text())
        steps = {event["name"] for event in trace["traceEvents"] if event.get("name", "").startswith("step ")}
        assert steps == {"step 3", "step 4"}
        assert any(event.get("name", "").startswith("aten::") for event in trace["traceEvents"])
