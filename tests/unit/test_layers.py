"""The code's shape: its layers (docs/design.md), every import inside the launcher going to its own layer or a lower
one; and docstrings that open with a one-line summary."""

import ast
import re
from pathlib import Path

from helpers import REPO

ENGINE = REPO / "launcher"


def layers() -> list[str]:
    """The layers, lowest first, as docs/design.md names them."""
    text = (REPO / "docs" / "design.md").read_text()
    paragraph = re.search(r"^Layers, lowest first: (.*?)\n\n", text, re.S | re.M).group(1)
    return re.findall(r"`([\w.]+)`", paragraph)


def layer_of(module: str) -> str:
    """launcher.engine.trainer -> engine; launcher.errors -> errors; launcher -> __init__."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def launcher_imports(path: Path) -> set[str]:
    """The launcher modules ``path`` imports, at its top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "launcher":
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "launcher")
    return found


def test_every_import_goes_to_its_own_layer_or_a_lower_one():
    order = layers()
    rank = {name: position for position, name in enumerate(order)}
    upward = []
    for path in sorted(ENGINE.rglob("*.py")):
        module = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        here = layer_of(module)
        assert here in rank, f"{module} is in no layer of docs/design.md: {order}"
        for imported in sorted(launcher_imports(path)):
            there = layer_of(imported)
            if rank[there] > rank[here]:
                upward.append(f"{module} ({here}) imports {imported} ({there})")
    assert not upward, "imports that go up the layers:\n" + "\n".join(upward)


def test_every_docstring_opens_with_a_one_line_summary():
    wrapped = []
    for path in sorted(ENGINE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = (ast.get_docstring(node, clean=False) or "").strip("\n").splitlines()
                if len(lines) > 1 and lines[1].strip():
                    wrapped.append(f"{path.relative_to(REPO)}:{getattr(node, 'lineno', 1)}")
    assert not wrapped, "docstrings whose first sentence runs on past the first line:\n" + "\n".join(wrapped)
