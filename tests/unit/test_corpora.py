"""Token corpora in one process: tokenizers (a BPE trained on the standard library, a tokenizer.json given), tables
(parquet, jsonl, arrow) as documents, uint32 shards past 65,536 tokens, what tokens.json records, and the gpt recipe's
vocabulary and samples."""

import json
import os
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from omegaconf import OmegaConf

from launcher.cli.tokens import main as tokens_main
from launcher.data.tokenizer import END_OF_TEXT
from launcher.data.tokens import TokenWindows, read_meta
from launcher.errors import UserError
from launcher.recipe import load_recipe
from launcher.recipes import gpt

STDLIB = Path(os.__file__).parent
SOURCES = sorted((STDLIB / "json").glob("*.py"))  # 5 files, about 50 KB of Python


def documents_of(folder: Path) -> list[list[int]]:
    """A corpus's token ids, cut into documents at its end-of-text token."""
    meta = read_meta(folder)
    ids = np.concatenate([np.fromfile(folder / shard["file"], dtype=meta["dtype"]) for shard in meta["shards"]])
    separator = TokenWindows(folder, 4).tokenizer.tokenizer.token_to_id(END_OF_TEXT)
    cuts = np.flatnonzero(ids == separator)
    return [part[:-1].tolist() for part in np.split(ids, cuts + 1)[:-1]]  # each without its end of text


def test_a_bpe_trained_on_the_standard_library_is_recorded_beside_its_shards_and_decodes_them(tmp_path, capsys):
    assert tokens_main(["--out", str(tmp_path / "bpe"), "--train-tokenizer", "512", "--eval-every", "3",
                        *map(str, SOURCES)]) == 0
    assert "trained a byte-level BPE of 512 tokens" in capsys.readouterr().out
    train, evaluation = tmp_path / "bpe" / "train", tmp_path / "bpe" / "eval"
    meta = json.loads((train / "tokens.json").read_text())
    held_out = range(0, len(SOURCES), 3)  # every 3rd document, the first first
    assert meta["dtype"] == "uint16" and meta["vocab"] == 512 and meta["documents"] == len(SOURCES) - len(held_out)
    assert meta["tokenizer"]["file"] == "tokenizer.json" and meta["tokenizer"]["vocab"] == 512
    assert json.loads((evaluation / "tokens.json").read_text())["tokenizer"] == meta["tokenizer"]  # the same copy
    windows = TokenWindows(evaluation, context=8)
    texts = [windows.tokenizer.decode(ids) for ids in documents_of(evaluation)]
    assert texts == [SOURCES[i].read_text() for i in held_out]
    tokens = sum(shard["tokens"] for shard in meta["shards"])
    assert tokens < sum(SOURCES[i].stat().st_size for i in range(len(SOURCES)) if i % 3) / 2  # merges pay


def test_tables_are_read_a_row_a_document_and_tokenize_as_the_same_text_files_do(tmp_path):
    texts = [path.read_text() for path in SOURCES]  # 5
    for number, text in enumerate(texts):
        (tmp_path / f"{number}.txt").write_text(text)
    tables = tmp_path / "tables"
    tables.mkdir()
    pq.write_table(pa.table({"id": [0, 1], "body": texts[:2]}), tables / "a.parquet", row_group_size=1)
    (tables / "b.jsonl").write_text("".join(json.dumps({"body": text, "id": 2 + i}) + "\n"
                                            for i, text in enumerate(texts[2:4])))
    with pa.OSFile(str(tables / "c.arrow"), "wb") as sink, pa.ipc.new_stream(sink, pa.schema([("body", pa.string())])) \
            as writer:  # the IPC stream format, as datasets' save_to_disk writes it
        writer.write_table(pa.table({"body": texts[4:] + [None]}))  # a null: no document
    files = [str(tmp_path / f"{number}.txt") for number in range(len(texts))]
    assert tokens_main(["--out", str(tmp_path / "from_texts"), "--train-tokenizer", "300", *files]) == 0
    tokenizer = tmp_path / "from_texts" / "train" / "tokenizer.json"
    assert tokens_main(["--out", str(tmp_path / "from_tables"), "--tokenizer", str(tokenizer), "--column", "body",
                        str(tables)]) == 0
    for split in ("train", "eval"):
        made = [json.loads((tmp_path / corpus / split / "tokens.json").read_text())
                for corpus in ("from_texts", "from_tables")]
        assert made[0] == made[1]  # the same documents, tokens and tokenizer
        assert (tmp_path / "from_texts" / split / "shard_00000.bin").read_bytes() == (
            tmp_path / "from_tables" / split / "shard_00000.bin").read_bytes()


