"""Where every rank is: its Python stacks on request, and the line that names the rank a collective waited for.

Each rank runs a ``StackWatch``: a thread that looks for request files (``stacks/request_<id>``) in the run directory
twice a second and answers each with ``stacks/<id>/rank_<r>.txt`` (where training stands, then every thread's stack).
A rank whose collective timed out asks before it fails, and so does ``python -m launcher.stacks RUN_DIR`` for a live
run; any number of askers at once each get every answer. A thread inside the process answers wherever the run
directory is seen (every node of a job shares it) and needs no permission to trace another process, which py-spy does
(and containers often withhold); what it cannot answer is a process stuck in C code that holds the GIL, which the
report then names as silent.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import threading
import time
import traceback
import uuid
from pathlib import Path

from launcher.errors import user_frames

FOLDER = "stacks"  # in the run directory
POLL_S = 0.5
ANSWER_WAIT_S = 4 * POLL_S  # how long an asker waits for every rank's answer
DIAGNOSIS_LIMIT_S = ANSWER_WAIT_S + 5  # a run directory that stops answering (a dead file system) is given up on


class Whereabouts:
    """Where this rank's training stands: the step it is in (0: the setup) and what it is doing, set as it goes."""

    def __init__(self):
        self.step, self.phase = 0, "start"

    def at(self, step: int, phase: str) -> None:
        self.step, self.phase = step, phase

    def describe(self) -> str:
        return f"the setup's {self.phase}" if self.step == 0 else f"the step-{self.step} {self.phase}"


