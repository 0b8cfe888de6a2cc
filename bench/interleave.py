"""Run under torchrun: the launcher's training loop and the plain loop in the same processes, in alternating chunks.

    torchrun --standalone --nproc_per_node 2 bench/interleave.py --arch mlp [--chunks 54 --chunk-steps 15] \
        [launcher key=value ...]

The launcher side is built by the launcher itself (``Trainer.build``: metrics file, checkpointer, wandb run,
resumable sampler, scheduler, stop agreement) and trained by ``Trainer.train_steps``; the plain side is
``bench/plain_ddp.py``'s loop. A third side, ``plain_again``, is a second plain loop (its own model and loader):
its ratio to the first, the A/A control, is what the harness reads for two identical loops, so it shows how far
a launcher ratio can move by chance. Each round of chunks runs the three sides in a rotating order (each side as
often first, second and last) so that all see the same machine; a barrier before each chunk lines the ranks up
(not timed). Rank 0 prints one JSON object.

On a machine with GPUs (``dist.backend=auto`` then picks nccl, one GPU per process) both loops train there, with
what the launcher's config asks for (``train.amp=bf16 train.channels_last=true train.compile=true``), and each
chunk's time includes finishing the work it queued. ``--data-wait`` adds a fourth side: the launcher's loop on one
batch kept on the device; what loading the data adds over it is the time the GPU waits for data.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent))
import workload  # noqa: E402
from plain_ddp import build_plain, plain_steps, resident_batches  # noqa: E402

from launcher.cli.main import exit_process, load_validated  # noqa: E402
from launcher.distributed.env import DistEnv, device_for  # noqa: E402
from launcher.distributed.group import destroy_process_group, init_process_group  # noqa: E402
from launcher.distributed.stop import StopSignals  # noqa: E402
from launcher.engine.data import start_epoch  # noqa: E402
from launcher.engine.trainer import Trainer  # noqa: E402
from launcher.tracking.terminal import setup_logging  # noqa: E402


def timed(counter: workload.SyncCounter, side: str, run, device: torch.device) -> tuple[float, float]:
    """Wall and CPU seconds (this process, all threads) of ``run()``, with the ranks lined up before it and, on a
    GPU, the work it queued finished within it."""
    finish_queued = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    finish_queued()
    if dist.is_initialized():
        dist.barrier()
    wall, cpu = time.perf_counter(), time.process_time()
    with counter.counting(side):
        run()
        finish_queued()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", choices=sorted(workload.ARCHS), default="lenet")
    parser.add_argument("--chunks", type=int, default=54, help="timed chunks per side (9 x the 6 orders)")
    parser.add_argument("--chunk-steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=100, help="untimed steps per side first")
    parser.add_argument("--data-wait", action="store_true",
                        help="also time the launcher's loop on one batch kept on the device: the data wait fraction")
    parser.add_argument("--unobserved", action="store_true",
                        help="also time the launcher's loop with its observability stubbed out: what it costs")
    parser.add_argument("--limit", action="store_true",
                        help="also time the limit: a plain loop on data resident on the device, compiled on a GPU")
    args, overrides = parser.parse_known_args()
    dist_env = DistEnv.from_environ()
    setup_logging(dist_env, "warning")
    run_dir = Path(tempfile.gettempdir()) / f"launcher-bench-{dist_env.job_id}"  # a fresh run: nothing to resume
    _, recipe, cfg = load_validated([f"recipe={Path(__file__).parent / 'workload.py'}", f"model.arch={args.arch}",
                                     f"run.dir={run_dir}", "log.level=warning", *overrides], dist_env)
    readers = 2 if args.unobserved else 1  # the launcher sides read one epoch's batches in turn
    if readers * (args.warmup + args.chunks * args.chunk_steps) > workload.TRAIN_SAMPLES // cfg.train.batch_size:
        raise SystemExit(f"{'2 x ' if args.unobserved else ''}(warmup + chunks * chunk-steps) must fit in one epoch "
                         f"({workload.TRAIN_SAMPLES // cfg.train.batch_size} steps)")
    device = device_for(dist_env, cfg.dist.backend)
    init_process_group(dist_env, cfg.dist.backend, device, cfg.dist.timeout_s)
    counter = workload.SyncCounter()
    trainer = Trainer.build(cfg, recipe, dist_env, device, StopSignals(dist_env))
    loader = trainer.train_loader
    start_epoch(loader, 1, 0, cfg.train.batch_size)

    def launcher_on(batches):
        """The launcher's loop on ``batches``: ``run(steps)``."""
        def run(steps):
            return trainer.train_steps(batches, until_step=trainer.position.global_step + steps)
        run.batches = batches
        return run

    # The data set itself: a DataLoader's (data.resident=never) reads it through the launcher's seeded keys.
    train_set = getattr(loader.dataset, "dataset", loader.dataset)
    sides = {"launcher": launcher_on(iter(loader)), "plain": plain_side(train_set, cfg, device),
             "plain_again": plain_side(train_set, cfg, device)}
    if args.unobserved:
        sides["launcher_unobserved"] = unobserved(trainer, launcher_on(sides["launcher"].batches))
    if args.limit:
        sides["limit"] = limit_side(train_set, cfg, device)
    if args.data_wait:
        inputs, targets = next(iter(loader))
        resident = itertools.repeat((trainer.precision.to_memory_format(inputs.to(device)), targets.to(device)))
        sides["launcher_resident"] = launcher_on(resident)
    for run in sides.values():
        run(args.warmup)
    times = {side: [] for side in sides}
    for chunk in range(args.chunks):
        for side in rotation(list(sides), chunk):
            times[side].append(timed(counter, side, lambda: sides[side](args.chunk_steps), device))
    trainer.close("finished")
    if dist_env.is_main:
        result = summarize(times, counter, args, dist_env.world_size, cfg.train.batch_size)
        device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        print(json.dumps({**result, "device": device_name, "launcher_args": overrides}))
    destroy_process_group()
    if dist_env.is_main:
        shutil.rmtree(run_dir, ignore_errors=True)


