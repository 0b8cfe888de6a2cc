"""`python -m launcher.tokens --out DIR PATHS...`: a token corpus (launcher/data/tokens.py) from text files or tables.

A text file is one document; a table (``.parquet``, ``.jsonl``, ``.arrow``: what ``datasets`` writes) one per row,
its text in ``--column``. Folders are read for the files matching ``--glob``, in sorted order (never those under
``--out``). With ``--eval-every N`` (default 10) every N-th document goes to ``DIR/eval`` and the rest to
``DIR/train`` (no document in both), as `recipe=gpt data.tokens=DIR` reads them; ``--eval-every 0`` writes one
corpus into ``DIR``.

Tokens are bytes (a vocabulary of 256), or those of a Hugging Face ``tokenizer.json`` (``--tokenizer PATH``), or of a
byte-level BPE trained on the training documents (``--train-tokenizer VOCAB``); either is copied beside the shards
and recorded in ``tokens.json``. Shards are ``uint16``, or ``uint32`` for a vocabulary past 65,536.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

from launcher.data.documents import TABLES, documents
from launcher.data.tokenizer import ByteTokenizer, FileTokenizer, train_bpe
from launcher.data.tokens import ShardWriter, check_shard_tokens
from launcher.errors import LauncherError, UserError

ENCODED_AT_ONCE = 256  # documents per encode_batch call (the tokenizers library encodes them on its threads)
ENCODED_BYTES = 64 * 2**20  # and no more text than this at once: a text file is one document, of any size


def text_files(paths: list[Path], pattern: str) -> list[Path]:
    """The files named, and those under the folders named that match ``pattern``, each folder's sorted."""
    files = []
    for path in paths:
        if path.is_dir():
            files += sorted(file for file in path.rglob(pattern) if file.is_file())
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"{path}: no such file or folder")
    if not files:
        raise UserError(f"no files matching {pattern} in {', '.join(map(str, paths))}")
    return files


def all_documents(files: list[Path], column: str):
    """Every file's documents, in order."""
    return itertools.chain.from_iterable(documents(file, column) for file in files)


def is_eval(number: int, every: int) -> bool:
    """Whether document ``number`` (from 0) goes to eval/ when every ``every``-th does (0: none)."""
    return every > 0 and number % every == 0


def choose_tokenizer(args, files: list[Path]):
    """Bytes, the ``--tokenizer`` file, or a BPE trained on the training documents (``--train-tokenizer``)."""
    if args.train_tokenizer is not None:
        if args.tokenizer != "bytes":
            raise UserError("--tokenizer and --train-tokenizer both given: use a tokenizer, or train one")
        training = (document for number, document in enumerate(all_documents(files, args.column))
                    if not is_eval(number, args.eval_every))
        tokenizer = train_bpe(training, args.train_tokenizer)
        print(f"trained a byte-level BPE of {tokenizer.vocab:,} tokens on the training documents")
        return tokenizer
    if args.tokenizer == "bytes":
        return ByteTokenizer()
    return FileTokenizer.from_file(Path(args.tokenizer))


def write_corpus(files: list[Path], out: Path, tokenizer, args) -> dict[Path, dict]:
    """Each split's ``tokens.json``, once every document went to its split's shards."""
    every = args.eval_every
    writers = {False: ShardWriter(out, tokenizer, args.shard_tokens)} if every <= 0 else {
        False: ShardWriter(out / "train", tokenizer, args.shard_tokens),
        True: ShardWriter(out / "eval", tokenizer, args.shard_tokens)}
    try:
        for chunk in chunks(enumerate(all_documents(files, args.column))):
            for (number, _), tokens in zip(chunk, tokenizer.encode_batch([document for _, document in chunk])):
                writers[is_eval(number, every)].add(tokens)
        if every > 0 and not all(writer.documents for writer in writers.values()):
            count = sum(writer.documents for writer in writers.values())
            raise UserError(f"{count} document(s) cannot be split into train/ and eval/: give more, or write one "
                            "corpus with --eval-every 0 (into --out itself, e.g. --out DIR/train)")
        return {writer.out: writer.finish() for writer in writers.values()}
    except BaseException:  # a bad row in a later file, Ctrl-C: no corpus, and no shards left of one
        for writer in writers.values():
            writer.discard()
        raise


def chunks(numbered, count: int = ENCODED_AT_ONCE, size: int = ENCODED_BYTES):
    """Lists of (number, document) to encode at once: ``count`` of them, fewer where they pass ``size`` bytes."""
    chunk, held = [], 0
    for item in numbered:
        chunk.append(item)
        held += len(item[1])
        if len(chunk) == count or held >= size:
            yield chunk
            chunk, held = [], 0
    if chunk:
        yield chunk


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launcher.tokens", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", type=Path, help="text files or tables (.parquet, .jsonl, .arrow), or "
                        "folders of them")
    parser.add_argument("--out", type=Path, required=True, help="the corpus folder to write")
    parser.add_argument("--glob", default="*", help="which files of a folder (default: all)")
    parser.add_argument("--column", default="text", help="a table's column of text (default: text)")
    parser.add_argument("--eval-every", type=int, default=10, help="every N-th document to DIR/eval (0: no split)")
    parser.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard")
    parser.add_argument("--tokenizer", default="bytes", help="bytes (each byte a token, a vocabulary of 256), or a "
                        "Hugging Face tokenizer.json")
    parser.add_argument("--train-tokenizer", type=int, metavar="VOCAB", help="train a byte-level BPE of VOCAB tokens "
                        "on the training documents, and use it")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.out.exists() and not args.out.is_dir():
            raise UserError(f"--out {args.out} is a file: name a folder to write the corpus into")
        check_shard_tokens(args.shard_tokens)
        out = args.out.resolve()
        files = [file for file in text_files(args.paths, args.glob) if not file.resolve().is_relative_to(out)]
        texts_only = not any(file.suffix in TABLES for file in files)
        if args.eval_every > 0 and texts_only and len(files) < 2:  # known before reading anything
            raise UserError(f"{len(files)} file(s) cannot be split into train/ and eval/: give more files, or write "
                            "one corpus with --eval-every 0 (into --out itself, e.g. --out DIR/train)")
        tokenizer = choose_tokenizer(args, files)
        for folder, meta in write_corpus(files, args.out, tokenizer, args).items():
            tokens = sum(shard["tokens"] for shard in meta["shards"])
            print(f"{folder}: {tokens:,} tokens ({meta['dtype']}, a vocabulary of {meta['vocab']:,}) of "
                  f"{meta['documents']:,} documents in {len(meta['shards'])} shard(s)")
    except LauncherError as error:
        print(f"launcher.tokens: error: {error}", file=sys.stderr)
        return error.exit_code
    return 0
