"""One training process: join the job's process group, train (or only evaluate), leave the group together."""

from __future__ import annotations

import torch
import torch.distributed as dist

from launcher.distributed.env import DistEnv, cpu_threads, device_for
from launcher.distributed.group import destroy_process_group, init_process_group, peer_failure, timed_out_waiting
from launcher.distributed.stacks import StackWatch
from launcher.distributed.stop import StopRequested, StopSignals
from launcher.distributed.strategy import is_sharded
from launcher.engine.evaluate import evaluate_only
from launcher.engine.trainer import Trainer
from launcher.errors import LauncherError, as_launcher_error, failure_kind, from_loader_worker
from launcher.recipe import Recipe


def run_worker(cfg, recipe: Recipe, dist_env: DistEnv, signals: StopSignals) -> None:
    """Train ``recipe`` as this process's part of the job described by ``dist_env``."""
    torch.set_num_threads(cpu_threads(dist_env, cfg.dist.threads))  # before anything runs on the CPU
    device = device_for(dist_env, cfg.dist.backend)
    job_store = init_process_group(dist_env, cfg.dist.backend, device, cfg.dist.timeout_s,
                                   even_alone=is_sharded(cfg))
    signals.job_store = job_store
    watch = StackWatch(dist_env.rank, dist_env.world_size)
    try:
        _work(cfg, recipe, dist_env, device, signals, watch)
    except StopRequested:
        raise
    except BaseException as caught:
        signals.failing = True  # torchrun's SIGTERM, once another rank ends, must not cut this rank's line short
        error = from_loader_worker(caught)
        # Anything else (a recipe's sys.exit or KeyboardInterrupt included) becomes the one line the launcher prints.
        failure = error if isinstance(error, LauncherError) else as_launcher_error(error)
        # Asked before this rank's failure is reported: the report makes torchrun end the others, whose stacks the
        # diagnosis needs.
        waited = peer_failure(error, cfg.dist.timeout_s, job_store, watch.diagnose)
        repeats = None
        # The others stop at once when torchrun ends them. Not said by a rank other than 0 of an error every rank
        # raises, which rank 0 prints: rank 0 might then take torchrun's SIGTERM for the end of a failed job, and
        # leave before printing it. Nor by a rank that lost another (a closed connection): it did not fail, and the
        # others would name it as the one that did.
        said_by_rank_0 = failure.same_on_all_ranks and not dist_env.is_main
        lost_another = waited is not None and not timed_out_waiting(error)
        if job_store and not said_by_rank_0 and not lost_another:
            repeats = job_store.report_failure(f"rank {dist_env.rank}", failure_kind(error))
        if waited:
            if lost_another:  # the rank that ended first said why, if it said so in the store
                waited.repeats = _reported_by_another(job_store, dist_env.rank)
            raise waited from None
        if not failure.same_on_all_ranks:
            failure.repeats = repeats
        if failure is caught:
            raise
        raise failure from None
    finally:
        watch.stop()
        destroy_process_group()


def _reported_by_another(job_store, rank: int) -> str | None:
    """The rank that said in the job's store that it failed, if not this one: it prints its own line."""
    failed = job_store.failure() if job_store else None
    return failed if failed and failed != f"rank {rank}" else None


def _work(cfg, recipe: Recipe, dist_env: DistEnv, device, signals: StopSignals, watch: StackWatch) -> None:
    if cfg.eval.only:
        evaluate_only(cfg, recipe, dist_env, device)
        return
    trainer = Trainer.build(cfg, recipe, dist_env, device, signals, watch)
    if trainer is None:
        return
    trainer.run()
    if dist_env.is_distributed:
        # Leave together: a rank tearing down its connections while rank 0 still evaluates can abort in gloo.
        dist.barrier()
