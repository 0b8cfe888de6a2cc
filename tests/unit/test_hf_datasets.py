"""Hugging Face datasets in one process, from parquet files the tests write: a map-style Dataset through the seeded
sampler, and an IterableDataset as a stream whose places are the library's own state (or, with a shuffle buffer, a
count of rows)."""

import itertools

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch.utils.data import DataLoader

from launcher.data.hf_datasets import DatasetsStream
from launcher.data.sampler import ResumableDistributedSampler, SeededSamples
from launcher.data.streams import StreamLoader, check_stream, first_sample
from launcher.errors import UserError

datasets = pytest.importorskip("datasets")


@pytest.fixture
def parquet_files(tmp_path, monkeypatch):
    """Two parquet files of 40 numbered rows each (features of 3, a label), in row groups of 16."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    files = []
    for number in range(2):
        rows = range(number * 40, number * 40 + 40)
        table = pa.table({"number": list(rows), "features": [[row / 10, -row / 10, 1.0] for row in rows],
                          "label": [row % 3 for row in rows]})
        files.append(str(tmp_path / f"part{number}.parquet"))
        pq.write_table(table, files[-1], row_group_size=16)
    return files


def streamed(files, shuffled=False):
    stream = datasets.load_dataset("parquet", data_files=files, split="train", streaming=True)
    stream = stream.map(lambda row: {"twice": row["number"] * 2})  # a pipeline, not the files alone
    if shuffled:
        stream = stream.shuffle(seed=5, buffer_size=8, max_buffer_input_shards=1)  # shards are read one by one anyway
    return stream.with_format("torch")


def loader(stream, rank=0, world_size=1, workers=0):
    made = StreamLoader(stream, rank, world_size, workers, batch_size=5, per_step=1, collate=None, seed=0, options={})
    made.start(0)
    return made


def test_a_map_style_dataset_reads_through_the_seeded_sampler_and_a_resumed_epoch_continues_exactly(parquet_files,
                                                                                                      tmp_path):
    rows = datasets.load_dataset("parquet", data_files=parquet_files, split="train", cache_dir=str(tmp_path / "c"))
    rows = rows.with_format("torch")

    def batches(consumed, workers):
        sampler = ResumableDistributedSampler(rows, 1, 0, seed=3, global_batch=8, seeded=True)
        sampler.set_epoch(2, consumed)
        return [batch["number"].tolist() for batch in
                DataLoader(SeededSamples(rows), batch_size=8, sampler=sampler, num_workers=workers)]

    whole = batches(0, workers=0)
    assert sorted(itertools.chain(*whole)) == list(range(80)) and whole != sorted(whole)
    assert batches(24, workers=2) == whole[3:]  # 3 batches in, read by workers
    sample = first_sample(rows)
    assert sample["features"].dtype == torch.float32 and sample["features"].tolist() == [0.0, -0.0, 1.0]


@pytest.mark.parametrize("shuffled", [False, True])
def test_an_iterable_dataset_is_a_stream_of_its_files_that_resumes_where_it_stopped(parquet_files, shuffled):
    stream = streamed(parquet_files, shuffled)
    assert DatasetsStream(stream).stateful == (not shuffled)  # a shuffle buffer is in no state: counted instead
    every = []
    for rank in (0, 1):  # each rank one file
        batches = iter(loader(stream, rank, 2))
        every += [number for _ in range(8) for number in next(batches)["number"].tolist()]
    assert sorted(every) == list(range(80))
    reading = loader(stream)
    read = [batch["twice"].tolist() for batch in itertools.islice(iter(reading), 11)]
    state = reading.state_dict(steps=9)  # 45 rows: 40 of the first file, 5 of the second; 2 batches read ahead
    if not shuffled:
        assert "ArrowExamplesIterable" in str(state["places"][0][3])  # the library's own place
    resumed = StreamLoader(stream, 0, 1, 0, batch_size=5, per_step=1, collate=None, seed=0, options={})
    assert resumed.load_state_dict([state], rank=0) is None
    resumed.start(9)
    assert [batch["twice"].tolist() for batch in itertools.islice(iter(resumed), 2)] == read[9:]


def test_an_iterable_dataset_with_fewer_files_than_parts_says_how_to_have_more(parquet_files):
    check_stream(streamed(parquet_files), 2)
    with pytest.raises(UserError, match=r"2 shards for 4 parts .* \(a datasets.IterableDataset's are its files: "
                                        r"reshard\(\) splits parquet files by row group\)"):
        check_stream(streamed(parquet_files), 4)
    check_stream(streamed(parquet_files).reshard(), 4)  # 3 row groups a file
