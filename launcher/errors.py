"""Errors that end a run with a message instead of a traceback, and how any other exception becomes one."""

from __future__ import annotations

import re
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


def as_launcher_error(error: BaseException) -> LauncherError:
    """Any exception as the line the launcher prints.

    A ``UserError`` (exit 2) when it came out of what the recipe gave the engine (its functions, model, data or loss),
    unless it is the machine's limits (out of memory); else a ``LauncherError`` (exit 1).
    """
    frames = traceback.extract_tb(error.__traceback__)
    from_recipe = any(_users(frame.filename) or Path(frame.filename).resolve() == _RECIPE_HOOKS for frame in frames)
    out_of_memory = isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError"
    return (UserError if from_recipe and not out_of_memory else LauncherError)(describe(error))


_LOADER_WORKER = re.compile(r"Caught \S+ in DataLoader worker process \d+\.\n"
                            r"Original Traceback \(most recent call last\):\n")
_TEXT_FRAME = re.compile(r'^  File "(.+?)", line (\d+), in (.+)\n(?:    .*\n)?(?:\s*[~^]+\n)?', re.M)


def from_loader_worker(error: BaseException) -> BaseException:
    """An error a DataLoader worker raised, as the process would have raised it: its own line and the user's frames.

    The DataLoader re-raises a worker's exception in the process with torch's wrapper line and the worker's whole
    traceback as its message (every frame of torch's); a launcher error gets its own message back (and exit code),
    any other the user's frames, as ``describe`` gives them. Any other error is returned unchanged.
    """
    text = str(error)
    wrapped = _LOADER_WORKER.match(text)
    if not wrapped:
        return error
    original = text[wrapped.end():]
    frames = list(_TEXT_FRAME.finditer(original))
    said = original[frames[-1].end():] if frames else original
    line = said.strip().splitlines()[0] if said.strip() else type(error).__name__
    if isinstance(error, LauncherError):
        return type(error)(line.partition(": ")[2] or line, same_on_all_ranks=error.same_on_all_ranks)
    mine = [traceback.FrameSummary(frame[1], int(frame[2]), frame[3]) for frame in frames if _users(frame[1])]
    if mine:
        line += "\nraised at (most recent call last), in a DataLoader worker:\n" + "".join(
            traceback.format_list(mine)).rstrip()
    return (UserError if mine else LauncherError)(line)


def failure_kind(error: BaseException) -> str:
    """What makes two ranks' failures the same one.

    A launcher error's text; another exception's class and the line that raised it (each rank's data may put other
    numbers in its message).
    """
    if isinstance(error, LauncherError) or error.__traceback__ is None:
        return f"{type(error).__name__}: {error}"
    where = traceback.extract_tb(error.__traceback__)[-1]
    return f"{type(error).__name__} at {where.filename}:{where.lineno}"


def first_line(error: BaseException) -> str:
    """The first line of an exception's message ('' for none): a server's error may run to pages."""
    text = str(error).strip()
    return text.splitlines()[0] if text else ""


def described(error: BaseException) -> str:
    """An exception in one line: its class and its message's first line."""
    return f"{type(error).__name__}: {first_line(error)}"
