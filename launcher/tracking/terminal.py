"""The terminal: rank 0 tells the story on stdout; the other ranks speak only of errors, on stderr.

Rank 0's story is a header, a progress bar or periodic lines, and a line per epoch.
"""

from __future__ import annotations

import logging
import sys
import warnings

import torch

from launcher.distributed.env import DistEnv

log = logging.getLogger("launcher")


def setup_logging(dist_env: DistEnv, level: str = "info") -> None:
    """Rank 0 logs at ``level`` (the ``log.level`` key) to stdout; other ranks only errors, to stderr."""
    logger = logging.getLogger("launcher")
    logger.handlers.clear()
    if dist_env.is_main:
        handler = _AroundProgressBar(sys.stdout)
        logger.setLevel(level.upper())
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f"[rank {dist_env.rank}] %(message)s"))
        logger.setLevel(logging.ERROR)
        warnings.simplefilter("ignore")  # rank 0 shows them; the same warning from every rank is noise
    logger.addHandler(handler)
    logger.propagate = False


class _AroundProgressBar(logging.StreamHandler):
    """Lines written around tqdm's progress bar (cleared, written, drawn again) instead of onto it.

    Plain lines where there is no bar. Other threads log here too (the wandb process's notices).
    """

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream)
        except Exception:
            self.handleError(record)


def log_header(cfg, recipe_name: str, dist_env: DistEnv, device, model, run_dir, data_path: str,
               state_bytes: tuple[int, int, int]) -> None:
    """Rank 0's first line: the recipe, the processes, the batch, the data path, the model and its memory per rank.

    ``state_bytes``: what each rank holds of the weights, gradients and optimizer state.
    """
    from launcher.config.machine import resolve_backend
    from launcher.tracking.summary import parameter_counts

    total, trainable = parameter_counts(model)
    devices = f"cuda ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else device.type
    per_rank, accum = cfg.train.batch_size // dist_env.world_size, cfg.train.grad_accum
    split = f"{per_rank} per rank" if accum == 1 else f"{per_rank // accum} per rank x {accum} accumulated"
    log.info(
        "launcher: recipe %s | %d process(es), backend %s, device %s, %d CPU thread(s) each | batch %d global, %s | "
        "data %s | %s parameters (%s trainable) | per rank: weights %s, gradients %s, optimizer state %s | run dir %s",
        recipe_name, dist_env.world_size, resolve_backend(cfg.dist.backend) if dist_env.is_distributed else "none",
        devices, torch.get_num_threads(), cfg.train.batch_size, split, data_path, f"{total:,}", f"{trainable:,}",
        *map(size, state_bytes), run_dir,
    )


def size(count: float) -> str:
    """A number of bytes for people: 14.7 MB."""
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1000 or unit == "GB":
            return f"{count:,.0f} {unit}" if unit == "B" else f"{count:,.1f} {unit}"
        count /= 1000


def wants_progress_bar(dist_env: DistEnv) -> bool:
    """Rank 0 on a terminal, at info level: a bar; else (a log file, a pipe) plain lines."""
    return dist_env.is_main and sys.stdout.isatty() and log.isEnabledFor(logging.INFO)


def progress_bar(epoch: int, epochs: int, steps_done: int, steps_per_epoch: int):
    from tqdm import tqdm

    return tqdm(total=steps_per_epoch, initial=steps_done, desc=f"epoch {epoch}/{epochs}", unit="step", leave=False,
                dynamic_ncols=True)


def report_steps(report: dict, epoch: int, step_in_epoch: int, steps_per_epoch: int, bar) -> None:
    """A progress report on the bar, or as a line."""
    loss, speed = report["train/loss"], ", ".join(_speed(report))
    if bar is not None:
        bar.set_postfix_str(f"loss {loss:.4f}, {speed}")
    else:
        log.info("epoch %d step %d/%d | loss %.4f | %s", epoch, step_in_epoch, steps_per_epoch, loss, speed)


def format_epoch(record: dict, epochs: int | None) -> str:
    """The per-epoch line: train loss, eval metrics, seconds per epoch, samples per second.

    ``epochs`` None: a stream's run, which has no epochs; its line says the step.
    """
    where = f"epoch {record['epoch']}/{epochs}" if epochs else f"step {record['step']}"
    parts = [where, f"train loss {record['train/loss']:.4f}"]
    parts += [f"{key.replace('/', ' ')} {value:.4f}" for key, value in record.items() if key.startswith("eval/")]
    parts.append(f"{record['time/epoch_s']:.2f} s" + ("/epoch" if epochs else ""))
    parts += _speed(record)
    if "memory/peak_rank" in record:
        peak = record.get("memory/peak_allocated_gib", record["memory/peak_rss_gib"])
        parts.append(f"peak memory {peak:.2f} GiB (rank {record['memory/peak_rank']})")
    return " | ".join(parts)


def _speed(record: dict) -> list[str]:
    """Samples (and tokens) per second, TFLOP/s per device and MFU, where the record has them."""
    speed = [f"{record['throughput/samples_per_s']:,.0f} samples/s"]
    if "throughput/tokens_per_s" in record:
        speed.append(f"{record['throughput/tokens_per_s']:,.0f} tokens/s")
    if "perf/tflops" in record:
        speed.append(f"{record['perf/tflops']:.3g} TFLOP/s per device")
    if "perf/mfu" in record:
        speed.append(f"MFU {record['perf/mfu']:.1%}")
    return speed
