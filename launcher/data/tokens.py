"""Token corpora bigger than memory: flat files of token ids read as fixed windows, a batch at a time.

A corpus is a folder of shards, each a flat array of ``uint16`` (or ``uint32``, for vocabularies past 65,536) token
ids with no header, as nanoGPT and torchtitan write them, and ``tokens.json``:

- ``dtype``: ``uint16`` or ``uint32``; ``vocab``: the number of token ids (the model's embedding);
- ``tokenizer``: ``"bytes"``, or ``{"file": "tokenizer.json", "vocab": N, "sha256": HEX}`` (its copy beside the
  shards, data/tokenizer.py);
- ``documents``: how many documents it holds; ``shards``: ``[{"file": NAME, "tokens": N}, ...]`` in order.

``python -m launcher.tokens`` writes one from text files or tables (data/documents.py). A corpus written before
tokenizers were recorded (``"tokenizer": "bytes"``, no ``documents``) reads as it did.

A batch's windows are cut from memory maps opened for that batch and closed after it, so the process keeps none of
the corpus mapped: its resident memory stays flat however large the corpus (bench/tokens.py). A corpus that fits
within ``data.resident_share`` of a GPU's memory is read onto the device once instead (``to``).
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from torch.utils.data import Dataset

from launcher.data.tokenizer import ByteTokenizer, corpus_tokenizer, sha256
from launcher.errors import UserError

META = "tokens.json"
DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
_SIGNED = {"uint16": np.int16, "uint32": np.int32}


def dtype_for(vocab: int) -> str:
    """The narrowest shard dtype that holds every id of a vocabulary of ``vocab`` tokens."""
    return "uint16" if vocab <= 2**16 else "uint32"


def check_shard_tokens(shard_tokens: int) -> None:
    if shard_tokens < 1:
        raise UserError(f"{shard_tokens} tokens a shard: give 1 or more")


class ShardWriter:
    """A corpus written as its documents' tokens arrive: shards of ``shard_tokens`` tokens (the last may be shorter).

    ``finish`` writes ``tokens.json`` last, through a temporary name: a folder without it is a corpus still being
    written. With the tokenizer's ``end_of_text``, each document is followed by it (as GPT-2's corpora are), so a
    window that spans two documents says where one ends.
    """

    def __init__(self, out: Path, tokenizer, shard_tokens: int):
        check_shard_tokens(shard_tokens)
        out.mkdir(parents=True, exist_ok=True)
        # A corpus written here before is replaced, tokens.json first: a folder without it is no corpus.
        (out / META).unlink(missing_ok=True)
        for old in out.glob("shard_[0-9]*.bin"):
            old.unlink()
        self.out, self.tokenizer, self.dtype = out, tokenizer, dtype_for(tokenizer.vocab)
        self.buffer, self.filled = np.empty(shard_tokens, dtype=DTYPES[self.dtype]), 0
        self.shards: list[dict] = []
        self.documents = 0
        self.separator = None if tokenizer.end_of_text is None else np.array([tokenizer.end_of_text])

    def add(self, tokens: np.ndarray) -> None:
        """One document's tokens."""
        self.documents += 1
        if self.separator is not None:
            tokens = np.concatenate([tokens, self.separator])
        while len(tokens):
            taken = min(len(tokens), len(self.buffer) - self.filled)
            self.buffer[self.filled:self.filled + taken] = tokens[:taken]
            self.filled, tokens = self.filled + taken, tokens[taken:]
            if self.filled == len(self.buffer):
                self._flush()

    def _flush(self) -> None:
        if self.filled:
            name = f"shard_{len(self.shards):05d}.bin"
            self.buffer[:self.filled].tofile(self.out / name)
            self.shards.append({"file": name, "tokens": self.filled})
            self.filled = 0

    def discard(self) -> None:
        """Remove the shards written so far (a corpus given up on)."""
        for shard in self.shards:
            (self.out / shard["file"]).unlink(missing_ok=True)

    def finish(self) -> dict:
        """The last shard, the tokenizer's copy and ``tokens.json``; returns what it holds."""
        self._flush()
        meta = {"dtype": self.dtype, "vocab": self.tokenizer.vocab, "tokenizer": self.tokenizer.record(self.out),
                "documents": self.documents, "shards": self.shards}
        tmp = self.out / f".{META}.tmp"
        tmp.write_text(json.dumps(meta, indent=1) + "\n")
        os.replace(tmp, self.out / META)
        return meta