class StackWatch:
    """This rank's answerer of stack requests (a daemon thread, started once the run directory is known)."""

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size
        self.where = Whereabouts()
        self.folder: Path | None = None
        self.diagnosis: str | None = None  # the first diagnose's line, kept: it is asked once, while the run is there
        self._answered: set[str] = set()
        self._waited_in: traceback.StackSummary | None = None  # where this rank's failed collective was called
        self._stop = threading.Event()

    def start(self, run_dir: Path) -> None:
        self.folder = run_dir / FOLDER
        if os.environ.get("TORCH_NCCL_DUMP_ON_TIMEOUT") == "1":  # NCCL's flight recorder dumps beside the stacks
            self.folder.mkdir(exist_ok=True)
            for name in ("TORCH_NCCL_DEBUG_INFO_TEMP_FILE", "TORCH_FR_DUMP_TEMP_FILE"):  # read when it dumps
                os.environ.setdefault(name, str(self.folder / "nccl_trace_rank_"))
        self._answered = set(_requests(self.folder))  # those left by an earlier attempt are not this one's
        threading.Thread(target=self._watch, name="launcher-stacks", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(POLL_S):
            for request in _requests(self.folder):
                if request not in self._answered:
                    self._answered.add(request)
                    try:
                        self.answer(request)
                    except OSError:  # a full or read-only disk: this request goes unanswered, the next may not
                        pass

    def answer(self, request: str) -> None:
        """Write this rank's stacks for ``request`` (atomically: an asker never reads half a file)."""
        main = threading.main_thread()
        frames = sys._current_frames()
        stack = traceback.extract_stack(frames[main.ident]) if main.ident in frames else traceback.StackSummary()
        stack = self._waited_in or stack  # a rank that asks because its collective failed: where it waited
        mine = user_frames(stack)
        header = {"request": request, "rank": self.rank, "host": socket.gethostname(), "pid": os.getpid(),
                  "step": self.where.step, "phase": self.where.phase,
                  "at": _place(mine[-1] if mine else stack[-1] if stack else None),
                  "in_user_code": bool(stack) and bool(user_frames(stack[-1:]))}
        threads = {thread.ident: thread.name for thread in threading.enumerate()}
        text = [json.dumps(header)]
        if self._waited_in:
            text.append("\nWhere its collective timed out:\n" + "".join(self._waited_in.format()))
        for ident, frame in sorted(frames.items(), key=lambda item: item[0] != main.ident):
            text.append(f"\nThread {threads.get(ident, ident)}:\n" + "".join(traceback.format_stack(frame)))
        answers = self.folder / request
        answers.mkdir(parents=True, exist_ok=True)
        _write(answers / f"rank_{self.rank}.txt", "\n".join(text))

    def on_failure(self, error: BaseException, timeout_s: int) -> None:
        """Diagnose a collective's timeout at once, while the run directory is there to ask through.

        (A new run that fails is taken away.)
        """
        from launcher.distributed.group import timed_out_waiting

        if timed_out_waiting(error):
            self._waited_in = traceback.extract_tb(error.__traceback__)
            self.diagnose(timeout_s)

    def diagnose(self, timeout_s: int) -> str | None:
        """Ask every rank where it is; the line naming the ranks that did not reach where this one waits.

        Asked once: later calls return the first's line. None when there is no run directory to ask through, or it
        does not answer within ``DIAGNOSIS_LIMIT_S`` (the plain timeout line will do: the job must end).
        """
        if self.diagnosis is not None or self.folder is None:
            return self.diagnosis
        found: list[str] = []

        def ask_everyone() -> None:
            try:
                if self.folder.parent.is_dir():
                    found.append(self._diagnose(timeout_s))
            except OSError:  # the run directory cannot be written
                pass

        asking = threading.Thread(target=ask_everyone, name="launcher-diagnosis", daemon=True)
        asking.start()
        asking.join(DIAGNOSIS_LIMIT_S)
        self.diagnosis = found[0] if found else None
        return self.diagnosis

    def _diagnose(self, timeout_s: int) -> str:
        request = ask(self.folder)
        self._answered.add(request)
        self.answer(request)  # at once, not at this rank's next poll
        answers = {**recent_answers(self.folder), **gather(self.folder, request, self.world_size)}
        here, waiting = (self.where.step, self.where.phase), self.where.describe()
        parts = []
        for rank, header in sorted(answers.items()):
            if rank == self.rank:
                continue
            if (header["step"], header["phase"]) != here:
                parts.append(f"rank {rank} did not reach {waiting} within dist.timeout_s={timeout_s} s; it was in "
                             f"{header['at']}, in {_at(header).describe()}")
            elif header["in_user_code"]:  # the collective comes after the recipe's code, which it is still in
                parts.append(f"rank {rank} did not reach the collective in {waiting} within dist.timeout_s="
                             f"{timeout_s} s; it was in {header['at']}")
        parts += [f"rank {rank} did not answer within {ANSWER_WAIT_S:g} s (ended, or stuck outside Python)"
                  for rank in range(self.world_size) if rank not in answers]
        if not parts:  # every rank waits in the same place (a collective inside the recipe's forward, under fsdp)
            places = "; ".join(f"rank {rank} in {header['at']}" for rank, header in sorted(answers.items()))
            parts = [f"every rank was in {waiting} when a collective of it did not finish within dist.timeout_s="
                     f"{timeout_s} s: {places}"]
        return "; ".join(parts) + f" (every rank's stacks: {self.folder / request})"


def ask(folder: Path) -> str:
    """Ask every live rank of the run for its stacks; returns the request's id."""
    folder.mkdir(exist_ok=True)
    request = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
    _write(folder / f"request_{request}", request)
    return request


def gather(folder: Path, request: str, ranks: int | None) -> dict[int, dict]:
    """rank -> header of each answer to ``request``, waiting up to ``ANSWER_WAIT_S`` for ``ranks`` of them.

    ``ranks`` None (not known): until no new answer came for two polls' time after the first.
    """
    started = time.monotonic()
    answers: dict[int, dict] = {}
    last_new = None
    while True:
        for path in (folder / request).glob("rank_*.txt"):
            header = _header(path)
            if header and header.get("request") == request and header["rank"] not in answers:
                answers[header["rank"]], last_new = header, time.monotonic()
        now = time.monotonic()
        if ranks is not None and len(answers) >= ranks or now - started > ANSWER_WAIT_S:
            return answers
        if ranks is None and last_new is not None and now - last_new > 2 * POLL_S:
            return answers
        time.sleep(POLL_S / 5)


def recent_answers(folder: Path, within_s: float = 4 * ANSWER_WAIT_S) -> dict[int, dict]:
    """rank -> header of each rank's newest answer to any request of the last ``within_s`` seconds.

    Ranks whose collectives timed out together each ask; one that got its answers and ended cannot answer the next
    asker, but its answer to its own request says where it was.
    """
    newest: dict[int, tuple[float, dict]] = {}
    for path in folder.glob("*/rank_*.txt"):
        try:
            written = path.stat().st_mtime
        except OSError:
            continue
        header = _header(path) if time.time() - written < within_s else None
        if header and written > newest.get(header["rank"], (0.0, None))[0]:
            newest[header["rank"]] = (written, header)
    return {rank: header for rank, (_, header) in newest.items()}


def forget(folder: Path, request: str) -> None:
    """Remove a request and its answers (an asker that has shown them)."""
    (folder / f"request_{request}").unlink(missing_ok=True)
    shutil.rmtree(folder / request, ignore_errors=True)


def _requests(folder: Path | None) -> list[str]:
    try:
        return [path.name.removeprefix("request_") for path in folder.glob("request_*")] if folder else []
    except OSError:
        return []


def _at(header: dict) -> Whereabouts:
    where = Whereabouts()
    where.at(header["step"], header["phase"])
    return where


def _place(frame: traceback.FrameSummary | None) -> str:
    return f"{frame.name} ({Path(frame.filename).name}:{frame.lineno})" if frame else "no Python frame"


def _header(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text().partition("\n")[0])
    except (OSError, ValueError):
        return None


def _write(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_text(text)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
