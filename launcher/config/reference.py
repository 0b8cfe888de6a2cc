"""The keys' reference, made from their declarations (config/keys.py).

It is the listing `python -m launcher --help` prints and the table in docs/configuration.md.

    python -m launcher.config.reference docs/configuration.md    # rewrites the table there after a key changes

The table sits between two marker lines; tests/unit/test_config.py fails when it differs from the declarations.
"""

from __future__ import annotations

import sys
from pathlib import Path

from launcher.config.keys import KEYS, Key

TABLE_START = "<!-- keys: made by `python -m launcher.config.reference docs/configuration.md`; do not edit -->"
TABLE_END = "<!-- end of keys -->"


def _value(value) -> str:
    """A default as it is written on the command line: true, 0.1, none, '' and [] for the empty ones."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return f"[{','.join(map(str, value))}]"
    return "''" if value == "" else str(value)


def _meaning(key: Key) -> str:
    """The meaning and, where not every value of its type will do, what a value must be."""
    wanted = key.wanted()
    return f"{key.meaning}; {wanted}" if wanted else key.meaning


def help_listing() -> str:
    """Every key, one line each: name, type, default, meaning and allowed values."""
    width = max(map(len, KEYS)) + 2
    lines = [f"  {name:<{width}}{key.type_name:<6}{_value(key.default):<10} {_meaning(key)}"
             for name, key in KEYS.items()]
    return "keys (type, default, meaning); a recipe adds its own (--cfg lists them):\n" + "\n".join(lines) + "\n"


def markdown_table() -> str:
    """The documentation's table: a row per key, with its details and what a resume may do with it."""
    rows = ["| key | type | default | meaning | on resume |", "| --- | --- | --- | --- | --- |"]
    for name, key in KEYS.items():
        meaning = _meaning(key) + "." + (f" {key.details}" if key.details else "")
        rows.append(f"| `{name}` | {key.type_name} | `{_value(key.default)}` | {meaning.replace('|', '/')} | "
                    f"{key.resume} |")
    rows.append("| `model.*`, others | per recipe | per recipe | the recipe's own keys (`--cfg` lists them) | "
                "defines the run |")
    return "\n".join(rows) + "\n"


def with_table(document: str) -> str:
    """``document`` with the text between its table markers replaced by ``markdown_table()``."""
    before, _, rest = document.partition(TABLE_START + "\n")
    _, _, after = rest.partition(TABLE_END)
    return before + TABLE_START + "\n" + markdown_table() + TABLE_END + after


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    path = Path(argv[0])
    path.write_text(with_table(path.read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
