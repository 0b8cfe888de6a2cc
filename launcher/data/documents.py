"""The documents of a corpus's files: a text file is one, a table (parquet, jsonl, arrow) one per row of a column.

Tables are read a record batch at a time (jsonl a line at a time), so a file of any size is never held whole. Parquet
and arrow files are read through pyarrow (``pip install datasets`` brings it, or ``pip install pyarrow``); arrow is
the IPC format ``datasets`` saves (``Dataset.save_to_disk``'s ``.arrow`` files), stream or file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from launcher.errors import UserError, first_line

TABLES = (".parquet", ".jsonl", ".arrow")


def documents(path: Path, column: str) -> Iterator[str | bytes]:
    """``path``'s documents in order: a text file's bytes, or each row's ``column`` of a table (nulls skipped)."""
    if path.suffix == ".jsonl":
        yield from _jsonl(path, column)
    elif path.suffix in (".parquet", ".arrow"):
        for batch in _record_batches(path, column):
            yield from (text for text in batch.column(column).to_pylist() if text is not None)
    else:
        yield path.read_bytes()


def _jsonl(path: Path, column: str) -> Iterator[str]:
    with path.open("rb") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line.decode("utf-8"))
            except ValueError as error:  # UnicodeDecodeError among them
                raise UserError(f"{path}, line {number}: not JSON ({error})") from None
            if not isinstance(row, dict) or column not in row:
                raise UserError(f"{path}, line {number}: no {column!r} in the row (name the text's column with "
                                "--column)")
            yield from _texts(path, column, [row[column]])


def _texts(path: Path, column: str, values: list) -> list[str]:
    texts = [value for value in values if value is not None]
    if any(not isinstance(text, str) for text in texts):
        kind = next(type(text).__name__ for text in texts if not isinstance(text, str))
        raise UserError(f"{path}: column {column!r} holds {kind} values, not text: name a text column with --column")
    return texts


def _record_batches(path: Path, column: str):
    """A parquet or arrow file's record batches of ``column`` alone, after checking it is a text column."""
    pyarrow = _pyarrow(path)
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet

            table = pyarrow.parquet.ParquetFile(path)
            _check_column(path, column, table.schema_arrow, pyarrow)
            yield from table.iter_batches(columns=[column])
            return
        with path.open("rb") as file:
            reader = _ipc_reader(file, pyarrow)
            _check_column(path, column, reader.schema, pyarrow)
            yield from (batch.select([column]) for batch in _ipc_batches(reader))
    except pyarrow.ArrowException as error:
        raise UserError(f"{path} does not read as {path.suffix[1:]} ({first_line(error)})") from None


def _ipc_reader(file, pyarrow):
    """An arrow file's reader: the IPC stream format (what ``datasets`` writes), else the IPC file format."""
    try:
        return pyarrow.ipc.open_stream(file)
    except pyarrow.ArrowInvalid:
        file.seek(0)
        return pyarrow.ipc.open_file(file)


def _ipc_batches(reader):
    if hasattr(reader, "num_record_batches"):  # the file format: batches by number
        return (reader.get_batch(number) for number in range(reader.num_record_batches))
    return iter(reader)


def _check_column(path: Path, column: str, schema, pyarrow) -> None:
    if column not in schema.names:
        raise UserError(f"{path} has no column {column!r} (its columns: {', '.join(schema.names)}): name the text's "
                        "column with --column")
    kind = schema.field(column).type
    if not (pyarrow.types.is_string(kind) or pyarrow.types.is_large_string(kind)):
        raise UserError(f"{path}: column {column!r} holds {kind} values, not text: name a text column with --column")


def _pyarrow(path: Path):
    try:
        import pyarrow
        import pyarrow.ipc
    except ImportError:
        raise UserError(f"reading {path.name} needs the pyarrow package: pip install pyarrow (or pip install "
                        "datasets, which brings it)") from None
    return pyarrow
