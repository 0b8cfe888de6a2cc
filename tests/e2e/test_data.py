"""Data that resumes exactly on every path, in real processes: DataLoader workers with per-sample random transforms,
evaluation that never moves training's random streams, a stream split over ranks and workers, token shards (bytes,
and a BPE trained on the standard library), Hugging Face datasets (map-style and streamed)."""

import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import (
    GPT_RECIPE,
    INTERRUPT_ON_CALL,
    assert_identical,
    assert_user_error,
    check_ok,
    launch,
    launcher_command,
    launcher_environ,
    load_weights,
    wait_for,
)

JITTERED = textwrap.dedent(INTERRUPT_ON_CALL + """
    import random
    import numpy as np
    import torch
    import torch.nn.functional as F
    from torch import nn
    from launcher.recipes.digits import build_datasets as digits

    DEFAULTS = {"train": {"epochs": 2, "batch_size": 64, "log_every": 10}, "optim": {"lr": 0.05, "momentum": 0.9},
                "data": {"eval_fraction": 0.2, "num_workers": 2}}

    class Jittered(torch.utils.data.Dataset):
        \"\"\"Digits with per-sample noise from torch's, Python's and NumPy's generators (as transforms draw).\"\"\"

        def __init__(self, tensors):
            self.images, self.labels = tensors

        def __len__(self):
            return len(self.labels)

        def __getitem__(self, index):
            image = self.images[index] + 0.1 * torch.randn_like(self.images[index])
            return image * (1 + 0.05 * random.random()) + 0.05 * float(np.random.rand()), self.labels[index]

    def build_datasets(cfg):
        train, evaluation = digits(cfg)
        return Jittered(train.tensors), evaluation

    def collate(samples):  # a batch-level random transform, as MixUp draws
        images, labels = torch.utils.data.default_collate(samples)
        return images * (1 + 0.05 * torch.rand(())), labels

    def build_model(cfg):
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Dropout(0.3), nn.Linear(64, 10))

    def loss(outputs, targets):
        interrupt_on_call()
        return F.cross_entropy(outputs, targets)
""")

JITTERED_ARGS = ["recipe=jittered.py", "wandb.mode=disabled", "ckpt.every_steps=5"]


@pytest.fixture(scope="module")
def jittered(tmp_path_factory):
    """A folder with the recipe, and its uninterrupted runs on 1 and 2 processes (the references)."""
    folder = tmp_path_factory.mktemp("jittered")
    (folder / "jittered.py").write_text(JITTERED)
    for nproc in (1, 2):
        check_ok(launch([*JITTERED_ARGS, f"run.dir=reference{nproc}", f"dist.nproc_per_node={nproc}"], folder))
    return folder


@pytest.mark.parametrize("nproc, workers_after", [(1, 2), (2, 0)])
def test_workers_with_per_sample_random_transforms_resume_bitwise_after_a_stop(jittered, nproc, workers_after):
    """A stop mid-epoch (step 30 of 44): the resumed epoch's samples are read by other workers, in other turns, or
    (``data.num_workers`` changed) by the training process itself."""
    args = [*JITTERED_ARGS, f"run.dir=stopped{nproc}", f"dist.nproc_per_node={nproc}"]
    (jittered / "interrupted.marker").unlink(missing_ok=True)
    stopped = launch(args, jittered, env={"INTERRUPT": "0:30:SIGTERM"})
    assert stopped.returncode == 75, stopped.stderr
    resumed = check_ok(launch([*args, f"data.num_workers={workers_after}"], jittered))
    assert f"data through a DataLoader ({workers_after} workers)" in resumed.stdout
    if workers_after != 2:
        assert "changed since the checkpoint: data.num_workers 2 -> 0: training continues exactly" in resumed.stdout
    assert_identical(load_weights(jittered / f"stopped{nproc}"), load_weights(jittered / f"reference{nproc}"))


