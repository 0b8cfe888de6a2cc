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

``read`` may return an iterator with a ``state_dict()`` of its own (a ``datasets`` pipeline's place,
data/hf_datasets.py): the engine keeps it with the place, and a resume hands it back as ``read(shard, start, state)``.
A ``datasets.IterableDataset`` is read through that adapter.
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


def as_stream(dataset):
    """``dataset`` as the engine reads a stream: a ``datasets.IterableDataset`` adapted, any other as it is."""
    from launcher.data.hf_datasets import DatasetsStream, is_iterable_dataset

    return DatasetsStream(dataset) if is_iterable_dataset(dataset) else dataset


def first_sample(dataset):
    """A data set's first sample (a stream's: the first of its epoch-1 shards that holds one), for the model summary.

    Call ``check_stream`` first.
    """
    if not is_stream(dataset):
        return dataset[0]
    dataset = as_stream(dataset)
    for shard in dataset.shards(1):
        for sample in dataset.read(shard, 0):
            return sample
    raise UserError("the recipe's stream holds no sample: none of its epoch-1 shards gives one (is data.root right?)",
                    same_on_all_ranks=True)


def check_stream(dataset, parts: int) -> None:
    """Fail in one line when ``dataset`` is not a stream the engine can split over ``parts`` parts."""
    from launcher.data.hf_datasets import DatasetsStream

    dataset = as_stream(dataset)
    missing = [name for name in ("shards", "read") if not callable(getattr(dataset, name, None))]
    if missing:
        raise UserError(f"the recipe's training set is an IterableDataset without {' and '.join(missing)}: a stream "
                        "needs shards(epoch) and read(shard, start) so that ranks and workers can split it and a "
                        "resume can continue it (README, Streams)", same_on_all_ranks=True)
    count = len(dataset.shards(1))
    if count == 0:
        raise UserError("the recipe's stream has no shards: shards(1) is empty (is data.root right?)",
                        same_on_all_ranks=True)
    if count < parts:
        hint = (" (a datasets.IterableDataset's are its files: reshard() splits parquet files by row group)"
                if isinstance(dataset, DatasetsStream) else "")
        raise UserError(f"the stream has {count} shards for {parts} parts (processes x data.num_workers, at least 1 "
                        f"each): give it at least as many shards{hint}, or use fewer workers", same_on_all_ranks=True)


class _Part(IterableDataset):
    """The batches of one of a rank's parts, in a DataLoader worker (or the process itself).

    A DataLoader takes its batches from its workers in turn, starting with worker 0; the rank's ``k`` parts must
    take turns in the same order however many batches came before (a resume), so worker ``w`` reads the rank's part
    ``(w + rotation) % k``, where ``rotation`` is the number of batches read before, modulo ``k``.
    """

    def __init__(self, stream, rank: int, world_size: int, workers: int, batch_size: int, collate, seed: int):
        self.stream, self.rank, self.world_size = as_stream(stream), rank, world_size
        self.per_rank = max(1, workers)
        self.batch_size, self.collate, self.seed = batch_size, collate or default_collate, seed
        # The job's part -> (epoch, shard in the part's list, sample): the places a checkpoint keeps.
        self.places: dict[int, tuple[int, int, int]] = {}
        self.rotation = 0

    def __iter__(self):
        info = get_worker_info()
        mine = ((info.id if info else 0) + self.rotation) % self.per_rank  # which of the rank's parts
        parts, part = self.world_size * self.per_rank, self.rank * self.per_rank + mine
        epoch, shard_number, start, *state = self.places.get(part, (1, 0, 0))
        samples = iter(self._samples(part, parts, epoch, shard_number, start, *state))
        while True:
            with globals_kept():  # in the training process the generators are the model's
                batch, place = [], None
                for sample, place in samples:
                    batch.append(sample)
                    if len(batch) == self.batch_size:
                        break
                collated = self.collate(batch)
            yield collated, part, place

    def _samples(self, part: int, parts: int, epoch: int, shard_number: int, start: int, state=None):
        """(sample, its place after it) for ever: this part's shards of each epoch, from the given place on.

        Each sample is read with the generators seeded by its place (before ``read`` makes it: a transform inside
        ``read`` draws its own numbers, wherever the part is read and whatever was read before). A reader with a
        ``state_dict`` adds it to the place, and ``state`` (the saved one) resumes the first shard from it.
        """
        while True:
            shards, found = self.stream.shards(epoch), False
            for number in range(shard_number, len(shards[part::parts])):
                place_in_epoch = part + number * parts  # the shard's place in the epoch's list, whatever the split
                resumed = () if state is None else (state,)
                reader = self.stream.read(shards[place_in_epoch], start, *resumed)
                samples, offset, own_place = iter(reader), start, getattr(reader, "state_dict", None)
                while True:
                    seed_globals(sample_seed(self.seed, epoch, place_in_epoch * 2**32 + offset))
                    try:
                        sample = next(samples)
                    except StopIteration:
                        break
                    found, offset = True, offset + 1
                    yield sample, (epoch, number, offset) if own_place is None else (epoch, number, offset, own_place())
                start, state = 0, None
            if not found and shard_number == 0:  # a whole epoch without a sample: every later one may be alike
                raise UserError(f"part {part} of the stream's {parts} (processes x workers) found no sample in its "
                                f"shards of epoch {epoch} (numbers {part}, {part + parts}, ... of shards(epoch)): give "
                                "the stream more shards that hold samples, or use fewer workers or processes")
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
        mine = range(self.part.rank * self.part.per_rank, (self.part.rank + 1) * self.part.per_rank)
        return {"parts": self.parts, "per_rank": self.part.per_rank,
                "places": {part: place for part, place in self.part.places.items() if part in mine}}

    def load_state_dict(self, rank_states: list[dict | None], rank: int) -> str | None:
        """Read on from where the checkpoint's parts stopped; what to say about it, for rank 0 to log, or None.

        With as many parts as before, each part reads on from its place, however the parts are now split over
        processes and workers (then the steps group the parts' batches otherwise). On another number of parts every
        part starts again at the earliest epoch any part was in.
        """
        states = [state for state in rank_states if state]
        saved_parts = states[0]["parts"] if states else 0
        if saved_parts == self.parts:
            self.part.places = {part: tuple(place) for number, state in enumerate(rank_states) if state
                                for part, place in _job_places(state, number, len(rank_states)).items()}
            split = [(state.get("per_rank"), len(rank_states)) for state in states][:1]
            if split == [(self.part.per_rank, self.part.world_size)]:
                return None
            return (f"the stream's {self.parts} parts read on from their places, now split over "
                    f"{self.part.world_size} process(es) x {self.part.per_rank} part(s) each: no sample is read twice "
                    "or skipped, but the steps group the parts' batches otherwise than an uninterrupted run")
        epoch = min((place[0] for state in states for place in state["places"].values()), default=1)
        self.part.places = {part: (epoch, 0, 0) for part in range(self.parts)}
        return (f"the stream was read in {saved_parts} parts and is now read in {self.parts} (processes x workers): "
                f"its place cannot be carried over, so every part starts epoch {epoch} of the stream again")


def _job_places(state: dict, rank: int, ranks: int) -> dict[int, list]:
    """A rank's saved places by the job's part number (a checkpoint without ``per_rank`` numbered the rank's own)."""
    places = {int(part): place for part, place in state["places"].items()}
    if "per_rank" in state:
        return places
    per_rank = state["parts"] // ranks
    return {rank * per_rank + part: place for part, place in places.items()}
