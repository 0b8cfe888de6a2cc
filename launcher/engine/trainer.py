"""The Trainer: one rank's part of a run, from a locked run directory to the final model.

It owns the model, the optimizer and the training state (engine/state.py: position, schedule, loss sums, random
streams) and their collaborators (loader, checkpointer, records, stop agreement), so the loop's methods read what
they need from it instead of passing it along.
"""

from __future__ import annotations

import gc
import logging
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist

from launcher.checkpoint.checkpointer import Checkpointer, TrainingDiverged
from launcher.checkpoint.files import save_model
from launcher.checkpoint.formats import load_named
from launcher.data.streams import StreamLoader, first_sample
from launcher.distributed.env import DistEnv
from launcher.distributed.group import on_main, run_agreed
from launcher.distributed.stacks import StackWatch
from launcher.distributed.stop import GracefulStop, StopRequested, StopSignals
from launcher.distributed.strategy import strategy_for
from launcher.engine.batches import prefetched, to_device
from launcher.engine.build import build_model_and_data, seed_everything
from launcher.engine.data import build_train_loader, data_path, start_epoch, steps_per_epoch
from launcher.engine.evaluate import evaluate, on_every_rank
from launcher.engine.flops import Throughput, flops_per_sample, matmul_precision, peak_tflops
from launcher.engine.host_memory import keep_freed_memory
from launcher.engine.optim import build_optimizer, build_scheduler
from launcher.engine.precision import Precision
from launcher.engine.profile import StepProfiler
from launcher.engine.rank_stats import RankReport, RankStats, state_bytes
from launcher.engine.state import Position, TrainingState, random_streams_kept
from launcher.errors import UserError
from launcher.recipe import Recipe
from launcher.run.attempt import Attempt
from launcher.run.start import Start, plan_start
from launcher.tracking import terminal
from launcher.tracking.summary import parameter_counts, summarize, write_summary

log = logging.getLogger(__name__)


