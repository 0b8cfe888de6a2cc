"""Tokenizers of token corpora: bytes (built in, a vocabulary of 256), or a Hugging Face ``tokenizer.json``.

A corpus records its tokenizer in ``tokens.json`` (data/tokens.py): ``"bytes"``, or the file, copied beside the
shards, with its vocabulary and SHA-256, so that a corpus moved anywhere decodes as it was encoded. A
``tokenizer.json`` is read through the ``tokenizers`` library (``pip install tokenizers``), and ``train_bpe`` trains
one on a corpus's own documents.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Iterable

import numpy as np

from launcher.errors import UserError, first_line

FILE = "tokenizer.json"  # a corpus's copy of its tokenizer, beside its shards
END_OF_TEXT = "<|endoftext|>"  # GPT-2's separator of documents, and a trained BPE's


def tokenizers_library(flag: str):
    """The ``tokenizers`` module, or one line saying how to install it (``flag``: what needs it)."""
    try:
        import tokenizers
    except ImportError:
        raise UserError(f"{flag} needs the tokenizers package: pip install tokenizers") from None
    return tokenizers


def as_text(document: str | bytes) -> str:
    """A document as text: bytes read as UTF-8, invalid sequences replaced."""
    return document if isinstance(document, str) else document.decode("utf-8", errors="replace")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class ByteTokenizer:
    """Each byte its own token: a vocabulary of 256, no separator between documents."""

    vocab = 256
    end_of_text = None

    def encode_batch(self, documents: list[str | bytes]) -> list[np.ndarray]:
        """Each document's tokens (text as its UTF-8 bytes)."""
        return [np.frombuffer(doc.encode() if isinstance(doc, str) else doc, dtype=np.uint8) for doc in documents]

    def decode(self, ids: list[int]) -> str:
        """The text of ``ids``: UTF-8, a sequence cut short or invalid replaced (a model may write any bytes)."""
        return bytes(ids).decode("utf-8", errors="replace")

    def record(self, folder: Path) -> str:
        """What ``tokens.json`` says of it."""
        return "bytes"


class FileTokenizer:
    """A Hugging Face tokenizer (``tokenizer.json``), through the ``tokenizers`` library.

    ``vocab`` is one more than its largest id, added tokens included; ``end_of_text`` is the id of
    ``<|endoftext|>``, or None where it has no such token.
    """

    def __init__(self, tokenizer, source: Path | None = None):
        self.tokenizer, self.source = tokenizer, source  # source: the file it was read from (None: trained here)
        self.vocab = max(tokenizer.get_vocab(with_added_tokens=True).values(), default=-1) + 1
        self.end_of_text = tokenizer.token_to_id(END_OF_TEXT)

    @classmethod
    def from_file(cls, path: Path, flag: str = "--tokenizer") -> FileTokenizer:
        """The tokenizer in ``path``, or one line saying why it cannot be read."""
        library = tokenizers_library(flag)
        if not path.is_file():
            raise UserError(f"{flag} {path}: no such file (a Hugging Face tokenizer.json)")
        try:
            return cls(library.Tokenizer.from_file(str(path)), path)
        except Exception as error:  # the library's own errors are plain Exceptions
            raise UserError(f"{flag} {path} is not a tokenizer.json the tokenizers library reads "
                            f"({first_line(error) or type(error).__name__})") from None

    def encode_batch(self, documents: list[str | bytes]) -> list[np.ndarray]:
        """Each document's token ids, without the special tokens a post-processor would add (BERT's [CLS])."""
        encodings = self.tokenizer.encode_batch([as_text(doc) for doc in documents], add_special_tokens=False)
        return [np.asarray(encoding.ids, dtype=np.uint32) for encoding in encodings]

    def decode(self, ids: list[int]) -> str:
        """The text of ``ids``, special tokens (``<|endoftext|>``) shown."""
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def record(self, folder: Path) -> dict:
        """Copy the tokenizer into ``folder`` (the file as given, byte for byte) and say what ``tokens.json`` says."""
        copy = folder / FILE
        if self.source is None:
            copy.write_text(self.tokenizer.to_str())
        elif not (copy.exists() and copy.samefile(self.source)):
            shutil.copyfile(self.source, copy)
        return {"file": FILE, "vocab": self.vocab, "sha256": sha256(copy)}


def train_bpe(documents: Iterable[str | bytes], vocab: int) -> FileTokenizer:
    """A byte-level BPE (GPT-2's scheme) of at most ``vocab`` tokens, trained on ``documents``.

    Its first tokens are ``<|endoftext|>`` and the 256 bytes, so any text encodes; the merges fill the rest (fewer
    where the documents run out of pairs to merge).
    """
    library = tokenizers_library("--train-tokenizer")
    if vocab < 257:
        raise UserError(f"--train-tokenizer {vocab}: a byte-level BPE needs a vocabulary of at least 257 (the 256 "
                        f"bytes and {END_OF_TEXT}); 4096 to 65536 are usual")
    models, pre_tokenizers, decoders = library.models, library.pre_tokenizers, library.decoders
    tokenizer = library.Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = library.trainers.BpeTrainer(vocab_size=vocab, special_tokens=[END_OF_TEXT], show_progress=False,
                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator((as_text(document) for document in documents), trainer)
    return FileTokenizer(tokenizer)


def corpus_tokenizer(folder: Path, recorded) -> ByteTokenizer | FileTokenizer | None:
    """The tokenizer a corpus's ``tokens.json`` records (checked by ``read_meta``), or None if it names none known."""
    if recorded == "bytes":
        return ByteTokenizer()
    if isinstance(recorded, dict):
        return FileTokenizer.from_file(folder / recorded["file"], flag=f"{folder}'s tokenizer")
    return None
