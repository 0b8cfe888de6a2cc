"""Hugging Face ``datasets`` as training sets: a ``Dataset`` is map-style as it is; an ``IterableDataset`` a stream.

A ``datasets.Dataset`` (``with_format("torch")``: rows of tensors) has ``__getitem__`` and ``__len__``, so the
engine's sampler and DataLoader read it like any map-style data set, a sample at a time with its own seed
(data/sampler.py): exact on resume with nothing of the library's to save.

A ``datasets.IterableDataset`` becomes a ``Stream`` (data/streams.py) whose shards are its data sources (its files;
``reshard()`` splits parquet files by row group), read as ``dataset.shard(num_shards, index)``. The engine splits them
over processes x DataLoader workers and saves each part's place after the last batch trained on, as for any stream:
``datasets.distributed.split_dataset_by_node`` and the data set's own ``state_dict()`` would place a process's reading,
not a DataLoader worker's, nor the batches read ahead but not yet trained on. Within a shard the place is the
library's own: its ``state_dict()`` after each sample, which a resume gives back to ``load_state_dict`` (skipping
whole record batches, and a ``map``'s input rows without mapping them). A shuffle buffer (``shuffle()``) is in no
state, so a data set with one is read again from the shard's start to the place instead (``skip``), which comes to
the same sample, the buffer filled as before.
"""

from __future__ import annotations

import warnings

from launcher.data.streams import Stream


def is_iterable_dataset(dataset) -> bool:
    """Whether ``dataset`` is a ``datasets.IterableDataset`` (without importing the library for any other)."""
    kind = type(dataset)
    return kind.__name__ == "IterableDataset" and kind.__module__.startswith("datasets.")


class DatasetsStream(Stream):
    """A ``datasets.IterableDataset`` read as a stream: shard ``i`` is its ``shard(num_shards, i)``, in order."""

    def __init__(self, dataset):
        self.dataset = dataset
        self.stateful = not _shuffles(dataset)

    def shards(self, epoch: int) -> list[int]:
        return list(range(self.dataset.num_shards))

    def read(self, shard: int, start: int, state: dict | None = None):
        """The shard's rows from its ``start``-th on, or from ``state`` (what ``state_dict`` said there)."""
        piece = self.dataset.shard(num_shards=self.dataset.num_shards, index=shard, contiguous=True)
        if state is not None:
            piece.load_state_dict(state)
        elif start:
            piece = piece.skip(start)
        return _PlacedRows(piece) if self.stateful else _Rows(piece)


class _Rows:
    """A shard's rows, one at a time."""

    def __init__(self, piece):
        self.piece = piece
        # Batches of one, not the data set's own iteration: in a DataLoader worker that splits the (one) shard
        # again among the workers, and gives the others none.
        self.batches = piece.iter(batch_size=1)

    def __iter__(self):
        return self

    def __next__(self):
        with warnings.catch_warnings():  # datasets' iter() makes a map's tensors tensors again, saying so each time
            warnings.filterwarnings("ignore", "To copy construct from a tensor")
            return _first(next(self.batches))


class _PlacedRows(_Rows):
    """A shard's rows, and the library's place after the last one given."""

    def state_dict(self) -> dict:
        return self.piece.state_dict()


def _first(batch):
    """The one row of a batch of one: each column's first value (a nested column's, column by column)."""
    if isinstance(batch, dict):
        return {key: _first(value) for key, value in batch.items()}
    return batch[0]


def _shuffles(dataset) -> bool:
    """Whether the data set's pipeline has a shuffle buffer, or may have (one the library's layout hides)."""
    found = [getattr(dataset, "_ex_iterable", None)]
    if found[0] is None:
        return True
    while found:
        stage = found.pop()
        if type(stage).__name__ == "BufferShuffledExamplesIterable":
            return True
        found += [getattr(stage, "ex_iterable", None), *getattr(stage, "ex_iterables", [])]
        found = [stage for stage in found if stage is not None]
    return False