def write_shards(files: Iterable[Path], out: Path, shard_tokens: int, tokenizer=None) -> dict:
    """Write the files' tokens, in order, into a corpus; returns its ``tokens.json``.

    One document a file, in ``tokenizer``'s tokens (by default bytes).
    """
    tokenizer = tokenizer or ByteTokenizer()
    writer = ShardWriter(out, tokenizer, shard_tokens)
    for path in files:
        writer.add(tokenizer.encode_batch([Path(path).read_bytes()])[0])
    return writer.finish()


def read_meta(folder: Path) -> dict:
    """A corpus folder's ``tokens.json``, or one line saying what is wrong."""
    try:
        meta = json.loads((folder / META).read_text())
    except OSError:
        raise UserError(f"{folder} holds no token corpus ({META} is missing): write one with python -m launcher.tokens "
                        "--out DIR FILES (DIR/train and DIR/eval, as data.tokens=DIR reads them)") from None
    except ValueError as error:
        raise UserError(f"{folder / META} is not valid JSON ({error})") from None
    if not _well_formed(meta):
        raise UserError(f"{folder / META} is not a token corpus's description (a dtype of {', '.join(DTYPES)}, a "
                        "vocab, and shards of file and tokens each): write the corpus with python -m launcher.tokens")
    for shard in meta["shards"]:
        path = folder / shard["file"]
        expected = shard["tokens"] * np.dtype(DTYPES[meta["dtype"]]).itemsize
        if not path.is_file() or path.stat().st_size != expected:
            raise UserError(f"{path} is missing or not {expected} bytes as {META} says: write the corpus again")
    _check_tokenizer(folder, meta.get("tokenizer", "bytes"))
    return meta


def _check_tokenizer(folder: Path, recorded) -> None:
    """The tokenizer file ``tokens.json`` names is beside it, and the one the corpus was written with."""
    if not isinstance(recorded, dict):
        return
    path = folder / recorded["file"]
    if not path.is_file():
        raise UserError(f"{folder / META} names the tokenizer {recorded['file']}, which is not beside it: copy the "
                        f"corpus's tokenizer.json to {path}, or write the corpus again with python -m launcher.tokens")
    if sha256(path) != recorded["sha256"]:
        raise UserError(f"{path} is not the tokenizer {META} was written with (another SHA-256): put that one back, "
                        "or write the corpus again with python -m launcher.tokens")


def _well_formed(meta) -> bool:
    if not isinstance(meta, dict):
        return False
    shards, tokenizer = meta.get("shards"), meta.get("tokenizer", "bytes")
    named = not isinstance(tokenizer, dict) or (isinstance(tokenizer.get("file"), str) and
                                                isinstance(tokenizer.get("sha256"), str))
    return (meta.get("dtype") in DTYPES and isinstance(meta.get("vocab"), int) and isinstance(shards, list) and named
            and all(isinstance(shard, dict) and isinstance(shard.get("file"), str) and
                    isinstance(shard.get("tokens"), int) and shard["tokens"] >= 0 for shard in shards))


