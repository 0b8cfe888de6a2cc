"""Recipes and templates, found in a source checkout and an installed launcher alike.

The repository keeps them beside launcher/ (recipes/, slurm/), and an installed launcher holds them inside itself
(launcher.recipes, launcher.templates). They are found either way, so a source checkout that was never installed (a copy
sent to a GPU machine) runs as an installed one does.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

_CHECKOUT = Path(__file__).resolve().parent.parent


def recipes_package() -> ModuleType:
    """The shipped recipes, as the package ``launcher.recipes``."""
    try:
        return importlib.import_module("launcher.recipes")
    except ModuleNotFoundError:
        init = _CHECKOUT / "recipes" / "__init__.py"
        spec = importlib.util.spec_from_file_location("launcher.recipes", init,
                                                      submodule_search_locations=[str(init.parent)])
        package = importlib.util.module_from_spec(spec)
        sys.modules["launcher.recipes"] = package
        spec.loader.exec_module(package)
        return package


def templates_dir() -> Path:
    """The folder of the Slurm templates (and the common.sh they source)."""
    spec = importlib.util.find_spec("launcher.templates")
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    return _CHECKOUT / "slurm"