class _Nothing:
    """Takes any call and does nothing."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def unobserved(trainer: Trainer, run):
    """``run`` with what the Trainer does to be seen stubbed out: the whereabouts a hang's report reads, each rank's own
    time and memory peaks (and their ride on the stop agreement), FLOPs, memory and straggler metrics in the reports.
    The launcher side's time over this side's is what they cost."""
    from launcher.engine.flops import Throughput

    quiet_report = _Nothing()
    quiet_report.take, quiet_report.memory = (lambda samples: ({}, None)), (lambda samples: {})

    def side(steps):
        kept = trainer.where, trainer.rank_stats, trainer.stop._measure, trainer.throughput, trainer.rank_report
        # The agreement keeps its size (a chunk's last one is read in the next chunk): only the sampling is left out.
        trainer.where, trainer.rank_stats, trainer.stop._measure = _Nothing(), _Nothing(), lambda: [0.0] * 5
        trainer.throughput = Throughput(trainer.throughput.tokens_per_sample, None, None, 1)
        trainer.rank_report = quiet_report
        try:
            run(steps)
        finally:
            trainer.where, trainer.rank_stats, trainer.stop._measure, trainer.throughput, trainer.rank_report = kept
    return side


def plain_side(train_set, cfg, device: torch.device):
    """A plain loop of its own (model, optimizer, loader) over ``train_set``, set up as ``cfg`` asks the launcher
    to: ``run(steps)``."""
    plain = build_plain(train_set, cfg, device)
    plain.loader.sampler.set_epoch(0)
    batches = iter(plain.loader)
    return lambda steps: plain_steps(plain, batches, steps)


def limit_side(train_set, cfg, device: torch.device):
    """A plain loop as fast as a hand-written one gets: its data set on the device, indexed there, and (on a GPU)
    compiled: ``run(steps)``."""
    limit_cfg = OmegaConf.merge(cfg, {"train": {"compile": device.type == "cuda"}})
    limit = build_plain(train_set, limit_cfg, device)
    batches = resident_batches(train_set, limit_cfg, device)
    return lambda steps: plain_steps(limit, batches, steps)


def observability(times: dict, wall: dict) -> dict:
    """What the launcher's observability costs: its time over the unobserved side's, overall and chunk by chunk."""
    ratios = [seen[0] / unseen[0] for seen, unseen in zip(times["launcher"], times["launcher_unobserved"])]
    return {"observability_cost": wall["launcher"] / wall["launcher_unobserved"] - 1,
            "observability_chunk_ratio": {"median": statistics.median(ratios), "min": min(ratios),
                                          "max": max(ratios)}}


def rotation(sides: list[str], chunk: int) -> list[str]:
    """Round ``chunk``'s order: rotated by one each round, and reversed every other cycle of rotations (ABC, BCA,
    CAB, then CBA, ACB, BAC): each side runs equally often in each position and after each other side."""
    shift = chunk % len(sides)
    order = sides[shift:] + sides[:shift]
    return order[::-1] if chunk // len(sides) % 2 else order


def summarize(times: dict, counter: workload.SyncCounter, args, world: int, batch_size: int) -> dict:
    steps = args.chunks * args.chunk_steps
    wall = {side: sum(t for t, _ in chunks) for side, chunks in times.items()}
    ratios = [plain[0] / launcher[0] for launcher, plain in zip(times["launcher"], times["plain"])]
    control = [plain[0] / again[0] for again, plain in zip(times["plain_again"], times["plain"])]
    return {
        "arch": args.arch, "procs": world, "global_batch": batch_size, "chunks": args.chunks,
        "chunk_steps": args.chunk_steps,
        **{f"{side}_steps_per_s": steps / wall[side] for side in times},
        **{f"{side}_samples_per_s": steps * batch_size / wall[side] for side in times},
        "ratio": wall["plain"] / wall["launcher"],  # launcher steps/s over plain steps/s, all chunks together
        "chunk_ratio": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)},
        # The A/A control: the second plain loop's steps/s over the first's (1.0 but for the harness's noise).
        "control_ratio": wall["plain"] / wall["plain_again"],
        "control_chunk_ratio": {"median": statistics.median(control), "min": min(control), "max": max(control)},
        # The share of the launcher's time that loading data adds to the same steps on a batch already on the
        # device: on a GPU, the time it waits for data.
        **({"data_wait_fraction": 1 - wall["launcher_resident"] / wall["launcher"]} if "launcher_resident" in wall
           else {}),
        **({"ratio_to_limit": wall["limit"] / wall["launcher"]} if "limit" in wall else {}),
        **(observability(times, wall) if "launcher_unobserved" in wall else {}),
        **{f"{side}_cpu_ms_per_step": 1000 * sum(c for _, c in chunks) / steps for side, chunks in times.items()},
        **{f"{side}_{kind}_per_step": counter.counts.get(side, {}).get(kind, 0) / steps for side in times
           for kind in ("host_reads", "collectives")},
    }


if __name__ == "__main__":
    main()
    exit_process(0)  # its gloo group outlives destroy_process_group: ended as a launcher worker is
