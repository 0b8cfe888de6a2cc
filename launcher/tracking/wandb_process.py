"""The wandb process: rank 0's wandb run lives here, fed JSON lines through a pipe, so training carries none of it.

In the training process, every ``wandb.log`` cost milliseconds of Python and thread hand-offs, and training waited
for wandb to import and start before its first step. Here the training process pays one pipe write per record
(a fraction of that: ``bench/wandb_log.py``, BENCHMARKS.md) and waits for nothing; wandb starts, logs and finishes on
its own time, at nice 10.

    python -m launcher.tracking.wandb_process   # stdin: {"start": {...}} (or {"finish": true}: no run),
                                       # then {"log": ..., "step": N} / {"text": {key: text}, "step": N} /
                                       # {"summary": ...},
                                       # then {"finish": true}

It finishes the run and ends on the finish message, or when its stdin closes (the training process died); it is
never cut short by a signal meant for training (Ctrl-C, Slurm's preemption SIGTERM). The finish message is needed:
data-loader workers forked from the training process hold copies of the pipe, so closing it is no end of input.
"""

from __future__ import annotations

import html
import json
import logging
import os
import queue
import signal
import socket
import sys
import threading
from pathlib import Path
from urllib.parse import urlparse

log = logging.getLogger("launcher.wandb")


def _has_credentials() -> bool:
    """Whether W&B credentials are configured (API key in the environment or from `wandb login`).

    Asked of wandb itself without any prompt or network call.
    """

    try:
        from wandb.sdk.lib.wbauth.authenticate import authenticate_session

        host = _base_url()
        return authenticate_session(host=host, source="launcher", prompt=False, update_session=False) is not None
    except Exception:  # an older or newer wandb without this helper: offline is the safe guess
        return False


def _base_url() -> str:
    """The W&B server wandb.init will use (wandb.Settings() alone does not read WANDB_BASE_URL)."""
    import wandb

    return os.environ.get("WANDB_BASE_URL") or wandb.Settings().base_url


def _reachable(url: str) -> bool:
    """Whether the W&B server answers a TCP connection within 3 s.

    Without a network, online mode would wait its whole init timeout before failing.
    """
    address = urlparse(url)
    port = address.port or (443 if address.scheme == "https" else 80)
    try:
        socket.create_connection((address.hostname, port), timeout=3).close()
    except OSError:
        return False
    return True


def init_run(mode: str, options: dict):
    """The wandb run (online falling back to offline, with every record), or None after a warning."""
    try:
        import wandb

        if mode == "auto":
            mode = "online" if _has_credentials() else "offline"
        base_url = _base_url()
        if mode == "online" and not _reachable(base_url):
            log.warning("wandb: %s cannot be reached; logging offline instead", base_url)
            mode = "offline"
        # No console capture (the launcher logs itself); a bounded wait for the server (WANDB_INIT_TIMEOUT wins).
        timeout = {} if "WANDB_INIT_TIMEOUT" in os.environ else {"init_timeout": 30}
        options["settings"] = wandb.Settings(silent=True, console="off", **timeout)
    except Exception as error:
        log.warning("wandb could not start (%s: %s); its records stay in metrics.jsonl", type(error).__name__, error)
        return None
    for attempt in (mode, "offline") if mode == "online" else (mode,):
        try:
            run = wandb.init(mode=attempt, **options)
        except Exception as error:
            log.warning("wandb could not start in %s mode (%s: %s)%s", attempt, type(error).__name__,
                        str(error).splitlines()[0] if str(error) else "",
                        "; logging offline instead" if attempt == "online" else "; its records stay in metrics.jsonl")
            wandb.teardown()  # else the offline start finds the run "in use" by the failed one
            continue
        if attempt == "offline":
            log.info("wandb: offline run %s; upload it with `wandb sync %s`", run.id, run.dir.removesuffix("/files"))
        else:
            log.info("wandb: %s", run.url)
        return run
    return None


def _stderr_to_file(path: Path) -> None:
    """Send what wandb and its service print on their own to a file in the run's wandb folder.

    That is retries and exporter errors, which then stay off the training's terminal.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as file:
        os.dup2(file.fileno(), 2)


class _ToTrainingProcess(logging.Handler):
    """Notices go back to the training process through stdout ("LEVEL<tab>text" lines).

    The training process logs them like its own (around its progress bar). Once it has gone (a run that finishes in the
    background), they go to stderr.
    """

    def emit(self, record: logging.LogRecord) -> None:
        text = self.format(record).replace("\n", " ")
        try:
            sys.stdout.write(f"{record.levelname}\t{text}\n")
            sys.stdout.flush()
        except (OSError, ValueError):  # the training process has gone: wandb-process.log keeps it
            sys.stderr.write(f"launcher: {text}\n")


def apply(run, message: dict) -> None:
    """One message from the training process, done to the run."""
    if "log" in message:
        run.log(message["log"], step=message["step"])
    elif "text" in message:
        import wandb

        run.log({key: wandb.Html(f"<pre>{html.escape(text)}</pre>") for key, text in message["text"].items()},
                step=message["step"])
    elif "summary" in message:
        run.summary.update(message["summary"])
    else:
        raise ValueError(f"unknown message {sorted(message)}")


def read_messages(lines, messages: queue.SimpleQueue) -> None:
    """Every line, parsed, onto ``messages``, then None.

    Read at once so that the training process never blocks on a full pipe while wandb is still starting (an online start
    may take its whole 30 s timeout).
    """
    for line in lines:
        messages.put(json.loads(line))
    messages.put(None)


def main() -> None:
    # Training first: where the training processes fill every core (a CPU run), wandb (and the wandb-core service
    # it starts, which inherits this) takes what they leave instead of taking turns with them.
    os.nice(10)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)  # training handles these; this process ends as training says
    messages: queue.SimpleQueue = queue.SimpleQueue()
    threading.Thread(target=read_messages, args=(sys.stdin, messages), daemon=True).start()
    try:  # the slow part of starting, done while training sets up; the start message comes once setup passed
        import wandb  # noqa: F401
    except Exception:
        pass  # init_run reports it
    first = messages.get()
    if first is None or "start" not in first:
        return  # the start failed before it began a wandb run: none is made
    start = first["start"]
    _stderr_to_file(Path(start["options"]["dir"]) / "wandb" / "wandb-process.log")  # tracking.NOTICES_FILE
    log.addHandler(_ToTrainingProcess())
    log.setLevel(logging.INFO)
    log.propagate = False
    run = init_run(start["mode"], start["options"])
    while (message := messages.get()) is not None and "finish" not in message:
        if run is None:
            continue  # keep draining: the training process must never block on this pipe
        try:
            apply(run, message)
        except Exception as error:
            log.warning("wandb failed (%s: %s); its records stay in metrics.jsonl",
                        type(error).__name__, error)
            run = None
    if run is not None:
        run.finish()


if __name__ == "__main__":
    main()
