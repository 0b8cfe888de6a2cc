"""Token corpora bigger than memory: flat files of token ids read as fixed windows, a batch at a time.

A corpus is a folder of shards, each a flat array of ``uint16`` (or ``uint32``, for vocabularies past 65,536) token
ids with no header, as nanoGPT and torchtitan write them, and ``tokens.json`` naming the shards, their lengths, the
dtype and the tokenizer. ``python -m launcher.tokens`` writes one from text files.

A batch's windows are cut from memory maps opened for that batch and closed after it, so the process keeps none of
the corpus mapped: its resident memory stays flat however large the corpus (bench/tokens.py). A corpus that fits
within ``data.resident_share`` of a GPU's memory is read onto the device once instead (``to``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from torch.utils.data import Dataset

from launcher.errors import UserError

META = "tokens.json"
DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
_SIGNED = {"uint16": np.int16, "uint32": np.int32}


def byte_tokens(text: bytes) -> np.ndarray:
    """The byte tokenizer: each byte is its own token (a vocabulary of 256)."""
    return np.frombuffer(text, dtype=np.uint8)


def write_shards(files: Iterable[Path], out: Path, shard_tokens: int, tokenizer: str = "bytes") -> dict:
    """Write the files' tokens, in order, into shards of ``shard_tokens`` tokens (the last may be shorter).

    ``tokens.json`` is written last, through a temporary name: a folder without it is a corpus still being written.
    Returns what it holds.
    """
    if tokenizer != "bytes":
        raise UserError(f"tokenizer {tokenizer}: only 'bytes' is built in")
    if shard_tokens < 1:
        raise UserError(f"{shard_tokens} tokens a shard: give 1 or more")
    vocab, dtype = 256, "uint16"
    out.mkdir(parents=True, exist_ok=True)
    shards, buffer, filled = [], np.empty(shard_tokens, dtype=DTYPES[dtype]), 0

    def flush() -> None:
        nonlocal filled
        if filled:
            name = f"shard_{len(shards):05d}.bin"
            buffer[:filled].tofile(out / name)
            shards.append({"file": name, "tokens": filled})
            filled = 0

    for path in files:
        tokens = byte_tokens(Path(path).read_bytes())
        while len(tokens):
            taken = min(len(tokens), shard_tokens - filled)
            buffer[filled:filled + taken] = tokens[:taken]
            filled, tokens = filled + taken, tokens[taken:]
            if filled == shard_tokens:
                flush()
    flush()
    meta = {"dtype": dtype, "vocab": vocab, "tokenizer": tokenizer, "shards": shards}
    tmp = out / f".{META}.tmp"
    tmp.write_text(json.dumps(meta, indent=1) + "\n")
    os.replace(tmp, out / META)
    return meta


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
    return meta


def _well_formed(meta) -> bool:
    shards = meta.get("shards") if isinstance(meta, dict) else None
    return (meta.get("dtype") in DTYPES and isinstance(meta.get("vocab"), int) and isinstance(shards, list)
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
