"""Data in one process: the epoch's order (held or computed as read), per-sample random numbers seeded by the
sample, batches cut at once, token shards, and a stream's parts and places."""

import random

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

import launcher.data.sampler as sampler_module
from launcher.data.indexed import IndexedTensors, indexed_source
from launcher.data.sampler import Permutation, ResumableDistributedSampler, SeededSamples, globals_kept
from launcher.data.streams import Stream, StreamLoader
from launcher.data.tokens import TokenWindows, write_shards


class Sized:
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n


@pytest.mark.parametrize("n", [2, 5, 1000, 2**20 + 7])
def test_a_computed_permutation_places_every_sample_once(n):
    places = torch.arange(n)
    order = Permutation(n, key=42)(places)
    assert torch.equal(order.sort().values, places)
    if n > 5:
        assert not torch.equal(order, places) and not torch.equal(order, Permutation(n, key=43)(places))


def test_a_large_epochs_order_is_computed_as_read_split_over_ranks_and_resumed(monkeypatch):
    monkeypatch.setattr(sampler_module, "EAGER_ORDER_UP_TO", 100)
    monkeypatch.setattr(sampler_module, "_CHUNK", 7)  # several chunks
    ranks = [ResumableDistributedSampler(Sized(1000), 2, rank, seed=3, global_batch=64) for rank in (0, 1)]
    for ranks_sampler in ranks:
        ranks_sampler.set_epoch(2)
    first, second = list(ranks[0]), list(ranks[1])
    assert len(first) == len(second) == 1000 // 64 * 64 // 2 and not set(first) & set(second)
    assert torch.cat(list(ranks[0].index_batches(32))).tolist() == first
    ranks[0].set_epoch(2, consumed=128)
    assert list(ranks[0]) == first[64:]
    ranks[0].set_epoch(3)
    assert list(ranks[0]) != first


def test_a_samples_random_numbers_are_its_own_whoever_reads_it_and_leave_the_readers_alone():
    class Noisy:
        def __len__(self):
            return 10

        def __getitem__(self, index):
            return torch.rand(1).item(), random.random(), float(np.random.rand())

    sampler = ResumableDistributedSampler(Sized(10), 1, 0, seed=0, global_batch=2, seeded=True)
    sampler.set_epoch(1)
    keys = list(sampler)
    samples = SeededSamples(Noisy())
    torch.manual_seed(5)
    before = torch.rand(1)
    torch.manual_seed(5)
    forward = samples.__getitems__(keys)
    assert torch.equal(torch.rand(1), before)  # the reader's own stream did not move
    backward = samples.__getitems__(list(reversed(keys)))  # another order, as another worker split gives
    assert forward == list(reversed(backward)) and len(set(forward)) == 10
    with globals_kept():
        assert samples[keys[0]] == forward[0]


def test_batches_cut_at_once_are_what_a_dataloader_collates(tmp_path):
    class Config:
        class data:
            resident, resident_share = "auto", 0.25

    tensors = TensorDataset(torch.randn(20, 3), torch.arange(20))
    source = indexed_source(tensors, Config, torch.device("cpu"), "training", None)
    assert isinstance(source, IndexedTensors)
    batch = source.take(torch.tensor([3, 7]))
    assert torch.equal(batch[0], tensors.tensors[0][[3, 7]]) and batch[1].tolist() == [3, 7]
    assert indexed_source(tensors, Config, torch.device("cpu"), "training", collate=lambda samples: samples) is None


def test_token_windows_are_cut_from_shards_without_spanning_two(tmp_path):
    first, second = tmp_path / "a.txt", tmp_path / "b.txt"
    first.write_bytes(bytes(range(100)))
    second.write_bytes(bytes(range(100, 150)))
    meta = write_shards([first, second], tmp_path / "corpus", shard_tokens=64)
    assert [shard["tokens"] for shard in meta["shards"]] == [64, 64, 22] and meta["dtype"] == "uint16"
    windows = TokenWindows(tmp_path / "corpus", context=8)
    assert len(windows) == 7 + 7 + 2  # (64 - 1) // 8 a whole shard, (22 - 1) // 8 the last
    batch = windows.take(torch.tensor([0, 7, 15]))
    assert batch["input_ids"][0].tolist() == list(range(8)) and batch["targets"][0].tolist() == list(range(1, 9))
    assert batch["input_ids"][1].tolist() == list(range(64, 72))  # the second shard's first window
    assert batch["input_ids"][2].tolist() == list(range(136, 144))
    single = windows[15]
    assert torch.equal(single["input_ids"], batch["input_ids"][2])
    assert windows.nbytes == 150 * 2 and windows.to(torch.device("cpu")) is windows


class Numbers(Stream):
    """Shards of consecutive numbers: shard s holds s * 10 ... s * 10 + 9."""

    def shards(self, epoch):
        return list(range(6))

    def read(self, shard, start):
        for offset in range(start, 10):
            yield torch.tensor(shard * 10 + offset)


def test_a_streams_parts_read_every_sample_once_and_continue_from_their_places():
    whole = []
    for rank in (0, 1):
        loader = StreamLoader(Numbers(), rank, 2, 0, batch_size=5, per_step=1, collate=None, seed=0, options={})
        loader.start(0)
        batches = iter(loader)
        whole += [next(batches) for _ in range(6)]  # one epoch: this rank's 3 shards of 10
    assert sorted(torch.cat(whole).tolist()) == list(range(60))
    loader = StreamLoader(Numbers(), 0, 2, 0, batch_size=5, per_step=1, collate=None, seed=0, options={})
    loader.start(0)
    batches = iter(loader)
    read = [next(batches).tolist() for _ in range(3)]
    state = loader.state_dict(steps=2)  # a batch read ahead, not trained on
    resumed = StreamLoader(Numbers(), 0, 2, 0, batch_size=5, per_step=1, collate=None, seed=0, options={})
    assert resumed.load_state_dict([state, None], rank=0) is None
    resumed.start(2)
    assert next(iter(resumed)).tolist() == read[2]
    other = StreamLoader(Numbers(), 0, 3, 0, batch_size=5, per_step=1, collate=None, seed=0, options={})
    assert "every part starts epoch 1 of the stream again" in other.load_state_dict([state, None], rank=0)
