"""Streams: training data read in order from shards (files, parts of a corpus) rather than by index.

The contract (README, "Streams"): a recipe's training set may be an ``IterableDataset`` with

- ``shards(epoch)``: the epoch's shards in the order to read them, the same list on every rank (file paths,
  shuffled by the epoch if it likes);
- ``read(shard, start)``: the shard's samples from its ``start``-th on.

The engine splits the work: of the job's ``parts`` (ranks x DataLoader workers, a worker's own), part ``p`` reads
shards ``p, p + parts, ...`` of each epoch, in order, and then goes on with the next epoch's. No sample is read twice
or skipped within an epoch. A batch carries its part's place after it (epoch, shard, sample); the place after the
last batch trained on is saved with the checkpoint, so a resume reads on from exactly there. Each sample's random
numbers are seeded by its place, as for map-style data (data/sampler.py).
"""

from __future__ import annotations

from collections import deque

from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torch.utils.data._utils.collate import default_collate

from launcher.data.sampler import globals_kept, sample_seed, seed_globals
from launcher.errors import UserError


class Stream(IterableDataset):
    """A base for streams: define ``shards`` and ``read``; iterating it alone reads epoch 1's shards in order."""

    def shards(self, epoch: int) -> list:
        raise NotImplementedError

    def read(self, shard, start: int):
        raise NotImplementedError

    def __iter__(self):
        for shard in self.shards(1):
            yield from self.read(shard, 0)


def is_stream(dataset) -> bool:
    return isinstance(dataset, IterableDataset)


def first_sample(dataset):
    """A data set's first sample (a stream's: its first shard's), for the model summary."""
    if is_stream(dataset):
        return next(iter(dataset.read(dataset.shards(1)[0], 0)))
    return dataset[0]


def check_stream(dataset, parts: int) -> None:
    """Fail in one line when ``dataset`` is not a stream the engine can split over ``parts`` parts."""
    missing = [name for name in ("shards", "read") if not callable(getattr(dataset, name, None))]
    if missing:
        raise UserError(f"the recipe's training set is an IterableDataset without {' and '.join(missing)}: a stream "
                        "needs shards(epoch) and read(shard, start) so that ranks and workers can split it and a "
                        "resume can continue it (README, Streams)", same_on_all_ranks=True)
    count = len(dataset.shards(1))
    if count < parts:
        raise UserError(f"the stream has {count} shards for {parts} parts (processes x data.num_workers, at least 1 "
                        "each): give it at least as many shards, or use fewer workers", same_on_all_ranks=True)


class _Part(IterableDataset):
    """The batches of one of a rank's parts, in a DataLoader worker (or the process itself).

    A DataLoader takes its batches from its workers in turn, starting with worker 0; the rank's ``k`` parts must
    take turns in the same order however many batches came before (a resume), so worker ``w`` reads the rank's part
    ``(w + rotation) % k``, where ``rotation`` is the number of batches read before, modulo ``k``.
    """

    def __init__(self, stream, rank: int, world_size: int, workers: int, batch_size: int, collate, seed: int):
        self.stream, self.rank, self.world_size = stream, rank, world_size
        self.per_rank = max(1, workers)
        self.batch_size, self.collate, self.seed = batch_size, collate or default_collate, seed
        self.places: dict[int, tuple[int, int, int]] = {}  # rank's part -> (epoch, shard in the part's list, sample)
        self.rotation = 0

    def __iter__(self):
        info = get_worker_info()
        mine = ((info.id if info else 0) + self.rotation) % self.per_rank  # which of the rank's parts
        parts, part = self.world_size * self.per_rank, self.rank * self.per_rank + mine
        epoch, shard_number, start = self.places.get(mine, (1, 0, 0))
        samples = iter(self._samples(part, parts, epoch, shard_number, start))
        while True:
            with globals_kept():  # in the training process the generators are the model's
                batch, place = [], None
                for sample, place in samples:
                    batch.append(sample)
                    if len(batch) == self.batch_size:
                        break
                collated = self.collate(batch)
            yield collated, mine, place

    def _samples(self, part: int, parts: int, epoch: int, shard_number: int, start: int):
        """(sample, its place after it) for ever: this part's shards of each epoch, from the given place on."""
        while True:
            shards = self.stream.shards(epoch)
            for number in range(shard_number, len(shards[part::parts])):
                place_in_epoch = part + number * parts  # the shard's place in the epoch's list, whatever the split
                for offset, sample in enumerate(self.stream.read(shards[place_in_epoch], start), start):
                    seed_globals(sample_seed(self.seed, epoch, place_in_epoch * 2**32 + offset))
                    yield sample, (epoch, number, offset + 1)
                start = 0
            epoch, shard_number = epoch + 1, 0


class StreamLoader:
    """One rank's batches of a stream, and its parts' places as of the last batch trained on.

    A batch's place is known when it is read, but a checkpoint wants the place of the last one trained on: the
    loader keeps the places of batches read ahead (by the DataLoader's workers, or the next batch copied to a GPU
    early) until ``state_dict`` is told how many were trained.
    """

    def __init__(self, stream, rank: int, world_size: int, workers: int, batch_size: int, per_step: int, collate,
                 seed: int, options: dict):
        self.part = _Part(stream, rank, world_size, workers, batch_size, collate, seed)
        self.parts, self.per_step = world_size * self.part.per_rank, per_step  # batches (micro-batches) a step
        self.num_workers, self.options = workers, options
        self.read_ahead: deque = deque()  # (batch number, part, place) of batches read and not yet trained on
        self.batches_read = 0

    def __iter__(self):
        self.part.rotation = self.batches_read % self.part.per_rank
        loader = DataLoader(self.part, batch_size=None, num_workers=self.num_workers, **self.options)
        for batch, part, place in loader:
            self.read_ahead.append((self.batches_read, part, place))
            self.batches_read += 1
            yield batch

    def start(self, steps: int) -> None:
        """Read on from the places saved (``load_state_dict``), ``steps`` optimizer steps into the run."""
        self.read_ahead.clear()
        self.batches_read = steps * self.per_step

    def state_dict(self, steps: int) -> dict:
        """The parts' places once ``steps`` optimizer steps of the run were trained."""
        trained = steps * self.per_step
        while self.read_ahead and self.read_ahead[0][0] < trained:
            _, part, place = self.read_ahead.popleft()
            self.part.places[part] = place
        return {"parts": self.parts, "places": dict(self.part.places)}

    def load_state_dict(self, rank_states: list[dict | None], rank: int) -> str | None:
        """Read on from where the checkpoint's parts stopped.

        On another number of parts (processes x workers) every part starts again at the earliest epoch any part was
        in; what to say about it is returned, for rank 0 to log.
        """
        states = [state for state in rank_states if state]
        mine = rank_states[rank] if rank < len(rank_states) else None
        if mine and mine["parts"] == self.parts:
            self.part.places = {int(part): tuple(place) for part, place in mine["places"].items()}
            return None
        epoch = min((place[0] for state in states for place in state["places"].values()), default=1)
        self.part.places = {part: (epoch, 0, 0) for part in range(self.part.per_rank)}
        saved_parts = states[0]["parts"] if states else 0
        return (f"the stream was read in {saved_parts} parts and is now read in {self.parts} (processes x workers): "
                f"its place cannot be carried over, so every part starts epoch {epoch} of the stream again")