def test_a_stop_signal_to_the_whole_process_group_stops_with_a_checkpoint_despite_workers(jittered):
    """SIGTERM to the process group, as torchrun passes it on (killpg) and Ctrl-C sends it: the DataLoader workers are
    not in it, so none dies and fails the rank."""
    job = subprocess.Popen(launcher_command([*JITTERED_ARGS, "run.dir=grouped", "train.epochs=100"]), cwd=jittered,
                           env=launcher_environ(None), start_new_session=True, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    wait_for(lambda: list((jittered / "grouped" / "checkpoints").glob("step_*.pt")), "a first checkpoint")
    os.killpg(job.pid, signal.SIGTERM)
    out, err = job.communicate(timeout=120)
    assert job.returncode == 75, err
    assert "launcher: stopped after step" in err and "killed by signal" not in err


def test_workers_with_per_sample_random_transforms_resume_bitwise_after_a_sigkill(jittered):
    (jittered / "interrupted.marker").unlink(missing_ok=True)
    result = check_ok(launch([*JITTERED_ARGS, "run.dir=killed"], jittered, nproc=2, env={"INTERRUPT": "1:30:SIGKILL"},
                             torchrun_args=["--max-restarts=1"]))
    assert "resumed from killed/checkpoints/step_000000025.pt" in result.stdout
    assert_identical(load_weights(jittered / "killed"), load_weights(jittered / "reference2"))


EVALUATION_DRAWS = textwrap.dedent("""
    import random
    import torch
    from torch import nn
    from launcher.recipes.digits import DEFAULTS, build_datasets

    def build_model(cfg):
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Dropout(0.3), nn.Linear(64, 10))

    def metrics(outputs, batch):
        # An evaluation that draws random numbers, as a sampled metric or a test-time augmentation would.
        noise = torch.rand(len(outputs)) + random.random()
        return {"accuracy": ((outputs.argmax(1) == batch[1]).sum(), len(outputs)), "noise": (noise.sum(), len(noise))}
""")


def test_evaluation_never_moves_the_training_streams(tmp_path):
    """Evaluating every 5 steps, or stopping (and evaluating) at train.max_steps and going on, trains exactly as
    evaluating at epochs' ends does."""
    (tmp_path / "draws.py").write_text(EVALUATION_DRAWS)
    args = ["recipe=draws.py", "wandb.mode=disabled", "train.epochs=2"]
    check_ok(launch([*args, "run.dir=plain"], tmp_path))
    check_ok(launch([*args, "run.dir=often", "eval.every_steps=5"], tmp_path))
    check_ok(launch([*args, "run.dir=stopped", "train.max_steps=30"], tmp_path))
    check_ok(launch([*args, "run.dir=stopped"], tmp_path))
    plain = load_weights(tmp_path / "plain")
    assert_identical(load_weights(tmp_path / "often"), plain)
    assert_identical(load_weights(tmp_path / "stopped"), plain)


COUNTED_STREAM = textwrap.dedent(INTERRUPT_ON_CALL + """
    import torch
    import torch.nn.functional as F
    from torch import nn
    from launcher.data.streams import Stream

    DEFAULTS = {"train": {"batch_size": 8, "max_steps": 24, "log_every": 4},
                "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.9},
                "data": {"num_workers": 2}, "ckpt": {"every_steps": 4}}
    SHARDS, PER_SHARD = 8, 24

    class Counted(Stream):
        \"\"\"8 shards of 24 numbered samples, the shards' order shuffled by the epoch, a noisy feature each.\"\"\"

        def shards(self, epoch):
            return torch.randperm(SHARDS, generator=torch.Generator().manual_seed(epoch)).tolist()

        def read(self, shard, start):
            for offset in range(start, PER_SHARD):
                number = shard * PER_SHARD + offset
                features = torch.full((4,), float(number % 7)) + torch.randn(4)  # a random transform
                yield {"features": features, "label": number % 2, "number": number}

    def build_model(cfg):
        return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 2))

    def build_datasets(cfg):
        return Counted(), None

    def step(model, batch):
        interrupt_on_call()
        with open(f"read-{os.environ.get('RANK', '0')}.txt", "a") as file:
            file.write(" ".join(map(str, batch["number"].tolist())) + "\\n")
        return F.cross_entropy(model(batch["features"]), batch["label"])
""")


def numbers_read(folder, steps: slice) -> list[int]:
    """The sample numbers both ranks read in ``steps`` (a line a step), sorted."""
    return sorted(int(number) for rank in (0, 1)
                  for line in (folder / f"read-{rank}.txt").read_text().splitlines()[steps] for number in line.split())


def test_a_stream_over_two_ranks_and_two_workers_reads_every_sample_once_an_epoch_and_resumes_bitwise(tmp_path):
    """24 steps of 8 samples are one epoch of the stream's 192: each read exactly once in each of two epochs; two
    epochs stopped at step 11 and continued end as two uninterrupted epochs do (the samples' noise drawn inside read
    included)."""
    (tmp_path / "counted.py").write_text(COUNTED_STREAM)
    args = ["recipe=counted.py", "wandb.mode=disabled"]
    reference = check_ok(launch([*args, "run.dir=reference", "train.max_steps=48"], tmp_path, nproc=2))
    assert "data a stream in 4 parts (2 workers a process)" in reference.stdout
    assert numbers_read(tmp_path, slice(0, 24)) == numbers_read(tmp_path, slice(24, 48)) == list(range(192))
    # Stopped at step 11 (an odd number of batches read: each rank's workers then read the other's part next).
    stopped = launch([*args, "run.dir=stopped", "train.max_steps=48", "dist.stop_check_every=1"], tmp_path, nproc=2,
                     env={"INTERRUPT": "1:10:SIGTERM"})
    assert "stopped after step" in stopped.stderr
    resumed = check_ok(launch([*args, "run.dir=stopped", "train.max_steps=48"], tmp_path, nproc=2))
    assert "resumed from stopped/checkpoints/step_" in resumed.stdout
    assert_identical(load_weights(tmp_path / "stopped"), load_weights(tmp_path / "reference"))


def test_gpt_trains_from_token_shards_and_resumes_bitwise(tmp_path):
    (tmp_path / "small_gpt.py").write_text(GPT_RECIPE)
    stdlib = os.path.dirname(os.__file__)
    check_ok(launch_tokens(["--out", "corpus", "--glob", "*.py", "--shard-tokens", "20000", "--eval-every", "3",
                            f"{stdlib}/json", f"{stdlib}/urllib"], tmp_path))
    args = ["recipe=small_gpt.py", "wandb.mode=disabled", "data.tokens=corpus", "ckpt.every_steps=10",
            "train.max_steps=40"]
    reference = check_ok(launch([*args, "run.dir=reference"], tmp_path, nproc=2))
    assert "batches cut at once" in reference.stdout
    stopped = launch([*args, "run.dir=stopped"], tmp_path, nproc=2, env={"INTERRUPT": "0:25:SIGTERM"})
    assert "stopped after step" in stopped.stderr
    check_ok(launch([*args, "run.dir=stopped"], tmp_path, nproc=2))
    assert_identical(load_weights(tmp_path / "stopped"), load_weights(tmp_path / "reference"))


def launch_tokens(args: list[str], cwd):
    return subprocess.run([sys.executable, "-m", "launcher.tokens", *args], cwd=cwd, capture_output=True, text=True)


# The gpt recipe made small, with INTERRUPT (counted in steps) and the samples it writes after each evaluation.
SAMPLING_GPT = textwrap.dedent(INTERRUPT_ON_CALL + """
    from launcher.recipes import gpt
    from launcher.recipes.gpt import build_datasets, build_model, metrics, param_groups, samples, tokens_per_sample

    DEFAULTS = {**gpt.DEFAULTS, "train": {**gpt.DEFAULTS["train"], "log_every": 5},
                "model": {**gpt.DEFAULTS["model"], "layers": 2, "width": 32, "context": 32, "dropout": 0.1}}

    def step(model, batch):
        interrupt_on_call()
        return gpt.step(model, batch)
""")


def test_gpt_trains_on_a_bpe_trained_on_the_standard_library_resumes_bitwise_and_shows_what_it_writes(tmp_path):
    """A parquet table of the standard library's email package (a row per file, as datasets writes text), a
    byte-level BPE of 512 tokens trained on it, and 24 steps of gpt on its shards, stopped at step 13: the resumed run
    ends bitwise as the uninterrupted one, samples written all along."""
    (tmp_path / "small_gpt.py").write_text(SAMPLING_GPT)
    files = sorted((Path(os.__file__).parent / "email").rglob("*.py"))
    pq.write_table(pa.table({"text": [file.read_text() for file in files]}), tmp_path / "email.parquet")
    made = check_ok(launch_tokens(["--out", "corpus", "--train-tokenizer", "512", "email.parquet"], tmp_path))
    assert "trained a byte-level BPE of 512 tokens" in made.stdout and "(uint16, a vocabulary of 512)" in made.stdout
    args = ["recipe=small_gpt.py", "wandb.mode=disabled", "data.tokens=corpus", "ckpt.every_steps=8",
            "eval.every_steps=8", "train.max_steps=24", "train.limit_eval_batches=2"]
    reference = check_ok(launch([*args, "run.dir=reference"], tmp_path))
    assert load_weights(tmp_path / "reference")["tokens.weight"].shape == (512, 32)  # the corpus's vocabulary
    written = re.findall(r"\bstep (\d+) \| sample (\d+): (.*)", reference.stdout)
    # After each evaluation (step 24's twice: eval.every_steps', then the end's), 3 lines.
    assert {(int(step), int(number)) for step, number, _ in written} == {
        (step, number) for step in (8, 16, 24) for number in (1, 2, 3)}, written
    assert all(" → " in line for _, _, line in written)  # a prompt from the eval corpus, what the model wrote after it
    stopped = launch([*args, "run.dir=stopped"], tmp_path, env={"INTERRUPT": "0:13:SIGTERM"})
    assert stopped.returncode == 75, stopped.stderr
    check_ok(launch([*args, "run.dir=stopped"], tmp_path))
    assert_identical(load_weights(tmp_path / "stopped"), load_weights(tmp_path / "reference"))


def test_a_corpus_whose_tokenizer_is_missing_is_one_line(tmp_path):
    stdlib = os.path.dirname(os.__file__)
    check_ok(launch_tokens(["--out", "corpus", "--train-tokenizer", "300", f"{stdlib}/json"], tmp_path))
    (tmp_path / "corpus" / "train" / "tokenizer.json").unlink()
    result = launch(["recipe=gpt", "data.tokens=corpus", "wandb.mode=disabled"], tmp_path)
    assert_user_error(result, "corpus/train/tokens.json names the tokenizer tokenizer.json, which is not beside it")


# A classifier of rows in parquet files, through Hugging Face datasets: a map-style Dataset, or (data.streaming)
# an IterableDataset of the training files, mapped, read by 2 DataLoader workers (a file each).
DATASETS_RECIPE = textwrap.dedent(INTERRUPT_ON_CALL + """
    import datasets
    import torch.nn.functional as F
    from torch import nn

    DEFAULTS = {"train": {"epochs": 2, "batch_size": 16, "log_every": 4}, "optim": {"lr": 0.05, "momentum": 0.9},
                "ckpt": {"every_steps": 4}, "data": {"streaming": False}}
    FILES = {"train": ["train0.parquet", "train1.parquet"], "eval": ["eval.parquet"]}

    def build_datasets(cfg):
        rows = datasets.load_dataset("parquet", data_files=FILES, cache_dir="hf-cache")
        evaluation = rows["eval"].with_format("torch")
        if not cfg.data.streaming:
            return rows["train"].with_format("torch"), evaluation
        stream = datasets.load_dataset("parquet", data_files=FILES["train"], split="train", streaming=True)
        stream = stream.map(lambda row: {"features": [value * 2 for value in row["features"]]})
        return stream.with_format("torch"), evaluation

    def build_model(cfg):
        return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 3))

    def step(model, batch):
        interrupt_on_call()
        return F.cross_entropy(model(batch["features"]), batch["label"])
""")


def write_rows(folder, name: str, count: int, seed: int) -> None:
    """``count`` rows of 8 noisy features whose label (of 3) shifts some of them, as a parquet file."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (count,), generator=generator)
    features = torch.randn(count, 8, generator=generator) + torch.nn.functional.one_hot(labels, 8)
    pq.write_table(pa.table({"features": features.tolist(), "label": labels.tolist()}), folder / name,
                   row_group_size=32)


@pytest.mark.parametrize("kind, extra", [("map", ()),
                                         ("stream", ("data.streaming=true", "data.num_workers=2",
                                                     "train.max_steps=20", "eval.every_steps=12"))])
def test_a_recipe_of_hugging_face_datasets_trains_and_resumes_bitwise(tmp_path, kind, extra):
    """A map-style Dataset (2 epochs of 12 steps), or an IterableDataset whose places are the library's own state
    (20 steps, read ahead by 2 workers): stopped after step 10 and resumed, it ends bitwise as the uninterrupted run."""
    (tmp_path / "rows.py").write_text(DATASETS_RECIPE)
    for number in (0, 1):
        write_rows(tmp_path, f"train{number}.parquet", 96, seed=number)
    write_rows(tmp_path, "eval.parquet", 48, seed=2)
    args = ["recipe=rows.py", "wandb.mode=disabled", *extra]
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    reference = check_ok(launch([*args, "run.dir=reference"], tmp_path, env=env))
    assert ("a stream in 2 parts" if kind == "stream" else "through a DataLoader") in reference.stdout
    stopped = launch([*args, "run.dir=stopped"], tmp_path, env={**env, "INTERRUPT": "0:10:SIGTERM"})
    assert stopped.returncode == 75, stopped.stderr
    check_ok(launch([*args, "run.dir=stopped"], tmp_path, env=env))
    assert_identical(load_weights(tmp_path / "stopped"), load_weights(tmp_path / "reference"))
