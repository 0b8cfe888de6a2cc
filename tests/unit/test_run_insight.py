"""Seeing inside a run, in one process: FLOPs against the analytic counts, the peak table, the straggler and memory
reports, and a hang's diagnosis from the ranks' answers."""

import threading
from pathlib import Path

import pytest
import torch

from launcher.cli.main import load_validated
from launcher.distributed.env import DistEnv
from launcher.distributed.stacks import StackWatch, ask, gather
from launcher.engine.flops import Throughput, flops_per_sample, peak_tflops
from launcher.engine.rank_stats import GIB, RankReport, state_bytes
from launcher.errors import UserError

ONE_PROCESS = DistEnv.from_environ({})


def counted(recipe: str, sample, *overrides: str) -> tuple[float, object]:
    _, loaded, cfg = load_validated([f"recipe={recipe}", *overrides], ONE_PROCESS)
    model = loaded.build_model(cfg)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    flops = flops_per_sample(loaded, cfg, model, sample)
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())  # untouched
    assert all(parameter.grad is None for parameter in model.parameters())
    return flops, cfg


def test_the_flops_of_an_mlp_are_those_its_matrix_products_execute():
    flops, _ = counted("mlp", (torch.rand(1, 28, 28), 3))
    # Forward 2*784*256 + 2*256*10; backward twice that, less the first layer's input gradient (nothing needs it).
    assert flops == pytest.approx(4 * 784 * 256 + 6 * 256 * 10, rel=0.02)


def test_the_flops_of_the_gpt_recipe_match_the_transformer_count():
    sample = {"input_ids": torch.zeros(48, dtype=torch.long), "targets": torch.zeros(48, dtype=torch.long)}
    flops, cfg = counted("gpt", sample, "model.layers=3", "model.width=96", "model.context=48")
    layers, width, context, vocab = 3, 96, 48, 256
    # Per sequence, 3 x the forward: each layer's projections and MLP (24 T d^2) and attention (4 T^2 d), the head
    # (2 T d V).
    analytic = 3 * (layers * (24 * context * width**2 + 4 * context**2 * width) + 2 * context * width * vocab)
    assert flops == pytest.approx(analytic, rel=0.02)


def test_a_recipe_may_give_its_flops_and_a_model_that_cannot_be_counted_gets_none(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "given.py").write_text(
        "from launcher.recipes.digits import *\n\ndef flops_per_sample(cfg):\n    return 1234\n")
    for garbage in ("'abc'", "-1e9", "float('nan')", "True"):
        (tmp_path / "garbage.py").write_text(
            f"from launcher.recipes.digits import *\n\ndef flops_per_sample(cfg):\n    return {garbage}\n")
        with pytest.raises(UserError, match="flops_per_sample.cfg. returned .*: it must be a positive number"):
            counted("garbage.py", (torch.rand(1, 8, 8), 3))
    (tmp_path / "opaque.py").write_text(
        "from launcher.recipes.digits import *\nimport torch\n\ndef step(model, batch):\n"
        "    return model(batch[0]).sum() * float(batch[0].sum().item())\n")  # a value read: not on meta tensors
    sample = (torch.rand(1, 8, 8), 3)
    assert counted("given.py", sample)[0] == 1234
    assert counted("opaque.py", sample)[0] is None


def test_mfu_is_given_only_against_a_known_peak_of_the_precision_used(monkeypatch):
    assert peak_tflops(torch.device("cpu"), "fp32") is None
    names = {"NVIDIA H100 80GB HBM3": 989.4, "NVIDIA H100 PCIe": 756.0, "NVIDIA H200": 989.4,
             "NVIDIA A100-SXM4-80GB": 312.0, "NVIDIA GeForce RTX 4090": 165.2, "NVIDIA L40S": 362.05,
             "Some Future GPU": None}
    for name, bf16 in names.items():
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, name=name: name)
        assert peak_tflops(torch.device("cuda", 0), "bf16") == bf16
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    assert peak_tflops(torch.device("cuda", 0), "tf32") == 156.0  # not the bf16 peak (torchtitan #668)
    assert Throughput(None, 2e9, 100.0, 2).of(100.0) == {
        "throughput/samples_per_s": 100.0, "perf/tflops": 0.1, "perf/mfu": pytest.approx(0.001)}
    assert "perf/mfu" not in Throughput(None, 2e9, None, 2).of(100.0)


