"""The gpt recipe's model trained on a stream: text files read one after another, window by window, never indexed.

    torchrun --standalone --nproc_per_node 2 -m launcher recipe=stream
    torchrun --standalone --nproc_per_node 2 -m launcher recipe=stream data.folder=~/corpus 'data.glob="*.txt"'

A stream (README, "Streams") is how data that is not a list of samples reaches the engine: files of any number and
size, a generator over a database, a reader of remote shards. This one's shards are the files (by default the
standard library's ``.py`` files the gpt recipe trains on, every 10th kept for evaluation), in an order shuffled by
the epoch; ``read`` cuts a file into windows of ``model.context + 1`` bytes from a given window on, which is all a
resume needs. The engine splits the files over processes and data-loader workers, saves where each stopped, and
reads on from there. A stream has no length: it trains ``train.max_steps`` steps, evaluating every
``eval.every_steps``.
"""

import random
from pathlib import Path

import torch

from launcher.data.streams import Stream
from launcher.recipes import gpt
from launcher.recipes.gpt import (  # noqa: F401
    blocks,
    build_model,
    metrics,
    param_groups,
    samples,
    step,
    tokens_per_sample,
    tp_plan,
)

DEFAULTS = {
    **gpt.DEFAULTS,
    "train": {**gpt.DEFAULTS["train"], "max_steps": 600},
    "eval": {**gpt.DEFAULTS["eval"], "every_steps": 200},
    "ckpt": {"every_steps": 200},
    # folder: the text files' folder ('': the standard library's), glob: which of its files
    "data": {"folder": "", "glob": "*.py", "eval_bytes": 65_000},
}


class FileWindows(Stream):
    """Every file a shard; a file's samples are its windows of ``length + 1`` bytes, as {input_ids, targets}."""

    def __init__(self, files: list[Path], length: int, seed: int):
        self.files, self.length, self.seed = files, length, seed

    def shards(self, epoch: int) -> list[Path]:
        order = list(self.files)
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def read(self, shard: Path, start: int):
        data = torch.frombuffer(bytearray(shard.read_bytes()), dtype=torch.uint8)
        for window in range(start, (len(data) - 1) // self.length):
            cut = data[window * self.length : (window + 1) * self.length + 1].long()
            yield {"input_ids": cut[:-1], "targets": cut[1:]}


def text_files(cfg) -> list[Path]:
    """The stream's files: ``data.folder``'s matching ``data.glob``, else the standard library's sources."""
    if not cfg.data.folder:
        return gpt.stdlib_sources()
    files = sorted(path for path in Path(cfg.data.folder).expanduser().rglob(cfg.data.glob) if path.is_file())
    if not files:
        raise ValueError(f"no files matching {cfg.data.glob} under data.folder={cfg.data.folder}")
    return files


def build_datasets(cfg):
    files = text_files(cfg)
    train = [path for i, path in enumerate(files) if i % 10]
    evaluation = [path for i, path in enumerate(files) if i % 10 == 0]
    context = cfg.model.context
    return (FileWindows(train, context, cfg.train.seed),
            gpt.ByteWindows(gpt.corpus(evaluation, cfg.data.eval_bytes), context))
