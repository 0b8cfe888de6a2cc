"""``profile.steps=FIRST-LAST``: a torch.profiler trace of those optimizer steps, per rank, into the run directory.

Each rank writes ``profile/rank_<r>.json`` (Chrome trace format: open it in https://ui.perfetto.dev or
chrome://tracing), each step marked ``step <N>``; on CUDA also ``profile/memory_rank_<r>.pickle``, the allocator's
history over those steps (open it in https://pytorch.org/memory_viz). The trainer holds no profiler when the key
is '', so an unprofiled run pays nothing.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from launcher.config.keys import step_span

log = logging.getLogger(__name__)

FOLDER = "profile"  # in the run directory


class StepProfiler:
    """Profiles optimizer steps ``first`` to ``last`` of one rank; ``starting`` and ``done`` drive it.

    A run resumed inside the span profiles the rest of it; a run that ends inside it writes the steps it ran.
    """

    def __init__(self, first: int, last: int, run_dir: Path, rank: int, device: torch.device):
        self.first, self.last = first, last
        self.folder, self.rank, self.cuda = run_dir / FOLDER, rank, device.type == "cuda"
        self._profile = self._step_range = None
        self._began_after: int | None = None  # the steps done when it began
        self._done = 0  # steps done, as last told

    @classmethod
    def of(cls, cfg, run_dir: Path, rank: int, device: torch.device) -> StepProfiler | None:
        """The profiler ``profile.steps`` asks for, or None."""
        if not cfg.profile.steps:
            return None
        return cls(*step_span(cfg.profile.steps), run_dir, rank, device)

    def starting(self, step: int) -> None:
        """Optimizer step ``step`` begins (called again within it: nothing new)."""
        if self._profile is None:
            if self._began_after is not None or not self.first <= step <= self.last:
                return
            self._begin(step - 1)
        if self._step_range is not None and self._step_range[0] == step:
            return
        self._end_step_range()
        marker = record_function(f"step {step}")
        marker.__enter__()
        self._step_range = (step, marker)

    def done(self, step: int) -> None:
        """Step ``step`` and what follows it (a report, an evaluation, a checkpoint) are done."""
        self._done = step
        if self._profile is None:
            return
        self._end_step_range()
        if step >= self.last:
            self.close(step)

    def _begin(self, step: int) -> None:
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        # Quiet: kineto prints STAGE (4) and USDT (5) lines at each start and stop; 6 is above both.
        os.environ.setdefault("KINETO_LOG_LEVEL", "6")
        self._profile = profile(activities=activities, record_shapes=True)
        self._profile.__enter__()
        self._began_after = step
        if self.cuda:
            torch.cuda.memory._record_memory_history(max_entries=200_000)

    def _end_step_range(self) -> None:
        if self._step_range is not None:
            self._step_range[1].__exit__(None, None, None)
            self._step_range = None

    def close(self, step: int) -> None:
        """Write what was recorded (``step`` steps done) and stop recording; say so if the span was never reached."""
        if self._profile is None:
            if self._began_after is None and self.rank == 0 and step < self.first:
                log.warning("profile.steps=%d-%d: not profiled, the run ended at step %d", self.first, self.last, step)
            return
        self._end_step_range()
        profiled, self._profile = self._profile, None
        profiled.__exit__(None, None, None)
        self.folder.mkdir(exist_ok=True)
        trace = self.folder / f"rank_{self.rank}.json"
        profiled.export_chrome_trace(str(trace))
        if self.cuda:
            torch.cuda.memory._dump_snapshot(str(self.folder / f"memory_rank_{self.rank}.pickle"))
            torch.cuda.memory._record_memory_history(enabled=None)
        if self.rank == 0:
            first, last = self._began_after + 1, min(max(step, self._done), self.last)
            log.info("profile of steps %d-%d: %s (one file per rank; open in https://ui.perfetto.dev)", first, last,
                     trace.parent)
