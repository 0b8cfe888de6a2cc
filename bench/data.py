"""Data paths alone, without a model step: how fast each makes batches, and how much memory a token corpus costs.

    python bench/data.py paths     # samples/s of each path, beside the step it feeds
    python bench/data.py memory    # resident memory of token shards against corpus size (written, then removed)

``paths``: the gpt recipe's windows through a DataLoader (a ``__getitem__`` and a collation a sample, as before
#24) and cut at once (``take``); an mlp-sized TensorDataset through a DataLoader and indexed; token shards cut from
memory maps. Each beside the time of the training step it feeds (forward, backward, optimizer), so its share of a
step shows. ``memory``: corpora of ``--sizes`` GB of uint16 tokens in 0.5 GB shards; in a fresh process, windows of
a whole epoch's order read batch by batch; resident memory (anonymous and file-backed) after ``--batches`` batches.
Every case prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launcher.data.indexed import IndexedLoader, IndexedTensors  # noqa: E402
from launcher.data.sampler import ResumableDistributedSampler  # noqa: E402
from launcher.data.tokens import META, TokenWindows  # noqa: E402

SECONDS = 3.0  # each path's timing (--seconds)


def samples_per_s(batches) -> float:
    """Samples a second drawn from the iterable of batches ``batches`` (a fresh iterator) over about ``SECONDS``."""
    count, began = 0, time.perf_counter()
    for batch in batches:
        first = batch["input_ids"] if isinstance(batch, dict) else batch[0]
        count += len(first)
        if time.perf_counter() - began > SECONDS:
            break
    return count / (time.perf_counter() - began)


def step_seconds(model, batch, loss, repeats: int = 20) -> float:
    """Seconds of one training step (forward, backward, SGD) on ``batch``."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for i in range(repeats + 3):
        if i == 3:
            began = time.perf_counter()
        optimizer.zero_grad()
        loss(model, batch).backward()
        optimizer.step()
    return (time.perf_counter() - began) / repeats


def sampler(n: int, batch: int) -> ResumableDistributedSampler:
    order = ResumableDistributedSampler(range(n), 1, 0, seed=0, global_batch=batch)
    order.set_epoch(1)
    return order


def paths(corpus_gb: float) -> None:
    from launcher.recipes import gpt, mlp

    cfg = _config("gpt")
    train, _ = gpt.build_datasets(cfg)
    batch = cfg.train.batch_size
    loader = torch.utils.data.DataLoader(train, batch_size=batch, sampler=sampler(len(train), batch))
    indexed = IndexedLoader(train, train, batch_size=batch, sampler=sampler(len(train), batch))
    model = gpt.build_model(cfg)
    step = step_seconds(model, next(iter(indexed)), lambda m, b: gpt.step(m, b)[0])
    for path, batches in (("dataloader, a sample at a time", loader), ("take, a batch at once", indexed)):
        _emit(data="gpt windows", path=path, samples_per_s=samples_per_s(batches), batch=batch,
              step_s=step, step_samples_per_s=batch / step)
    images = torch.randn(60_000, 1, 28, 28)
    labels = torch.randint(0, 10, (60_000,))
    tensors, batch = torch.utils.data.TensorDataset(images, labels), 256
    model = mlp.build_model(_config("mlp"))
    step = step_seconds(model, (images[:batch], labels[:batch]),
                        lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1]))
    loader = torch.utils.data.DataLoader(tensors, batch_size=batch, sampler=sampler(len(tensors), batch))
    indexed = IndexedLoader(tensors, IndexedTensors(tensors.tensors), batch_size=batch,
                            sampler=sampler(len(tensors), batch))
    for path, batches in (("dataloader, a sample at a time", loader), ("indexed, a batch at once", indexed)):
        _emit(data="mlp TensorDataset", path=path, samples_per_s=samples_per_s(batches), batch=batch,
              step_s=step, step_samples_per_s=batch / step)
    with tempfile.TemporaryDirectory() as folder:
        _write_corpus(Path(folder), gigabytes=corpus_gb, shard_gb=corpus_gb / 2)
        windows = TokenWindows(Path(folder), context=64)
        indexed = IndexedLoader(windows, windows, batch_size=32, sampler=sampler(len(windows), 32))
        _emit(data="token shards (memory maps)", path="take, a batch at once", samples_per_s=samples_per_s(indexed),
              batch=32)


def memory(sizes: list[float], batches: int, context: int) -> None:
    for gigabytes in sizes:
        with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as folder:
            _write_corpus(Path(folder), gigabytes, shard_gb=0.5)
            result = subprocess.run([sys.executable, __file__, "_read", folder, str(batches), str(context)],
                                    check=True, capture_output=True, text=True)
            _emit(corpus_gb=gigabytes, **json.loads(result.stdout))


def _read(folder: str, batches: int, context: int) -> None:
    """In a fresh process: windows of an epoch's order, batch by batch; resident memory before and after."""
    before = _memory()
    windows = TokenWindows(Path(folder), context)
    loader = IndexedLoader(windows, windows, batch_size=64, sampler=sampler(len(windows), 64))
    began = time.perf_counter()
    for number, _ in enumerate(loader, 1):
        if number == batches:
            break
    seconds = time.perf_counter() - began
    after = _memory()
    print(json.dumps({"windows": len(windows), "batches": batches, "batches_per_s": batches / seconds,
                      **{f"{key}_before_mb": value for key, value in before.items()},
                      **{f"{key}_after_mb": value for key, value in after.items()}}))


def _memory() -> dict:
    """This process's resident memory, MB: anonymous (its own) and file-backed (mapped files' pages), and the peak."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {key.lower(): int(fields[key].split()[0]) / 1024 for key in ("RssAnon", "RssFile", "VmHWM")}


def _write_corpus(folder: Path, gigabytes: float, shard_gb: float) -> None:
    """Random uint16 tokens in shards of ``shard_gb`` GB, and tokens.json, as python -m launcher.tokens writes."""
    total, per_shard, shards = int(gigabytes * 2**30 / 2), int(shard_gb * 2**30 / 2), []
    generator = np.random.default_rng(0)
    while total > 0:
        tokens = min(per_shard, total)
        name = f"shard_{len(shards):05d}.bin"
        with open(folder / name, "wb") as file:
            for start in range(0, tokens, 2**24):
                generator.integers(0, 256, min(2**24, tokens - start), dtype=np.uint16).tofile(file)
        shards.append({"file": name, "tokens": tokens})
        total -= tokens
    (folder / META).write_text(json.dumps({"dtype": "uint16", "vocab": 256, "tokenizer": "bytes", "shards": shards}))


def _config(recipe: str):
    from launcher.cli.main import load

    return load([f"recipe={recipe}"])[2]


def _emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


def main() -> None:
    global SECONDS
    if sys.argv[1:2] == ["_read"]:
        _read(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("case", choices=("paths", "memory"))
    parser.add_argument("--sizes", type=float, nargs="+", default=[0.5, 1, 2, 4], help="corpus sizes, GB")
    parser.add_argument("--batches", type=int, default=500, help="batches read of each corpus")
    parser.add_argument("--context", type=int, default=1024, help="window length, tokens")
    parser.add_argument("--seconds", type=float, default=3.0, help="paths: seconds each path is timed")
    parser.add_argument("--corpus-gb", type=float, default=0.25, help="paths: the token corpus's size, GB")
    args = parser.parse_args()
    torch.set_num_threads(1)
    SECONDS = args.seconds
    if args.case == "paths":
        paths(args.corpus_gb)
    else:
        memory(args.sizes, args.batches, args.context)


if __name__ == "__main__":
    main()