class Trainer:
    """One rank's run. ``Trainer.build`` makes it (or says there is nothing to train), ``run`` trains to the end."""

    def __init__(self, attempt: Attempt, recipe: Recipe, dist_env: DistEnv, device: torch.device,
                 signals: StopSignals, start: Start, saved: dict | None, watch: StackWatch):
        """Everything the run needs, built alike on every rank.

        What ``start``'s checkpoint holds, if there is one, is put back. Rank 0 records the start (ledger, config.yaml,
        summary, wandb) only after every check passed.
        """
        cfg = self.cfg = attempt.cfg
        self.attempt, self.recipe, self.dist_env, self.device = attempt, recipe, dist_env, device
        self.watch, self.where = watch, watch.where  # what this rank is doing, for a hang's report
        self.owns_watch = False  # Trainer.build's own (no worker's): stopped when the attempt ends
        self.strategy = strategy = strategy_for(cfg, dist_env, device)
        self.where.at(0, "model and data")
        self.model, train_set, self.eval_set = build_model_and_data(cfg, recipe, dist_env, strategy.build_device)
        # Taken before sharding: a sharded model's forward on rank 0 alone would wait for the others forever.
        summary, flops = on_main(dist_env, lambda: self._describe_model(first_sample(train_set),
                                                                        strategy.build_device))
        self.model = strategy.prepare(self.model, recipe)  # before the optimizer, which holds what it trains
        if self.eval_set is None and cfg.ckpt.best_metric:
            raise UserError(f"ckpt.best_metric={cfg.ckpt.best_metric} needs an evaluation, but the recipe's "
                            "build_datasets returns no eval set: set ckpt.best_metric=''", same_on_all_ranks=True)
        self.where.at(0, "data loader agreement")
        self.train_loader = run_agreed(
            dist_env, lambda: build_train_loader(train_set, cfg, strategy.data_env, device, recipe.collate))
        self.steps_per_epoch = steps_per_epoch(self.train_loader, cfg)
        self.streamed = isinstance(self.train_loader, StreamLoader)  # a stream: one epoch of train.max_steps
        groups = lambda: recipe.param_groups(self.model, cfg)  # noqa: E731
        self.where.at(0, "optimizer agreement")
        self.optimizer = run_agreed(dist_env, lambda: build_optimizer(self.model, groups(), cfg))
        seed_everything(cfg.train.seed + strategy.data_env.rank)  # dropout and augmentation differ by batch's part
        self.precision = Precision(strategy.autocast_amp, cfg.train.channels_last, device)
        scheduler = build_scheduler(self.optimizer, cfg, self._total_steps())
        self.state = TrainingState(scheduler, self.precision.scaler, cfg.train.batch_size, device,
                                   self.train_loader if self.streamed else None)
        self.checkpointer = Checkpointer(attempt.run_dir, cfg, dist_env, start.run_id, strategy.checkpoint_format,
                                         attempt)
        if start.checkpoint:  # before DDP, which broadcasts rank 0's weights
            self.where.at(0, "checkpoint load")
            self._restore(Path(start.checkpoint), saved)
        if dist_env.is_main:
            self._record_start(start, summary)
        # What trains; ``model`` is evaluated and saved (the same module under fsdp).
        self.wrapped_model = strategy.wrap(self.model)
        self._watch(signals, flops)
        self.augment_rng = torch.Generator(device) if recipe.augment else None
        # What setup built (modules, configs, datasets) lives all run: out of the collector's sight, a full
        # collection no longer walks it, so it pauses the loop for far less.
        gc.freeze()

    def _describe_model(self, sample, built_on: torch.device) -> tuple[str, float | None]:
        """Rank 0: the model's summary (torchsummary) and its FLOPs per training sample (None: not countable)."""
        return summarize(self.model, sample, built_on), flops_per_sample(self.recipe, self.cfg, self.model, sample)

    def _watch(self, signals: StopSignals, flops: float | None) -> None:
        """Set up what the run is seen by.

        The stop agreement (which carries each rank's own time and memory to rank 0), throughput and MFU, the progress
        bar, and the profiler ``profile.steps`` asks for (else None).
        """
        cfg, dist_env, device = self.cfg, self.dist_env, self.device
        self.rank_stats = RankStats(device)
        self.rank_report = RankReport(device.type == "cuda", cfg.log.straggler_share)
        self.stop = GracefulStop(dist_env, signals, cfg.dist.stop_check_every, self.rank_stats.sample)
        self.throughput = Throughput(self.recipe.tokens_per_sample(cfg), flops,
                                     peak_tflops(device, matmul_precision(cfg.train.amp)), dist_env.world_size)
        self.shows_progress_bar = terminal.wants_progress_bar(dist_env)
        self.profiler = StepProfiler.of(cfg, self.attempt.run_dir, dist_env.rank, device)

    @classmethod
    def build(cls, cfg, recipe: Recipe, dist_env: DistEnv, device: torch.device, signals: StopSignals,
              watch: StackWatch | None = None) -> Trainer | None:
        """Collective: open the run directory, decide how this attempt starts, build.

        Returns None when the run is already complete (said so, nothing written). A start that fails leaves the
        directory as it was. ``watch`` answers requests for this rank's stacks through the run directory.
        """
        if cfg.train.keep_host_memory:
            keep_freed_memory()  # before anything is built: every allocation after it is served this way
        attempt = Attempt.open(cfg, recipe, dist_env, signals)
        owned = watch is None  # else the worker's, which it stops when the process is done with the job
        watch = watch or StackWatch(dist_env.rank, dist_env.world_size)
        watch.start(attempt.run_dir)
        try:
            start, saved = plan_start(attempt.cfg, attempt.run_dir, dist_env)
            if start.complete:
                attempt.complete(start, saved)
                if owned:
                    watch.stop()
                return None
            trainer = cls(attempt, recipe, dist_env, device, signals, start, saved, watch)
            trainer.owns_watch = owned
            return trainer
        except BaseException as error:
            signals.failing = True
            watch.on_failure(error, cfg.dist.timeout_s)
            if owned:
                watch.stop()
            attempt.abandon()
            raise

    def _restore(self, path: Path, saved: dict | None) -> None:
        """Collective: the checkpoint at ``path`` put back into the model, optimizer and training state.

        Rank 0 has it loaded already (``saved``), and verified every shard of a folder: the others check only that each
        is there.
        """
        loaded = run_agreed(self.dist_env, lambda: saved or load_named(path, check_shards=False))
        run_agreed(self.dist_env, lambda: self.checkpointer.restore(path, loaded, self.model, self.optimizer,
                                                                    self.state))

    def _total_steps(self) -> int:
        """Optimizer steps the whole run takes: what the LR schedule spans."""
        total, max_steps = self.steps_per_epoch * self.cfg.train.epochs, self.cfg.train.max_steps
        return min(total, max_steps) if max_steps else total

    def _record_start(self, start: Start, summary: str) -> None:
        """Rank 0: the header, what the resume found, the attempt's records and the model summary."""
        optim = self.cfg.optim
        terminal.log_header(self.cfg, self.recipe.name, self.dist_env, self.device, self.model, self.attempt.run_dir,
                            data_path(self.train_loader), state_bytes(self.model, optim.name, optim.momentum))
        if start.checkpoint:
            where = self.position
            log.info("resumed from %s: epoch %d, step %d of it, global step %d", start.checkpoint, where.epoch,
                     where.step_in_epoch, where.global_step)
            for line in start.describe_changes(self.streamed):
                log.info("%s", line)
        records = self.attempt.begin(start)
        write_summary(summary, self.attempt.run_dir)
        records.save_summary(*parameter_counts(self.model), summary)

    @property
    def position(self) -> Position:
        """Where training stands (the training state's)."""
        return self.state.position

    @property
    def model_file(self) -> Path:
        return self.attempt.run_dir / "model.pt"

    def run(self) -> None:
        """Train to the end of ``train.epochs``, save model.pt, and record how the attempt ended."""
        began = time.perf_counter()
        outcome, detail = "failed", ""
        try:
            final = self.fit()
            self.where.at(self.position.global_step, "checkpoint")
            self.checkpointer.finish()  # the last checkpoint on disk (ckpt.async) before the run ends
            self.where.at(self.position.global_step, "model.pt")
            weights = self.strategy.full_state(self.model)  # collective
            if self.dist_env.is_main:
                save_model(weights, self.model_file)
                self.attempt.model_saved(self.model_file)
            self._uploads_done()
            outcome = "finished"
        except StopRequested as stopped:
            outcome, detail = "stopped", str(stopped)
            raise
        except BaseException as error:
            self.stop.signals.failing = True
            self.watch.on_failure(error, self.cfg.dist.timeout_s)
            detail = self.watch.diagnosis or f"{type(error).__name__}: {error}".splitlines()[0]
            raise
        finally:
            self.close(outcome, detail)
        if self.dist_env.is_main:
            results = "".join(f" | {key} {value:.4f}" for key, value in final.items() if key.startswith("eval/"))
            log.info("done: %d steps in %.1f s%s | model: %s", self.position.global_step,
                     time.perf_counter() - began, results, self.model_file)

    def close(self, outcome: str, detail: str = "") -> None:
        """End the attempt on this rank.

        Wait for the stop agreement in flight (not after a failure: another rank may never answer it); rank 0 records
        the attempt's end and gives the directory back.
        """
        if outcome != "failed":
            self.stop.close()
        if self.profiler is not None:
            self.profiler.close(self.position.global_step)
        if self.owns_watch:
            self.watch.stop()
        self.attempt.end(outcome, self.position.global_step, detail, self.checkpointer.last_good is not None)

    def fit(self) -> dict:
        """Train from where the position stands to the end of ``train.epochs``; returns the last epoch's record."""
        record: dict = {}
        while self.position.epoch <= self.cfg.train.epochs and not self._reached_max_steps():
            began, first_step = time.perf_counter(), self.position.step_in_epoch
            if self.run_epoch():
                self.checkpointer.finish()
                self._uploads_done()
                stopper = self.stop.signal_name or "a signal on another rank"
                raise StopRequested(
                    f"stopped after step {self.position.global_step} ({stopper}): checkpoint written to "
                    f"{self.checkpointer.path_for(self.position.global_step)}; run the same command to continue",
                    same_on_all_ranks=True,
                )
            record = self.finish_epoch(began, self.position.step_in_epoch - first_step)
        return record

    def _uploads_done(self) -> None:
        """Collective, as the run ends: with ckpt.remote, every rank waits while rank 0's uploads catch up.

        The others wait in a collective, not at the barrier after the run or past their exit (torchrun ends rank 0 when
        another exits 75); the wait is bounded (run/mirror.py).
        """
        if self.cfg.ckpt.remote:
            self.where.at(self.position.global_step, "ckpt.remote uploads")
            run_agreed(self.dist_env, self.attempt.uploads_done if self.dist_env.is_main else None, name_rank=False)

    def _reached_max_steps(self) -> bool:
        return bool(self.cfg.train.max_steps) and self.position.global_step >= self.cfg.train.max_steps

    def run_epoch(self) -> bool:
        """Train the rest of the current epoch; True if a stop was agreed on (after writing a checkpoint)."""
        where = self.position
        self.wrapped_model.train()
        start_epoch(self.train_loader, where.epoch, where.step_in_epoch, self.cfg.train.batch_size)
        bar = None
        if self.shows_progress_bar:
            bar = terminal.progress_bar(where.epoch, self.cfg.train.epochs, where.step_in_epoch, self.steps_per_epoch)
        try:
            return self.train_steps(iter(self.train_loader), self.cfg.train.max_steps, bar)
        finally:
            if bar is not None:
                bar.close()

    def train_steps(self, batches, until_step: int = 0, bar=None) -> bool:
        """Optimizer steps on ``batches`` until they run out or the global step reaches ``until_step``.

        ``batches`` are the current epoch's, moved to the device here; ``until_step`` 0 means no limit. Returns True if
        a stop was agreed on (after writing a checkpoint).

        The only host syncs are rank 0's, every ``train.log_every`` steps.
        """
        # Config values read once: an OmegaConf lookup costs microseconds, and this loop runs every step.
        accum, clip, log_every = self.cfg.train.grad_accum, self.cfg.train.clip_grad_norm, self.cfg.train.log_every
        save_every, eval_every, where = self.cfg.ckpt.every_steps, self.cfg.eval.every_steps, self.position
        window, scheduler, profiler = _Window(self.state.loss_sum), self.state.scheduler, self.profiler
        micro_in_epoch = where.step_in_epoch * accum
        memory_format = self.precision.to_memory_format
        self._fetching(where.global_step)
        for micro, batch in enumerate(prefetched(batches, self.device, memory_format), 1):
            if profiler is not None:
                profiler.starting(where.global_step + 1)
            if self.augment_rng is not None:  # then channels_last again: an augmentation may make a new tensor
                batch = to_device(self._augmented(batch, micro_in_epoch + micro), self.device, memory_format)
            self._micro_step(batch, accum, sync=micro % accum == 0)
            if micro % accum:
                continue
            self._optimizer_step(window, clip, scheduler)
            if bar is not None:
                bar.update()
            if where.global_step % log_every == 0 and self.dist_env.is_main:
                self.where.at(where.global_step, "progress report")
                self._report(window.take(self.cfg.train.batch_size, self.throughput), bar)
            inside_epoch = where.step_in_epoch < self.steps_per_epoch  # its last step is evaluated and saved after it
            improved = eval_every and where.global_step % eval_every == 0 and inside_epoch and self.evaluate_now()
            if (improved or save_every and where.global_step % save_every == 0) and inside_epoch:
                self.save_checkpoint(best=bool(improved))
            self.where.at(where.global_step, "stop agreement")
            if self.stop.should_stop(where.global_step):
                if self.stop.diverged_at is not None:
                    message = self.checkpointer.diverged_message(self.stop.diverged_at)
                    raise TrainingDiverged(message, same_on_all_ranks=True)
                if where.saved_step != where.global_step:
                    self.save_checkpoint()
                return True
            if until_step and where.global_step >= until_step:
                break
            self._fetching(where.global_step)
        return False

    def _fetching(self, step: int) -> None:
        """The rank goes on to the next batch after ``step``: its whereabouts, own time and profile say so.

        Called after what follows a step (report, evaluation, checkpoint, stop agreement), so those count in neither
        the rank's own time nor another step's profile.
        """
        self.where.at(step + 1, "data loading")
        self.rank_stats.resumed()
        if self.profiler is not None:
            self.profiler.done(step)

    def _optimizer_step(self, window: _Window, clip: float, scheduler) -> None:
        """Clip, step, clear the gradients, step the schedule, and count the step."""
        where = self.position
        self.where.at(where.global_step + 1, "optimizer step")
        if clip:
            self.precision.unscale(self.optimizer)
            window.grad_norm = self.strategy.clip_grad_norm(self.model, clip)
        self.precision.step(self.optimizer)
        self.optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        where.step_in_epoch += 1
        where.global_step += 1
        window.steps += 1

    def _augmented(self, batch, micro_in_epoch: int):
        """The recipe's augmentation of ``batch``.

        Its random numbers are a function of where the batch is (seed, epoch, rank, micro-batch): a resumed epoch draws
        exactly what the uninterrupted one did, with nothing to save.
        """
        seed, epoch, rank = self.cfg.train.seed, self.position.epoch, self.strategy.data_env.rank
        self.augment_rng.manual_seed((((seed * 1_000_003 + epoch) * 1_009 + rank) * 1_000_003 + micro_in_epoch) % 2**63)
        return self.recipe.augment(batch, self.augment_rng, self.cfg)

    def _micro_step(self, batch, accum: int, sync: bool) -> None:
        """Forward and backward of one micro-batch; gradients are reduced only when ``sync`` (the last one)."""
        step = self.position.global_step + 1
        with self.strategy.gradient_sync(self.wrapped_model, sync):
            self.where.at(step, "forward")
            with self.precision.autocast():
                loss, _ = self.recipe.step(self.wrapped_model, batch)
            self.where.at(step, self.strategy.sync_phase if sync else "backward")
            self.rank_stats.waited()
            self.precision.backward(loss / accum if accum > 1 else loss)
            self.where.at(step, "data loading")  # the next micro-batch's, or (the last) the optimizer step's
            self.rank_stats.resumed()  # the step's gradient: the batch mean
        self.state.loss_sum.add_(loss.detach(), alpha=1 / accum)  # one op per micro-batch; read only when reporting

    def _report(self, report: dict, bar) -> None:
        """Rank 0: a progress record (and line, or bar text).

        A non-finite loss stops every rank at the next agreement.
        """
        where = self.position
        lrs = {f"lr/group{i}": group["lr"] for i, group in enumerate(self.optimizer.param_groups)}
        ranks, straggler = self.rank_report.take(self._rank_samples())
        if straggler:
            log.warning("%s", straggler)
        self.attempt.records.write({"step": where.global_step, "epoch": where.epoch, **report, **ranks, **lrs})
        terminal.report_steps(report, where.epoch, where.step_in_epoch, self.steps_per_epoch, bar)
        if not math.isfinite(report["train/loss"]):
            self.stop.diverged(where.global_step)

    def _rank_samples(self) -> list[list[float]] | None:
        """Every rank's ``RankStats.sample()``, as of the last stop agreement read (None before the first)."""
        return self.stop.measured if self.dist_env.is_distributed else [self.rank_stats.sample()]

    def finish_epoch(self, began: float, steps_run: int) -> dict:
        """Average the epoch's loss over ranks, evaluate, checkpoint, and write the epoch's record."""
        cfg, where = self.cfg, self.position
        loss_sum = self.state.loss_sum.clone()
        self.where.at(where.global_step, "epoch's loss average")
        if self.dist_env.is_distributed:
            dist.all_reduce(loss_sum)
        train_loss = loss_sum.item() / (max(1, where.step_in_epoch) * self.dist_env.world_size)  # waits for the device
        if not math.isfinite(train_loss):  # the same all-reduced value on every rank: all stop here
            raise TrainingDiverged(self.checkpointer.diverged_message(where.global_step), same_on_all_ranks=True)
        seconds = time.perf_counter() - began
        record = {"step": where.global_step, "epoch": where.epoch, "train/loss": train_loss, "time/epoch_s": seconds,
                  **self.throughput.of(steps_run * cfg.train.batch_size / seconds),
                  **self.rank_report.memory(self._rank_samples())}
        metrics, improved = self._evaluate()
        record.update(metrics)
        # Else train.max_steps ended it part-way (a longer max_steps continues it from there); a stream's never ends.
        if where.step_in_epoch >= self.steps_per_epoch and not self.streamed:
            where.epoch, where.step_in_epoch = where.epoch + 1, 0
            self.state.loss_sum.zero_()
        every, last = cfg.ckpt.every_epochs, record["epoch"] == cfg.train.epochs or self._reached_max_steps()
        if improved or (every and record["epoch"] % every == 0) or last:
            self.save_checkpoint(best=improved)
        if self.dist_env.is_main:
            self.attempt.records.write(record)
            log.info(terminal.format_epoch(record, None if self.streamed else cfg.train.epochs))
        return record

    def evaluate_now(self) -> bool:
        """Evaluate inside an epoch (``eval.every_steps``) and record it; True if the best metric improved."""
        metrics, improved = self._evaluate()
        if self.dist_env.is_main and metrics:
            where = self.position
            self.attempt.records.write({"step": where.global_step, "epoch": where.epoch, **metrics})
            log.info("step %d | %s", where.global_step,
                     " | ".join(f"{key.replace('/', ' ')} {value:.4f}" for key, value in metrics.items()))
        return improved

    def _evaluate(self) -> tuple[dict, bool]:
        """Collective: the eval metrics (on the ranks that evaluate), and whether the best metric improved.

        Evaluation runs on the random streams it finds and puts them back (``random_streams_kept``): how often it
        runs changes nothing of the training.
        """
        cfg, metrics = self.cfg, {}
        self.where.at(self.position.global_step, "evaluation")
        if self.eval_set is not None and (on_every_rank(cfg, self.strategy) or self.dist_env.is_main):
            with random_streams_kept(self.device):
                metrics = evaluate(self.model, self.eval_set, self.recipe, cfg, self.strategy)
        if self.eval_set is not None:
            self._write_samples()
        improved = self._new_best(metrics) if cfg.ckpt.best_metric else None
        if improved is not None:
            self.position.best = improved
        return metrics, improved is not None

    def _write_samples(self) -> None:
        """The recipe's ``samples`` after an evaluation (what a language model writes), in the log and the trackers.

        Rank 0 writes them; under fsdp every rank generates (every forward gathers from all), else rank 0 alone.
        """
        if not (self.strategy.sharded or self.dist_env.is_main):
            return
        with random_streams_kept(self.device):
            lines = self.recipe.samples(self.model, self.eval_set, self.cfg)
        if self.dist_env.is_main and lines:
            step = self.position.global_step
            for number, line in enumerate(lines, 1):
                log.info("step %d | sample %d: %r", step, number, line)
            self.attempt.records.write_text(step, "eval/samples", "\n".join(lines))

    def _new_best(self, record: dict) -> float | None:
        """Rank 0 judges the new eval metric against the best so far.

        Every rank learns the new best, or None, or that ``ckpt.best_metric`` names a metric evaluation does not
        produce.
        """
        metric, mode = self.cfg.ckpt.best_metric, self.cfg.ckpt.best_mode

        def judge() -> float | None:
            if metric not in record:
                produced = ", ".join(sorted(key for key in record if key.startswith("eval/")))
                raise UserError(f"ckpt.best_metric={metric} is not a metric this run's evaluation produces "
                                f"({produced}): use one of those, or '' for no best checkpoint")
            value, best = record[metric], self.position.best
            return value if best is None or (value > best if mode == "max" else value < best) else None

        return on_main(self.dist_env, judge)

    def save_checkpoint(self, best: bool = False) -> Path:
        """Collective: every rank calls it at the same step."""
        self.where.at(self.position.global_step, "checkpoint")
        path = self.checkpointer.save(self.model, self.optimizer, self.state, best)
        self.position.saved_step = self.position.global_step
        return path


class _Window:
    """Loss and time since the last progress report; read (a host sync) only when reporting.

    The window's loss is what the epoch's running loss sum gained since the window began, so a step adds nothing
    but a count here.
    """

    def __init__(self, loss_sum: torch.Tensor):
        self.loss_sum, self.sum_before = loss_sum, loss_sum.clone()
        self.steps, self.start = 0, time.perf_counter()
        self.grad_norm: torch.Tensor | None = None  # the last step's, before clipping

    def take(self, batch_size: int, throughput: Throughput) -> dict:
        """Mean loss and the throughput over the window, then start a new one."""
        now = time.perf_counter()
        report = {"train/loss": (self.loss_sum - self.sum_before).item() / self.steps,
                  **throughput.of(self.steps * batch_size / (now - self.start))}
        if self.grad_norm is not None:  # a DTensor under fsdp, replicated: its local value is the whole norm
            norm = self.grad_norm
            report["grad_norm"] = (norm.to_local() if hasattr(norm, "to_local") else norm).item()
        self.sum_before.copy_(self.loss_sum)
        self.steps, self.start = 0, now
        return report

