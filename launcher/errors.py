"""Errors that end a run with a message instead of a traceback, and how any other exception becomes one."""

from __future__ import annotations

import sysconfig
import traceback
from pathlib import Path


class LauncherError(Exception):
    """A failure explained by its message alone; the launcher prints it and exits with ``exit_code``.

    ``same_on_all_ranks`` marks errors every rank raises identically (config errors, errors agreed on through a
    collective), so only rank 0 prints them and the log shows each once. ``repeats`` names the rank that already
    reported this very error (each rank failing alike at the same step): this one then prints nothing.
    """

    exit_code = 1
    prefix = "error: "

    def __init__(self, message: str, same_on_all_ranks: bool = False):
        super().__init__(message)
        self.same_on_all_ranks = same_on_all_ranks
        self.repeats: str | None = None


class UserError(LauncherError):
    """Something the user typed or provided (config, recipe, data) is wrong; the message says what would work."""

    exit_code = 2


class PeerFailed(LauncherError):
    """This rank stopped because another one failed or died: that rank's error is the root cause, not this."""


_ENGINE = Path(__file__).resolve().parent  # launcher/
_RECIPE_HOOKS = _ENGINE / "recipe.py"  # where the engine calls the recipe's functions
_SHIPPED_RECIPES = _ENGINE / "recipes"  # an installed launcher's recipes: recipe code
_LIBRARIES = {Path(path).resolve() for key, path in sysconfig.get_paths().items()
              if key in ("stdlib", "platstdlib", "purelib", "platlib")}


def _users(filename: str) -> bool:
    """A frame of the user's code: a recipe, or a module of theirs it imports.

    Not the engine's, the standard library's or an installed library's (torch's).
    """
    if filename.startswith("<"):  # <frozen importlib._bootstrap>, <string>
        return False
    path = Path(filename).resolve()
    if path.is_relative_to(_SHIPPED_RECIPES):
        return True
    return not path.is_relative_to(_ENGINE) and not any(path.is_relative_to(library) for library in _LIBRARIES)


def user_frames(frames: traceback.StackSummary) -> list[traceback.FrameSummary]:
    """The frames of the user's code among ``frames`` (no frame of the engine, the standard library or torch)."""
    return [frame for frame in frames if _users(frame.filename)]


def describe(error: BaseException) -> str:
    """The exception in one line, then where it was raised in the user's code (no frame of the engine or torch)."""
    mine = user_frames(traceback.extract_tb(error.__traceback__))
    text = "".join(traceback.format_exception_only(type(error), error)).strip()
    if mine:
        text += "\nraised at (most recent call last):\n" + "".join(traceback.format_list(mine)).rstrip()
    return text


def as_launcher_error(error: Exception) -> LauncherError:
    """Any exception as the line the launcher prints.

    A ``UserError`` (exit 2) when it came out of what the recipe gave the engine (its functions, model, data or loss),
    unless it is the machine's limits (out of memory); else a ``LauncherError`` (exit 1).
    """
    frames = traceback.extract_tb(error.__traceback__)
    from_recipe = any(_users(frame.filename) or Path(frame.filename).resolve() == _RECIPE_HOOKS for frame in frames)
    out_of_memory = isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError"
    return (UserError if from_recipe and not out_of_memory else LauncherError)(describe(error))


def failure_kind(error: BaseException) -> str:
    """What makes two ranks' failures the same one.

    A launcher error's text; another exception's class and the line that raised it (each rank's data may put other
    numbers in its message).
    """
    if isinstance(error, LauncherError) or error.__traceback__ is None:
        return f"{type(error).__name__}: {error}"
    where = traceback.extract_tb(error.__traceback__)[-1]
    return f"{type(error).__name__} at {where.filename}:{where.lineno}"