def test_a_table_without_the_column_or_with_no_text_in_it_is_one_line(tmp_path, capsys):
    pq.write_table(pa.table({"id": [1, 2], "text": ["a", "b"]}), tmp_path / "t.parquet")
    pq.write_table(pa.table({"text": ["a"]}), tmp_path / "one.parquet")
    (tmp_path / "t.jsonl").write_text('{"body": "a"}\n')
    for args in (["--column", "body", str(tmp_path / "t.parquet")], ["--column", "id", str(tmp_path / "t.parquet")],
                 [str(tmp_path / "t.jsonl")], [str(tmp_path / "one.parquet")]):
        assert tokens_main(["--out", str(tmp_path / "c"), *args]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 4 and all(line.startswith("launcher.tokens: error: ") for line in errors)
    assert "has no column 'body' (its columns: id, text): name the text's column with --column" in errors[0]
    assert "column 'id' holds int64 values, not text" in errors[1]
    assert "t.jsonl, line 1: no 'text' in the row" in errors[2]
    assert "1 document(s) cannot be split into train/ and eval/" in errors[3]
    assert not list((tmp_path / "c").rglob("*.bin"))  # given up on: nothing left behind


def test_a_vocabulary_past_65536_is_written_as_uint32_and_the_gpt_model_embeds_it(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    words = {f"w{number}": number for number in range(70_000)}
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(words, unk_token="w0"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(tmp_path / "words.json"))
    (tmp_path / "a.txt").write_text(" ".join(f"w{number}" for number in range(69_990, 70_000)) * 3)
    assert tokens_main(["--out", str(tmp_path / "c"), "--tokenizer", str(tmp_path / "words.json"),
                        "--eval-every", "0", str(tmp_path / "a.txt")]) == 0
    meta = read_meta(tmp_path / "c")
    assert meta["dtype"] == "uint32" and meta["vocab"] == 70_000
    windows = TokenWindows(tmp_path / "c", context=4)
    assert windows.take(torch.tensor([0]))["input_ids"].tolist() == [[69_990, 69_991, 69_992, 69_993]]
    cfg = OmegaConf.create({"data": {"tokens": str(tmp_path / "c")}, "model": {**gpt.DEFAULTS["model"], "context": 4}})
    (tmp_path / "c" / "train").symlink_to(tmp_path / "c")  # data.tokens=DIR reads DIR/train
    model = gpt.build_model(cfg)
    assert model.tokens.weight.shape[0] == 70_000
    assert model(windows.take(torch.tensor([1]))["input_ids"]).shape == (1, 4, 70_000)


def test_a_corpus_whose_tokenizer_is_missing_or_another_is_one_line(tmp_path):
    assert tokens_main(["--out", str(tmp_path / "c"), "--train-tokenizer", "300", "--eval-every", "0",
                        *map(str, SOURCES[:2])]) == 0
    tokenizer = tmp_path / "c" / "tokenizer.json"
    text = tokenizer.read_text()
    tokenizer.write_text(text.replace('"<|endoftext|>"', '"<|end|>"'))
    with pytest.raises(UserError, match="is not the tokenizer tokens.json was written with"):
        TokenWindows(tmp_path / "c", 4)
    tokenizer.unlink()
    with pytest.raises(UserError, match=r"names the tokenizer tokenizer.json, which is not beside it: copy"):
        TokenWindows(tmp_path / "c", 4)


def test_without_the_tokenizers_library_a_tokenizer_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # import tokenizers now fails
    text = tmp_path / "a.txt"
    text.write_text("some text")
    for flag in (["--train-tokenizer", "300"], ["--tokenizer", str(text)]):
        assert tokens_main(["--out", str(tmp_path / "c"), "--eval-every", "0", *flag, str(text)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "launcher.tokens: error: --train-tokenizer needs the tokenizers package: pip install tokenizers",
        "launcher.tokens: error: --tokenizer needs the tokenizers package: pip install tokenizers"]


def test_the_gpt_recipes_samples_are_lines_it_writes_greedily_touching_no_random_stream(tmp_path):
    assert tokens_main(["--out", str(tmp_path / "c"), "--train-tokenizer", "300", *map(str, SOURCES[:4])]) == 0
    cfg = OmegaConf.create({"data": {"tokens": str(tmp_path / "c")},
                            "model": {**gpt.DEFAULTS["model"], "layers": 1, "width": 16, "context": 16}})
    recipe, model = load_recipe("gpt"), gpt.build_model(cfg)
    _, evaluation = gpt.build_datasets(cfg)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    lines = recipe.samples(model, evaluation, cfg)
    assert torch.equal(torch.get_rng_state(), before) and model.training  # put back as it was
    assert len(lines) == gpt.SAMPLE_LINES and lines == recipe.samples(model, evaluation, cfg)
    prompts = evaluation.take(torch.tensor([0]))["input_ids"][0, :gpt.PROMPT_TOKENS].tolist()
    assert lines[0].startswith(evaluation.tokenizer.decode(prompts) + " → ")
    byte_lines = recipe.samples(gpt.GPT(256, 1, 4, 16, 16, 0.0), gpt.ByteWindows(b"x = 1\n" * 100, 16), cfg)
    assert byte_lines[0].startswith("x = 1\nx = 1\nx = ")  # bytes decoded as UTF-8


def test_a_corpus_that_fails_part_way_leaves_no_corpus_and_a_jsonl_not_in_utf8_is_one_line(tmp_path, capsys):
    """Written over an earlier corpus, then a bad row in the second file: neither corpus is left to be read."""
    assert tokens_main(["--out", str(tmp_path / "c"), "--eval-every", "0", str(SOURCES[0])]) == 0
    (tmp_path / "good.jsonl").write_text("".join(json.dumps({"text": f"row {n}"}) + "\n" for n in range(50)))
    (tmp_path / "latin1.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
    args = ["--out", str(tmp_path / "c"), "--eval-every", "0", "--shard-tokens", "16"]
    assert tokens_main([*args, str(tmp_path / "good.jsonl"), str(tmp_path / "latin1.jsonl")]) == 2
    assert "latin1.jsonl, line 1: not JSON" in capsys.readouterr().err
    assert not (tmp_path / "c" / "tokens.json").exists() and not list((tmp_path / "c").glob("*.bin"))
    with pytest.raises(UserError):
        read_meta(tmp_path / "c")