def sample(own_s: float, clock: float, rss_gib: float = 1.0) -> list[float]:
    return [own_s, clock, 0.0, 0.0, rss_gib * GIB]


def test_a_rank_slower_on_its_own_is_named_after_two_reports_in_a_row():
    report = RankReport(cuda=False, share=0.2)
    assert report.take([sample(0, 0), sample(0, 0), sample(0, 0)]) == ({
        "memory/peak_rss_gib": 1.0, "memory/peak_rank": 0}, None)
    # Each window 10 s; rank 2's own time 5 s against a median of 2 s: 30% of the window more.
    metrics, warning = report.take([sample(2, 10), sample(2, 10, 3.0), sample(5, 10)])
    assert metrics["perf/slowest_rank"] == 2 and metrics["perf/slowest_vs_median"] == 2.5 and warning is None
    assert metrics["memory/peak_rank"] == 1 and metrics["memory/peak_rss_gib"] == 3.0
    metrics, warning = report.take([sample(4, 20), sample(4, 20), sample(10, 20)])
    assert warning.startswith("rank 2 is slower than the others") and "30% of the wall time" in warning
    assert report.take([sample(6, 30), sample(6, 30), sample(15, 30)])[1] is None  # said once
    # A rank 10% slower of the window is not a straggler at a share of 0.2.
    report = RankReport(cuda=False, share=0.2)
    for window in range(4):
        assert report.take([sample(window * 2, window * 10), sample(window * 3, window * 10)])[1] is None


def test_the_header_counts_each_ranks_weights_gradients_and_optimizer_state():
    model = torch.nn.Sequential(torch.nn.Linear(10, 10), torch.nn.Linear(10, 2))
    model[1].requires_grad_(False)
    assert state_bytes(model, "adamw", 0.0) == (4 * 132, 4 * 110, 2 * 4 * 110)
    assert state_bytes(model, "sgd", 0.0)[2] == 0 and state_bytes(model, "sgd", 0.9)[2] == 4 * 110


def stuck_in_the_recipe(release: threading.Event):
    release.wait(30)


def test_a_hang_names_the_rank_that_did_not_reach_the_collective_and_its_line(tmp_path):
    waiting, stuck = StackWatch(0, 3), StackWatch(1, 3)
    waiting.start(tmp_path)
    stuck.start(tmp_path)  # rank 2 never answers: it died
    waiting.where.at(6, "gradient all-reduce")
    stuck.where.at(6, "forward")
    release = threading.Event()
    # Rank 1's answer reports the main thread: this test's, inside stuck_in_the_recipe while rank 0 diagnoses.
    stuck_main = threading.Thread(target=lambda: (waiting.diagnose(20), release.set()))
    stuck_main.start()
    stuck_in_the_recipe(release)
    stuck_main.join()
    waiting.stop()
    stuck.stop()
    line = waiting.diagnose(20)
    assert line.startswith("rank 1 did not reach the step-6 gradient all-reduce within dist.timeout_s=20 s; it was "
                           "in stuck_in_the_recipe (test_run_insight.py:")
    assert "in the step-6 forward; rank 2 did not answer within 2 s (ended, or stuck outside Python)" in line
    answers = line.rpartition("(every rank's stacks: ")[2].rstrip(")")
    assert Path(answers).parent == tmp_path / "stacks"
    assert "stuck_in_the_recipe" in (Path(answers) / "rank_1.txt").read_text()


def test_askers_at_once_each_get_every_answer(tmp_path):
    watches = [StackWatch(rank, 2) for rank in (0, 1)]
    for watch in watches:
        watch.start(tmp_path)
    requests = [ask(tmp_path / "stacks") for _ in range(3)]  # as many waiting ranks (or users) at once
    try:
        assert all(sorted(gather(tmp_path / "stacks", request, 2)) == [0, 1] for request in requests)
    finally:
        for watch in watches:
            watch.stop()
