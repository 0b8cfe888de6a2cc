"""Each rank's own time and memory, and what rank 0's progress reports make of them: memory/* and stragglers.

A rank's numbers are what its host already has (the clock, the CUDA allocator's counters, getrusage): no device sync.
They reach rank 0 on the stop agreement's all-gather (distributed/stop.py), every ``dist.stop_check_every`` steps,
with no collective of their own.
"""

from __future__ import annotations

import resource
import statistics
import time

import torch

GIB = 2**30


def state_bytes(model: torch.nn.Module, optimizer: str, momentum: float) -> tuple[int, int, int]:
    """Bytes of this rank's weights, gradients and optimizer state (its shards under fsdp) once training runs.

    The optimizer's state counted as ``torch.optim`` keeps it: Adam's two moments, SGD's momentum buffer, per trainable
    parameter.
    """
    weights = trainable = 0
    for parameter in model.parameters():
        local = parameter.to_local() if hasattr(parameter, "to_local") else parameter
        count = local.numel() * local.element_size()
        weights += count
        trainable += count if parameter.requires_grad else 0
    slots = 2 if optimizer in ("adam", "adamw") else 1 if momentum else 0
    return weights, trainable, slots * trainable


class RankStats:
    """This rank's running totals: its own time (waiting for data and the host's part of the forward) and peaks.

    Its own time leaves out the backward and the optimizer step, where a rank waits for the others' gradients: a
    rank that is slow on its own (a slow disk or data loader, a busy CPU, a recipe's extra work) shows there, while
    the others' waits for it do not.
    """

    def __init__(self, device: torch.device):
        self.device, self.own_s = device, 0.0
        self._since = time.perf_counter()

    def waited(self) -> None:
        """The rank stops working on its own (its backward begins)."""
        self.own_s += time.perf_counter() - self._since

    def resumed(self) -> None:
        """The rank works on its own again (its next batch is fetched)."""
        self._since = time.perf_counter()

    def sample(self) -> list[float]:
        """[own seconds, clock, peak allocated, peak reserved, peak resident set], bytes for the last three."""
        cuda = self.device.type == "cuda"
        allocated = torch.cuda.max_memory_allocated(self.device) if cuda else 0
        reserved = torch.cuda.max_memory_reserved(self.device) if cuda else 0
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux counts KiB
        return [self.own_s, time.perf_counter(), float(allocated), float(reserved), float(rss)]


class RankReport:
    """Rank 0: memory/* and perf/slowest_* from every rank's samples, and the straggler warning.

    A rank is named a straggler when its own time per step exceeds the median rank's by more than ``share`` of the
    step time in two reports in a row (``log.straggler_share``; 0: never).
    """

    def __init__(self, cuda: bool, share: float):
        self.cuda, self.share = cuda, share
        self._before: list[list[float]] | None = None
        self._slow: tuple[int, int] = (-1, 0)  # (rank, reports in a row over the share)

    def take(self, samples: list[list[float]] | None) -> tuple[dict, str | None]:
        """(metrics, a warning or None) from ``samples`` (per rank, ``RankStats.sample``; None: none yet)."""
        if not samples:
            return {}, None
        before, self._before = self._before, samples
        metrics = self.memory(samples)
        if before is None or len(samples) < 2 or samples[0][1] <= before[0][1]:
            return metrics, None
        own = [now[0] - then[0] for now, then in zip(samples, before)]
        median, slowest = statistics.median(own), max(range(len(own)), key=own.__getitem__)
        if median > 0:
            metrics.update({"perf/slowest_rank": slowest, "perf/slowest_vs_median": own[slowest] / median})
        return metrics, self._straggler(slowest, own[slowest] - median, samples[0][1] - before[0][1])

    def memory(self, samples: list[list[float]] | None) -> dict:
        """memory/*: the largest peaks over the ranks, and the rank of the largest (allocated on CUDA, else RSS)."""
        if not samples:
            return {}
        headline = 2 if self.cuda else 4  # allocated on CUDA, else the resident set
        peak_rank = max(range(len(samples)), key=lambda rank: samples[rank][headline])
        metrics = {"memory/peak_rss_gib": max(sample[4] for sample in samples) / GIB, "memory/peak_rank": peak_rank}
        if self.cuda:
            metrics["memory/peak_allocated_gib"] = samples[peak_rank][2] / GIB
            metrics["memory/peak_reserved_gib"] = max(sample[3] for sample in samples) / GIB
        return metrics

    def _straggler(self, rank: int, excess_s: float, window_s: float) -> str | None:
        over = self.share > 0 and excess_s > self.share * window_s
        strikes = (self._slow[1] + 1 if self._slow[0] == rank else 1) if over else 0
        self._slow = (rank, strikes)
        if strikes != 2:  # said once, when it has held for two reports
            return None
        return (f"rank {rank} is slower than the others: its own time (data and forward) exceeded the median rank's "
                f"by {excess_s / window_s:.0%} of the wall time, in 2 progress reports in a row "
                f"(log.straggler_share={self.share:g}); perf/slowest_* in metrics.jsonl follow it")
