"""Where every rank is: its Python stacks on request, and the line that names the rank a collective waited for.

Each rank runs a ``StackWatch``: a thread that looks for a request file in the run directory's ``stacks/`` twice a
second and answers it with ``rank_<r>.txt`` (where training stands, then every thread's stack). A rank whose
collective timed out asks before it fails, and so does ``python -m launcher.stacks RUN_DIR`` for a live run. A
thread inside the process answers wherever the run directory is seen (every node of a job shares it) and needs no
permission to trace another process, which py-spy does (and containers often withhold); what it cannot answer is a
process stuck in C code that holds the GIL, which the report then names as silent.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import traceback
import uuid
from pathlib import Path

from launcher.distributed.group import timed_out_waiting
from launcher.errors import user_frames

FOLDER = "stacks"  # in the run directory
REQUEST = "request"
POLL_S = 0.5
ANSWER_WAIT_S = 4 * POLL_S  # how long an asker waits for every rank's answer


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
        self._answered: str | None = None
        self._stop = threading.Event()

    def start(self, run_dir: Path) -> None:
        self.folder = run_dir / FOLDER
        if os.environ.get("TORCH_NCCL_DUMP_ON_TIMEOUT") == "1":  # NCCL's flight recorder dumps beside the stacks
            self.folder.mkdir(exist_ok=True)
            for name in ("TORCH_NCCL_DEBUG_INFO_TEMP_FILE", "TORCH_FR_DUMP_TEMP_FILE"):  # read when it dumps
                os.environ.setdefault(name, str(self.folder / "nccl_trace_rank_"))
        self._answered = _request_id(self.folder)  # a request left by an earlier attempt is not this one's
        threading.Thread(target=self._watch, name="launcher-stacks", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(POLL_S):
            request = _request_id(self.folder)
            if request and request != self._answered:
                self._answered = request
                self.answer(request)

    def answer(self, request: str) -> None:
        """Write this rank's stacks for ``request`` (atomically: an asker never reads half a file)."""
        main = threading.main_thread()
        frames = sys._current_frames()
        stack = traceback.extract_stack(frames[main.ident]) if main.ident in frames else traceback.StackSummary()
        mine = user_frames(stack)
        header = {"request": request, "rank": self.rank, "host": socket.gethostname(), "pid": os.getpid(),
                  "step": self.where.step, "phase": self.where.phase,
                  "at": _place(mine[-1] if mine else stack[-1] if stack else None),
                  "in_user_code": bool(stack) and bool(user_frames(stack[-1:]))}
        threads = {thread.ident: thread.name for thread in threading.enumerate()}
        text = [json.dumps(header)]
        for ident, frame in sorted(frames.items(), key=lambda item: item[0] != main.ident):
            text.append(f"\nThread {threads.get(ident, ident)}:\n" + "".join(traceback.format_stack(frame)))
        _write(self.folder / f"rank_{self.rank}.txt", "\n".join(text))

    def on_failure(self, error: BaseException, timeout_s: int) -> None:
        """Diagnose a collective's timeout at once, while the run directory is there to ask through.

        (A new run that fails is taken away.)
        """
        if timed_out_waiting(error):
            self.diagnose(timeout_s)

    def diagnose(self, timeout_s: int) -> str | None:
        """Ask every rank where it is; the line naming the ranks that did not reach where this one waits.

        Asked once: later calls return the first's line. None when there is no run directory to ask through.
        """
        if self.diagnosis is None and self.folder is not None and self.folder.parent.is_dir():
            try:
                self.diagnosis = self._diagnose(timeout_s)
            except OSError:  # the run directory cannot be written: the plain timeout line will do
                pass
        return self.diagnosis

    def _diagnose(self, timeout_s: int) -> str:
        answers = gather(self.folder, ask(self.folder), self.world_size, self)
        here, waiting = (self.where.step, self.where.phase), self.where.describe()
        parts = []
        for rank, header in sorted(answers.items()):
            if rank == self.rank:
                continue
            elsewhere = (header["step"], header["phase"]) != here
            if elsewhere:
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
        return "; ".join(parts) + f" (every rank's stacks: {self.folder})"


def ask(folder: Path) -> str:
    """Ask every live rank of the run for its stacks; returns the request's id."""
    folder.mkdir(exist_ok=True)
    request = uuid.uuid4().hex
    _write(folder / REQUEST, request)
    return request


def gather(folder: Path, request: str, ranks: int | None, watch: StackWatch | None = None) -> dict[int, dict]:
    """rank -> header of each answer to ``request``, waiting up to ``ANSWER_WAIT_S`` for ``ranks`` of them.

    ``watch``: this process's own, which answers at once instead of at its next poll.
    """
    if watch is not None:
        watch._answered = request
        watch.answer(request)
    deadline, answers = time.monotonic() + ANSWER_WAIT_S, {}
    while True:
        for path in folder.glob("rank_*.txt"):
            header = _header(path)
            if header and header.get("request") == request:
                answers[header["rank"]] = header
        if (ranks is not None and len(answers) >= ranks) or time.monotonic() > deadline:
            return answers
        time.sleep(POLL_S / 5)


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


def _request_id(folder: Path) -> str | None:
    try:
        return (folder / REQUEST).read_text().strip() or None
    except OSError:
        return None


def _write(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)