class TokenWindows(Dataset):
    """Non-overlapping windows of ``context + 1`` tokens over a corpus's shards, as {input_ids, targets}.

    ``targets`` is ``input_ids`` shifted by one token. A window never spans two shards. ``take`` cuts a whole batch
    of windows at once; ``__getitem__`` one (for a DataLoader, ``data.resident=never``).
    """

    def __init__(self, folder: Path, context: int):
        self.folder, self.context = Path(folder), context
        self.meta = read_meta(self.folder)
        tokens = torch.tensor([shard["tokens"] for shard in self.meta["shards"]], dtype=torch.int64)
        windows = ((tokens - 1).clamp(min=0) // context)
        self.first_window = torch.cat([torch.zeros(1, dtype=torch.int64), windows.cumsum(0)])  # per shard
        self.on_device: torch.Tensor | None = None  # the whole corpus, once ``to`` moved it to a GPU
        self.shard_starts = torch.cat([torch.zeros(1, dtype=torch.int64), tokens.cumsum(0)])

    @property
    def vocab(self) -> int:
        return self.meta["vocab"]

    @functools.cached_property
    def tokenizer(self):
        """The corpus's tokenizer (``decode``, ``encode_batch``), or None where ``tokens.json`` names none known."""
        return corpus_tokenizer(self.folder, self.meta.get("tokenizer", "bytes"))

    @property
    def nbytes(self) -> int:
        return int(self.shard_starts[-1]) * np.dtype(DTYPES[self.meta["dtype"]]).itemsize

    @property
    def device(self) -> torch.device:
        return self.on_device.device if self.on_device is not None else torch.device("cpu")

    def __len__(self) -> int:
        return int(self.first_window[-1])

    def to(self, device: torch.device) -> TokenWindows:
        """On a GPU: the corpus read onto it once, its windows cut there; on the CPU: as it is (memory maps)."""
        if device.type == "cpu":
            return self
        moved = TokenWindows.__new__(TokenWindows)
        moved.__dict__.update(self.__dict__)
        # At the corpus's own width (what data.resident judged it by), its unsigned tokens seen as signed ones of the
        # same width: torch indexes those on any device. ``take`` reads them back as unsigned.
        whole = np.empty(int(self.shard_starts[-1]), dtype=_SIGNED[self.meta["dtype"]])  # one copy in host memory
        for number, start in enumerate(self.shard_starts[:-1].tolist()):
            shard = self._shard(number)
            whole[start:start + len(shard)] = shard.view(whole.dtype)
        moved.on_device = torch.from_numpy(whole).to(device)
        moved.first_window, moved.shard_starts = self.first_window.to(device), self.shard_starts.to(device)
        return moved

    def take(self, indices: torch.Tensor) -> dict:
        """The windows at ``indices`` (on this corpus's device), as one batch."""
        shard = torch.searchsorted(self.first_window, indices, right=True) - 1
        offsets = (indices - self.first_window[shard]) * self.context  # in the shard
        span = torch.arange(self.context + 1, device=indices.device)
        if self.on_device is not None:
            width = np.dtype(DTYPES[self.meta["dtype"]]).itemsize * 8
            windows = self.on_device[(self.shard_starts[shard] + offsets)[:, None] + span].long() & (2**width - 1)
        else:
            windows = torch.empty(len(indices), self.context + 1, dtype=torch.int64)
            for number in shard.unique().tolist():  # one memory map a shard, for this batch alone
                rows = (shard == number).nonzero().squeeze(1)
                cut = self._shard(number)[(offsets[rows, None] + span).numpy()]
                windows[rows] = torch.from_numpy(cut.astype(np.int64))
        return {"input_ids": windows[:, :-1], "targets": windows[:, 1:]}

    def __getitem__(self, index: int) -> dict:
        batch = self.take(torch.tensor([index]))
        return {key: value[0] for key, value in batch.items()}

    def _shard(self, number: int) -> np.memmap:
        shard = self.meta["shards"][number]
        return np.memmap(self.folder / shard["file"], dtype=DTYPES[self.meta["dtype"]], mode="r",
                         shape=(shard["tokens"],))
