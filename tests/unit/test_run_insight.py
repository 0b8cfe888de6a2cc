"""Seeing inside a run, in one process: FLOPs against the analytic counts, the peak table, the straggler and memory
reports, a hang's diagnosis from the ranks' answers (and a real DataLoader worker's), and links planted in the
stacks folder never followed."""

import contextlib
import logging
import shutil
import sys
import threading
from pathlib import Path

import pytest
import torch
from helpers import wait_for
from torch.utils.data import DataLoader, Dataset

from launcher.cli.main import load_validated
from launcher.cli.stacks import main as show_stacks
from launcher.distributed.env import DistEnv
from launcher.distributed.stacks import StackWatch, answer_text, ask, gather
from launcher.engine.data import start_loader_worker
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


def busy_until(release: Path) -> None:
    while not release.exists():  # a worker busy in Python for ever (until the test is done)
        pass


class BusyUntilReleased(Dataset):
    def __init__(self, release: Path):
        self.release = release

    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> int:
        busy_until(self.release)
        return index


def main_thread_waits_for_a_batch() -> bool:
    frame = sys._current_frames()[threading.main_thread().ident]
    while frame is not None and frame.f_code.co_name != "_try_get_data":  # torch's DataLoader iterator, waiting
        frame = frame.f_back
    return frame is not None


def test_a_rank_waiting_for_its_loader_names_the_line_its_worker_is_in(tmp_path):
    watch = StackWatch(0, 1)
    watch.start(tmp_path)  # before the loader's workers are forked, as in a run
    release = tmp_path / "release"
    loader = DataLoader(BusyUntilReleased(release), batch_size=2, num_workers=1, worker_init_fn=start_loader_worker)
    asked = {}

    def ask_then_release() -> None:
        try:
            wait_for(main_thread_waits_for_a_batch, "the main thread to wait for its worker", 60)
            request = ask(tmp_path / "stacks")
            asked["header"] = gather(tmp_path / "stacks", request, 1)[0]
            asked["text"] = answer_text(tmp_path / "stacks", request, 0)
        finally:
            release.touch()

    asker = threading.Thread(target=ask_then_release)
    asker.start()
    try:
        assert [batch.tolist() for batch in loader] == [[0, 1]]  # this (main) thread waits here until released
    finally:
        asker.join()
        watch.stop()
    loop = range(busy_until.__code__.co_firstlineno + 1, busy_until.__code__.co_firstlineno + 3)  # either line
    assert asked["header"]["at"] in [f"busy_until (test_run_insight.py:{line}) of its DataLoader worker 0"
                                     for line in loop]
    worker = asked["text"].partition("Thread MainThread of DataLoader worker 0 (pid ")[2]
    assert "in __getitem__" in worker and "in busy_until" in worker
    assert "in _try_get_data" in asked["text"]  # the rank's own main thread, waiting for it
    request = asked["header"]["request"]  # the request and its answers stay until forgotten; the worker's is read
    assert sorted(path.name for path in (tmp_path / "stacks").iterdir()) == [request, f"request_{request}"]


@contextlib.contextmanager
def warnings_said():
    """The warnings the stacks module logs, whatever the launcher's logging was set to by earlier tests."""
    said: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: said.append(record.getMessage())
    logger = logging.getLogger("launcher.distributed.stacks")
    level = logger.level
    logger.setLevel(logging.WARNING)
    logger.addHandler(handler)
    try:
        yield said
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_links_planted_under_stacks_are_never_followed_and_said_once(tmp_path, capsys):
    run, outside = tmp_path / "run", tmp_path / "outside"
    stacks = run / "stacks"
    (stacks / "planted").mkdir(parents=True)
    outside.mkdir()
    (stacks / "linked").symlink_to(outside)  # a request's folder
    (stacks / "planted" / "rank_0.txt").symlink_to(outside / "rank_0.txt")  # an answer
    watch = StackWatch(0, 1)
    with warnings_said() as said:
        watch.start(run)
        try:
            for request in ("linked", "planted"):
                (stacks / f"request_{request}").write_text(request)
            wait_for(lambda: len(said) == 2, "both requests refused", 60)
            assert sorted(said) == [f"stack request {request} not answered: {stacks / request / name} is a symbolic "
                                    "link, which stack requests never follow out of the run directory: remove it"
                                    for request, name in (("linked", ""), ("planted", "rank_0.txt"))]
            assert said[0].count(str(stacks)) == 1
            # stacks/ itself, with a request beyond it that a rank following the link would answer there.
            shutil.move(stacks, tmp_path / "moved")
            stacks.symlink_to(outside)
            (outside / "request_beyond").write_text("beyond")
            refused = f"{stacks} is a symbolic link, which stack requests never follow out of the run directory"
            wait_for(lambda: len(said) == 3, "stacks/ refused", 60)
            assert said[2] == f"stack requests not answered: {refused}: remove it"
            assert watch.diagnose(20) is None and said[3] == f"the ranks' stacks not asked for: {refused}: remove it"
            (run / "history.jsonl").touch()
            assert show_stacks([str(run)]) == 1
            assert capsys.readouterr().err == f"launcher.stacks: error: {refused}: remove it\n"
        finally:
            watch.stop()
    assert len(said) == 4  # each said once, though the watch looked twice a second
    assert [path.name for path in outside.iterdir()] == ["request_beyond"]  # nothing written outside, temporaries too
