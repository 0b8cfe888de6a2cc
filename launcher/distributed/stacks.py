"""Where every rank is: its Python stacks on request, and the line that names the rank a collective waited for.

Each rank runs a ``StackWatch``: a thread that looks for request files (``stacks/request_<id>``) in the run directory
twice a second and answers each with ``stacks/<id>/rank_<r>.txt`` (where training stands, then every thread's stack).
A rank whose collective timed out asks before it fails, and so does ``python -m launcher.stacks RUN_DIR`` for a live
run; any number of askers at once each get every answer. A thread inside the process answers wherever the run
directory is seen (every node of a job shares it) and needs no permission to trace another process, which py-spy does
(and containers often withhold); what it cannot answer is a process stuck in C code that holds the GIL, which the
report then names as silent.

A rank waiting for a batch from its DataLoader's workers asks them too (``WORKER_SIGNAL``, answered by a handler each
worker installs as it starts), and names the line the worker it waits for is in: a recipe's ``__getitem__`` or
``collate`` that hangs, not the rank's wait in ``select``. The handler runs between two of the worker's bytecodes: a
worker stuck in Python (a loop, a sleep, a lock) answers; one stuck in C code, or in a read the kernel restarts (the
handler is installed with SA_RESTART, so that it never fails the recipe's reads with EINTR), is named as silent.

Nothing under the run directory's stacks/ is followed if it is a symbolic link (``_Folder``): a request that would
be is not answered, and the rank says so in one line.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import stat
import sys
import threading
import time
import traceback
import uuid
from pathlib import Path
from types import FrameType

from launcher.errors import user_frames

FOLDER = "stacks"  # in the run directory
POLL_S = 0.5
ANSWER_WAIT_S = 4 * POLL_S  # how long an asker waits for every rank's answer
WORKER_WAIT_S = 2 * POLL_S  # how long a rank waits for its loader workers: its own answer still comes in time
DIAGNOSIS_LIMIT_S = ANSWER_WAIT_S + 5  # a run directory that stops answering (a dead file system) is given up on
# A real-time signal, which nothing else sends (SIGUSR1 and SIGUSR2 are stop signals). A rank ignores it, and its
# workers inherit that until they answer it: its default would end them.
WORKER_SIGNAL = signal.SIGRTMIN + 5 if hasattr(signal, "SIGRTMIN") else None

log = logging.getLogger(__name__)
_process_watch: StackWatch | None = None  # this process's: the DataLoader workers it forks answer through its folder


class Refused(OSError):
    """A path under the run directory's stacks/ is a symbolic link: it is not followed."""


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
        self._asking_workers = threading.Lock()  # their answers' files are per worker, not per request
        self._said: set[str] = set()

    def start(self, run_dir: Path) -> None:
        global _process_watch
        self.folder = run_dir / FOLDER
        if os.environ.get("TORCH_NCCL_DUMP_ON_TIMEOUT") == "1":  # NCCL's flight recorder dumps beside the stacks
            with self._refusals_said("NCCL's flight recorder dumps where torch puts them"):
                _Folder.open(self.folder, create=True).close()
                for name in ("TORCH_NCCL_DEBUG_INFO_TEMP_FILE", "TORCH_FR_DUMP_TEMP_FILE"):  # read when it dumps
                    os.environ.setdefault(name, str(self.folder / "nccl_trace_rank_"))
        self._answered = set(self._requests())  # those left by an earlier attempt are not this one's
        _process_watch = self
        if WORKER_SIGNAL and threading.current_thread() is threading.main_thread():
            signal.signal(WORKER_SIGNAL, signal.SIG_IGN)
        threading.Thread(target=self._watch, name="launcher-stacks", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(POLL_S):
            for request in self._requests():
                if request not in self._answered:
                    self._answered.add(request)
                    with self._refusals_said(f"stack request {request} not answered"):
                        self.answer(request)

    def _requests(self) -> list[str]:
        with self._refusals_said("stack requests not answered"):
            return _requests(self.folder)
        return []

    @contextlib.contextmanager
    def _refusals_said(self, what: str):
        """Run the block; a link it refused is said in one line (once), as ``what`` went undone.

        Any other OSError (a full or read-only disk) leaves it undone silently: the next may not be.
        """
        try:
            yield
        except Refused as refused:
            line = f"{what}: {refused}"
            if line not in self._said:
                self._said.add(line)
                log.warning("%s", line)
        except OSError:
            pass

    def answer(self, request: str) -> None:
        """Write this rank's stacks for ``request`` (atomically: an asker never reads half a file)."""
        main, threads = _stacks()
        stack = self._waited_in or (traceback.extract_stack(main) if main else traceback.StackSummary())
        header = {"request": request, "rank": self.rank, "world_size": self.world_size, "host": socket.gethostname(),
                  "pid": os.getpid(), "step": self.where.step, "phase": self.where.phase, **_where(stack)}
        if self._waited_in:  # a rank that asks because its collective failed: where it waited
            threads.insert(0, "\nWhere its collective timed out:\n" + "".join(self._waited_in.format()))
        else:
            threads += self._loader_workers(main, header)
        with _Folder.open(self.folder, create=True) as stacks, stacks.sub(request, create=True) as answers:
            answers.write(f"rank_{self.rank}.txt", "\n".join([json.dumps(header), *threads]))

    def _loader_workers(self, main: FrameType | None, header: dict) -> list[str]:
        """The stacks of the DataLoader workers the main thread waits for (none: it waits for none), as text.

        The first that answers (the one whose batch it waits for first) is where the rank is: ``header`` says so.
        """
        workers = _waited_workers(main)
        answers = self._ask_workers(workers) if workers else {}
        for worker, _ in workers:
            if worker in answers:
                said = json.loads(answers[worker].partition("\n")[0])
                header.update(at=f"{said['at']} of its DataLoader worker {worker}", in_user_code=said["in_user_code"])
                break
        return [answers[worker].partition("\n")[2] if worker in answers else
                f"\nDataLoader worker {worker} (pid {pid}) did not answer within {WORKER_WAIT_S:g} s (ended, or stuck "
                "outside Python)" for worker, pid in workers]

    def _ask_workers(self, workers: list[tuple[int, int]]) -> dict[int, str]:
        """Worker id -> its answer (a header line, then its stacks), of each of ``workers`` that answered in time."""
        answers: dict[int, str] = {}
        with self._asking_workers, _Folder.open(self.folder, create=True) as stacks:
            asked = {}
            for worker, pid in workers:
                stacks.remove(_worker_answer(self.rank, pid))  # one that came too late for an earlier request
                with contextlib.suppress(ProcessLookupError):  # it ended just now
                    if _live_child(pid):
                        os.kill(pid, WORKER_SIGNAL)
                        asked[worker] = _worker_answer(self.rank, pid)
            deadline = time.monotonic() + WORKER_WAIT_S
            while len(answers) < len(asked) and time.monotonic() < deadline:
                time.sleep(POLL_S / 10)
                for worker, name in asked.items():
                    if worker not in answers and (text := stacks.read(name)) is not None:
                        answers[worker] = text
                        stacks.remove(name)
        return answers

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
            with self._refusals_said("the ranks' stacks not asked for"):
                if self.folder.parent.is_dir():
                    found.append(self._diagnose(timeout_s))

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
            parts = [(f"every rank was in {waiting} when a collective of it did not finish within dist.timeout_s="
                      f"{timeout_s} s: {places}")]
        return "; ".join(parts) + f" (every rank's stacks: {self.folder / request})"


def answer_for_rank() -> None:
    """In a DataLoader worker (from its ``worker_init_fn``): answer its rank's requests for this worker's stacks."""
    if _process_watch is not None and WORKER_SIGNAL:
        signal.signal(WORKER_SIGNAL, _answer_rank)
        signal.siginterrupt(WORKER_SIGNAL, False)


def _answer_rank(signum: int, frame: FrameType | None) -> None:
    """The worker's signal handler: its stacks, where the signal found its main thread, for its rank to read."""
    from torch.utils.data import get_worker_info

    info, pid = get_worker_info(), os.getpid()
    main, threads = _stacks(frame, f" of DataLoader worker {info.id if info else '?'} (pid {pid})")
    header = _where(traceback.extract_stack(main) if main else traceback.StackSummary())
    watch = _process_watch
    with contextlib.suppress(OSError), _Folder.open(watch.folder) as stacks:  # unanswered: its rank says so
        stacks.write(_worker_answer(watch.rank, pid), "\n".join([json.dumps(header), *threads]))


def _worker_answer(rank: int, pid: int) -> str:
    return f".rank_{rank}_worker_{pid}.txt"


def _waited_workers(frame: FrameType | None) -> list[tuple[int, int]]:
    """(id, pid) of each worker of the DataLoader iterator the thread at ``frame`` waits in; none if it waits in none.

    The worker whose batch it waits for comes first. torch's iterator keeps its worker processes in ``_workers``, and
    which worker each batch comes from in ``_task_info``.
    """
    from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter

    while frame is not None and not (frame.f_globals.get("__name__") == "torch.utils.data.dataloader" and
                                     isinstance(frame.f_locals.get("self"), _MultiProcessingDataLoaderIter)):
        frame = frame.f_back
    if frame is None:
        return []
    loader = frame.f_locals["self"]
    awaited = getattr(loader, "_task_info", {}).get(getattr(loader, "_rcvd_idx", None), (None,))[0]
    workers = [(worker, process.pid) for worker, process in enumerate(getattr(loader, "_workers", []))]
    return sorted(workers, key=lambda worker: worker[0] != awaited)


def _live_child(pid: int) -> bool:
    """Whether ``pid`` is a child of this process that has not ended: never signal a stranger that took its pid."""
    try:
        state, parent = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[:2]
    except (OSError, ValueError):
        return False
    return state != "Z" and int(parent) == os.getpid()


def _stacks(main: FrameType | None = None, of: str = "") -> tuple[FrameType | None, list[str]]:
    """The main thread's frame (None: it has none), and every thread's stack as text, the main thread's first.

    ``main`` stands for the main thread's own frame where a signal handler found it (not the handler's); ``of`` says
    whose threads they are.
    """
    main_ident = threading.main_thread().ident
    frames = {**sys._current_frames(), **({main_ident: main} if main else {})}
    names = {thread.ident: thread.name for thread in threading.enumerate()}
    texts = [f"\nThread {names.get(ident, ident)}{of}:\n" + "".join(traceback.format_stack(frame))
             for ident, frame in sorted(frames.items(), key=lambda item: item[0] != main_ident)]
    return frames.get(main_ident), texts


def _where(stack: traceback.StackSummary) -> dict:
    """A header's place: the innermost frame of the user's code (else the innermost), and whether it is innermost."""
    mine = user_frames(stack)
    return {"at": _place(mine[-1] if mine else stack[-1] if stack else None),
            "in_user_code": bool(stack) and bool(user_frames(stack[-1:]))}


def ask(folder: Path) -> str:
    """Ask every live rank of the run for its stacks; returns the request's id."""
    request = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
    with _Folder.open(folder, create=True) as stacks:
        stacks.write(f"request_{request}", request)
    return request


def gather(folder: Path, request: str, ranks: int | None) -> dict[int, dict]:
    """rank -> header of each answer to ``request``, waiting up to ``ANSWER_WAIT_S`` for every rank's.

    ``ranks`` None (not known): as many as the world size the first answer names.
    """
    started = time.monotonic()
    answers: dict[int, dict] = {}
    while True:
        with _Folder.open(folder) as stacks:
            for _, text in _answers(stacks, request):
                header = _header(text)
                if header and header.get("request") == request:
                    answers[header["rank"]] = header
        expected = ranks or max((header.get("world_size", 0) for header in answers.values()), default=0)
        if expected and len(answers) >= expected or time.monotonic() - started > ANSWER_WAIT_S:
            return answers
        time.sleep(POLL_S / 5)


def answer_text(folder: Path, request: str, rank: int) -> str:
    """Rank ``rank``'s answer to ``request``: where training stands (a JSON line), then its stacks."""
    with _Folder.open(folder) as stacks, stacks.sub(request) as answers:
        return answers.read(f"rank_{rank}.txt") or ""


def recent_answers(folder: Path, within_s: float = 4 * ANSWER_WAIT_S) -> dict[int, dict]:
    """rank -> header of each rank's newest answer to any request of the last ``within_s`` seconds.

    Ranks whose collectives timed out together each ask; one that got its answers and ended cannot answer the next
    asker, but its answer to its own request says where it was.
    """
    newest: dict[int, tuple[float, dict]] = {}
    with _Folder.open(folder) as stacks:
        for request in stacks.names():
            with contextlib.suppress(Refused):  # a link planted among them: not an answer, and not followed
                for written, text in _answers(stacks, request):
                    header = _header(text) if time.time() - written < within_s else None
                    if header and written > newest.get(header["rank"], (0.0, None))[0]:
                        newest[header["rank"]] = (written, header)
    return {rank: header for rank, (_, header) in newest.items()}


def forget(folder: Path, request: str) -> None:
    """Remove a request and its answers (an asker that has shown them)."""
    with contextlib.suppress(OSError), _Folder.open(folder) as stacks:
        stacks.remove(f"request_{request}")
        stacks.remove_tree(request)


def _requests(folder: Path | None) -> list[str]:
    if folder is None:
        return []
    with _Folder.open(folder) as stacks:
        return [name.removeprefix("request_") for name in stacks.names() if name.startswith("request_")]


def _answers(stacks: _Folder, request: str) -> list[tuple[float, str]]:
    """(time written, text) of each answer in ``request``'s folder (none: there is no such folder)."""
    try:
        answers = stacks.sub(request)
    except (FileNotFoundError, NotADirectoryError):  # not yet made; a file (a request, a temporary)
        return []
    with answers:
        return [(answers.written(name), text) for name in answers.names()
                if name.startswith("rank_") and (text := answers.read(name)) is not None]


def _at(header: dict) -> Whereabouts:
    where = Whereabouts()
    where.at(header["step"], header["phase"])
    return where


def _place(frame: traceback.FrameSummary | None) -> str:
    return f"{frame.name} ({Path(frame.filename).name}:{frame.lineno})" if frame else "no Python frame"


def _header(text: str) -> dict | None:
    try:
        return json.loads(text.partition("\n")[0])
    except ValueError:
        return None


class _Folder:
    """A folder of the run directory's stacks/, reached without following a symbolic link.

    Anyone who can write the run directory could plant a link at stacks/, at a request's folder, or at a file in them,
    and have every rank write its stacks (and their temporaries) wherever it points. So a folder is opened with
    O_NOFOLLOW, and every name is made, read, replaced and removed relative to it, never through a link; a link met
    raises ``Refused``. (The run directory itself is the user's choice, links and all.)
    """

    def __init__(self, fd: int, path: Path):
        self.fd, self.path = fd, path

    @classmethod
    def open(cls, folder: Path, create: bool = False) -> _Folder:
        """``folder`` (made if ``create``), in a parent reached as the user named it."""
        with cls(os.open(folder.parent, os.O_RDONLY | os.O_DIRECTORY), folder.parent) as parent:
            return parent.sub(folder.name, create)

    def sub(self, name: str, create: bool = False) -> _Folder:
        """The folder ``name`` in this one (made if ``create``)."""
        if create:
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, dir_fd=self.fd)
        try:
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=self.fd)
        except NotADirectoryError:
            self._refuse_link(name)
            raise
        return _Folder(fd, self.path / name)

    def names(self) -> list[str]:
        return os.listdir(self.fd)

    def read(self, name: str) -> str | None:
        """``name``'s text; None if it is not there, or not a plain file (a link, a FIFO that would never end)."""
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=self.fd)
        except OSError:
            return None
        with open(fd, encoding="utf-8", errors="replace") as file:
            return file.read() if stat.S_ISREG(os.fstat(fd).st_mode) else None

    def written(self, name: str) -> float:
        return os.stat(name, dir_fd=self.fd, follow_symlinks=False).st_mtime

    def write(self, name: str, text: str) -> None:
        """Replace ``name`` by ``text`` at once (a reader never sees half), through a temporary of a new name."""
        self._refuse_link(name)
        temporary = f".{name}.{uuid.uuid4().hex[:8]}.tmp"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666, dir_fd=self.fd)
        try:
            with open(fd, "w", encoding="utf-8") as file:
                file.write(text)
            os.replace(temporary, name, src_dir_fd=self.fd, dst_dir_fd=self.fd)
        finally:
            self.remove(temporary)

    def remove(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=self.fd)

    def remove_tree(self, name: str) -> None:
        shutil.rmtree(name, dir_fd=self.fd, ignore_errors=True)

    def _refuse_link(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISLNK(os.stat(name, dir_fd=self.fd, follow_symlinks=False).st_mode):
                raise Refused(f"{self.path / name} is a symbolic link, which stack requests never follow out of the "
                              "run directory: remove it")

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> _Folder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
