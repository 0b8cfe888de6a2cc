"""Data in one process: the epoch's order (held or computed as read), per-sample random numbers seeded by the
sample, batches cut at once, token shards, and a stream's parts and places."""

import itertools
import random
import threading

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import launcher.data.sampler as sampler_module
from launcher.cli.tokens import main as tokens_main
from launcher.data.indexed import IndexedTensors, indexed_source
from launcher.data.sampler import Permutation, ResumableDistributedSampler, SeededSamples, globals_kept
from launcher.data.streams import Stream, StreamLoader, first_sample
from launcher.data.tokens import TokenWindows, write_shards
from launcher.errors import UserError, from_loader_worker


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


class Drawing(Stream):
    """Numbers with noise drawn inside ``read``, at each sample and once when a shard is opened."""

    def __init__(self, shards=4, per_shard=6, empty=()):
        self.count, self.per_shard, self.empty = shards, per_shard, empty

    def shards(self, epoch):
        return list(range(self.count))

    def read(self, shard, start):
        if shard in self.empty:
            return
        for offset in range(start, self.per_shard):
            yield torch.tensor([shard * 10.0 + offset, torch.rand(()).item()])


def stream_loader(stream, rank=0, world_size=1, batch_size=3):
    loader = StreamLoader(stream, rank, world_size, 0, batch_size=batch_size, per_step=1, collate=None, seed=0,
                          options={})
    loader.start(0)
    return loader


def test_a_streamed_sample_draws_from_its_own_seed_whatever_was_read_before_it():
    whole = torch.cat(list(itertools.islice(iter(stream_loader(Drawing())), 8)))
    later = StreamLoader(Drawing(), 0, 1, 0, batch_size=3, per_step=1, collate=None, seed=0, options={})
    later.load_state_dict([{"parts": 1, "per_rank": 1, "places": {0: (1, 0, 4)}}], rank=0)  # from sample 4 of shard 0
    later.start(0)
    assert torch.equal(next(iter(later)), whole[4:7])  # noise included: seeded before read makes the sample


def test_a_streams_parts_keep_their_places_when_split_otherwise():
    states = []
    for rank in (0, 1):  # 2 processes x 1 part, each 1 batch into its shards
        loader = stream_loader(Drawing(), rank, 2)
        next(iter(loader))
        states.append(loader.state_dict(steps=1))
    alone = StreamLoader(Drawing(), 0, 1, 2, batch_size=3, per_step=1, collate=None, seed=0, options={})
    note = alone.load_state_dict(states, rank=0)  # 1 process x 2 workers: the same 2 parts
    assert "parts read on from their places, now split over 1 process(es) x 2 part(s)" in note
    assert alone.part.places == {0: (1, 0, 3), 1: (1, 0, 3)}


def test_a_stream_part_without_samples_is_one_line_not_a_spin():
    raised = []

    def first_batch():
        try:
            next(iter(stream_loader(Drawing(empty=(1, 3)), rank=1, world_size=2)))
        except UserError as error:
            raised.append(str(error))

    reader = threading.Thread(target=first_batch, daemon=True)
    reader.start()
    reader.join(timeout=30)  # a part that spins over epochs for ever would hold the test
    assert raised and "part 1 of the stream's 2 (processes x workers) found no sample in its shards of epoch 1" in (
        raised[0])
    # The model summary's sample is the first a shard gives.
    assert first_sample(Drawing(empty=(0,)))[0].item() == 10.0
    with pytest.raises(UserError, match="holds no sample"):
        first_sample(Drawing(empty=(0, 1, 2, 3)))


def test_an_error_in_a_dataloader_worker_reads_as_the_process_would_say_it():
    try:
        next(iter(DataLoader(Failing(), num_workers=1)))
    except Exception as error:
        said = from_loader_worker(error)
    assert isinstance(said, UserError)
    assert str(said).startswith("OSError: cannot read sample 3: disk on fire\nraised at (most recent call last), in a "
                                "DataLoader worker:\n  File ")
    assert "in __getitem__" in str(said) and "torch" not in str(said)
    try:
        next(iter(DataLoader(Failing(UserError("a line of ours")), num_workers=1)))
    except Exception as error:
        said = from_loader_worker(error)
    assert type(said) is UserError and str(said) == "a line of ours"


class Failing(torch.utils.data.Dataset):
    def __init__(self, error=None):
        self.error = error

    def __len__(self):
        return 8

    def __getitem__(self, index):
        raise self.error or OSError("cannot read sample 3: disk on fire")


def test_the_token_command_refuses_what_it_cannot_do_in_one_line(tmp_path, capsys):
    text = tmp_path / "a.txt"
    text.write_bytes(b"hello world" * 10)
    assert tokens_main(["--out", str(tmp_path / "c"), "--shard-tokens", "0", "--eval-every", "0", str(text)]) == 2
    assert tokens_main(["--out", str(text), str(text)]) == 2
    assert tokens_main(["--out", str(tmp_path / "c"), str(text)]) == 2  # one file: nothing left for train/
    errors = capsys.readouterr().err
    assert "0 tokens a shard" in errors and "is a file" in errors and "1 file(s) cannot be split" in errors
    (tmp_path / "b.txt").write_bytes(b"more text" * 10)
    assert tokens_main(["--out", str(tmp_path / "tok"), "--eval-every", "2", str(tmp_path)]) == 0
    again = tokens_main(["--out", str(tmp_path / "tok"), "--eval-every", "2", str(tmp_path)])  # not its own shards
    assert again == 0 and TokenWindows(tmp_path / "tok" / "train", 4).nbytes == 90 * 2
    (tmp_path / "tok" / "train" / "tokens.json").write_text('{"dtype": "int8", "shards": []}')
    with pytest.raises(UserError, match="is not a token corpus's description"):
        TokenWindows(tmp_path / "tok" / "train", 4)


def test_a_resident_corpus_takes_on_the_device_what_it_takes_on_disk(tmp_path):
    (tmp_path / "c").mkdir()
    np.array([40000, 1, 65535, 2, 3], dtype=np.uint16).tofile(tmp_path / "c" / "shard_00000.bin")
    (tmp_path / "c" / "tokens.json").write_text(
        '{"dtype": "uint16", "vocab": 65536, "tokenizer": "x", "shards": [{"file": "shard_00000.bin", "tokens": 5}]}')
    windows = TokenWindows(tmp_path / "c", context=2)
    on_meta = windows.to(torch.device("meta"))
    assert on_meta.on_device.dtype == torch.int16 and on_meta.on_device.nbytes == windows.nbytes == 10
    resident = windows.to(torch.device("meta"))  # indexes the same way on any device: check it on the CPU
    resident.on_device = torch.from_numpy(np.array([40000, 1, 65535, 2, 3], dtype=np.uint16).view(np.int16))
    resident.first_window, resident.shard_starts = windows.first_window, windows.shard_starts
    assert resident.take(torch.tensor([0, 1]))["input_ids"].tolist() == [[40000, 1], [65535, 2]]
