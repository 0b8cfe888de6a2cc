"""The training state besides the model and optimizer.

It is where training stands, this rank's summed losses of the epoch, the LR schedule, fp16's loss scale and the random
streams. A checkpoint holds ``state_dict()`` and every rank's ``rank_state_dict()``; ``load_state_dict`` puts them back.
"""

from __future__ import annotations

import contextlib
import logging
import random
from dataclasses import dataclass

import numpy as np
import torch

log = logging.getLogger(__name__)


@dataclass
class Position:
    """Where training stands.

    The epoch in progress, optimizer steps of it done, steps overall; the best eval metric so far and the step of the
    last checkpoint.
    """

    epoch: int = 1
    step_in_epoch: int = 0
    global_step: int = 0
    best: float | None = None
    saved_step: int = -1


class TrainingState:
    """What continues training exactly, besides the model's and optimizer's state, with its checkpoint form."""

    def __init__(self, scheduler, scaler, batch_size: int, device: torch.device, data=None):
        self.position = Position()
        # This rank's summed step losses in the epoch, on the device: progress windows are differences of it.
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.scheduler, self.scaler = scheduler, scaler
        self.batch_size, self.device = batch_size, device
        self.data = data  # a loader with a place of its own to save (a stream's); the position places the others

    def state_dict(self) -> dict:
        """The part every rank holds alike (in a checkpoint's top level)."""
        where = self.position
        return {
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "epoch": where.epoch,
            "samples_in_epoch": where.step_in_epoch * self.batch_size,
            "global_step": where.global_step,
            "best": where.best,
        }

    def rank_state_dict(self) -> dict:
        """This rank's own part (a checkpoint holds every rank's, in ``rank_states``)."""
        state = {"rng": _capture_rng(self.device), "loss_sum": self.loss_sum.item()}
        if self.data is not None:
            state["data"] = self.data.state_dict(self.position.step_in_epoch)
        return state

    def load_state_dict(self, saved: dict, rank: int, world_size: int, same_best_metric: bool = True) -> None:
        """Put back what a checkpoint ``saved``.

        Its position, schedule, loss scale, and this rank's random streams and loss sum (on another number of processes,
        the streams start afresh and the loss sums are shared out).

        The schedule keeps the learning rates of the config now in force (its ``base_lrs``): with an unchanged config
        they equal the saved ones, and a changed ``optim.lr`` takes effect. A best metric judged by another
        ``ckpt.best_metric`` or mode (not ``same_best_metric``) is forgotten.
        """
        self.scheduler.load_state_dict({**saved["scheduler"], "base_lrs": list(self.scheduler.base_lrs)})
        if self.scaler and saved.get("scaler"):
            self.scaler.load_state_dict(saved["scaler"])
        self.position = Position(epoch=saved["epoch"], step_in_epoch=saved["samples_in_epoch"] // self.batch_size,
                                 global_step=saved["global_step"], best=saved["best"] if same_best_metric else None,
                                 saved_step=saved["global_step"])
        rank_states = saved["rank_states"]
        if self.data is not None:
            note = self.data.load_state_dict([state.get("data") for state in rank_states], rank)
            if note and rank == 0:
                log.warning("%s", note)
        if saved["world_size"] == world_size:
            _restore_rng(rank_states[rank]["rng"], self.device)
            self.loss_sum.fill_(rank_states[rank]["loss_sum"])
            return
        # The epoch's loss is the ranks' summed step losses over (steps x ranks): the steps before the checkpoint
        # count as their mean over the old ranks, which every new rank carries, so the new world's sum holds it once.
        self.loss_sum.fill_(sum(state["loss_sum"] for state in rank_states) / len(rank_states))
        if rank == 0:
            data = "" if self.data is not None else "the data order and each sample's random numbers continue exactly; "
            log.warning("resuming on %d processes from a checkpoint of %d: %seach rank's own random streams (dropout) "
                        "start afresh", world_size, saved["world_size"], data)


@contextlib.contextmanager
def random_streams_kept(device: torch.device):
    """Run the block on this process's random streams, then put them back as they were.

    Evaluation runs in it: a run that evaluates more often, or stops and evaluates at ``train.max_steps``, trains
    exactly as one that does not.
    """
    saved = _capture_rng(device)
    try:
        yield
    finally:
        _restore_rng(saved, device)


def _capture_rng(device: torch.device) -> dict:
    """This process's random states, in types ``torch.load(..., weights_only=True)`` accepts."""
    numpy_state = np.random.get_state(legacy=False)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "python": random.getstate(),
        "numpy": {
            "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
            "pos": numpy_state["state"]["pos"],
            "has_gauss": numpy_state["has_gauss"],
            "gauss": numpy_state["gauss"],
        },
    }


def _restore_rng(state: dict, device: torch.device) -> None:
    """Put back what ``_capture_rng`` took."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = state["numpy"]
    np.random.set_state({
        "bit_generator": "MT19937",
        "state": {"key": numpy_state["key"].numpy().astype(np.uint32), "pos": numpy_state["pos"]},
        "has_gauss": numpy_state["has_gauss"],
        "gauss": numpy_state["gauss"],
    })
