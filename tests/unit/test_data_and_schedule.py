"""The resumable sampler's order and the LR schedules' shapes, in one process."""

import math

import pytest

from launcher.config.build import build_config, parse_overrides
from launcher.engine.data import ResumableDistributedSampler
from launcher.engine.optim import lr_multiplier


@pytest.mark.parametrize("world_size", [1, 2])
def test_a_resumed_epoch_yields_exactly_the_samples_not_yet_seen(world_size):
    dataset = list(range(103))
    def order(consumed):
        per_rank = []
        for rank in range(world_size):
            sampler = ResumableDistributedSampler(dataset, world_size, rank, seed=7, global_batch=10)
            sampler.set_epoch(3, consumed)
            per_rank.append(list(sampler))
            assert len(sampler) == len(per_rank[-1])
        return [index for step in zip(*per_rank) for index in step]  # the global order, rank by rank
    whole = order(0)
    assert len(whole) == 100 and len(set(whole)) == 100
    assert order(40) == whole[40:]


def test_schedule_shapes():
    def lrs(overrides, total=100):
        cfg = build_config({}, {}, parse_overrides(overrides), "test")
        return [lr_multiplier(cfg, total)(step) for step in range(total + 1)]

    assert set(lrs(["sched.name=constant"])) == {1.0}
    warm = lrs(["sched.name=constant", "sched.warmup_steps=4"])
    assert warm[:5] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert lrs(["sched.name=step", "sched.step_size=10", "sched.gamma=0.5"])[25] == 0.25
    cosine = lrs(["sched.name=cosine", "sched.min_lr_ratio=0.1"])
    assert cosine[0] == 1.0 and cosine[50] == pytest.approx(0.55) and cosine[100] == pytest.approx(0.1)
    onecycle = lrs(["sched.name=onecycle"])
    assert onecycle.index(max(onecycle)) == 29 and onecycle[100] == pytest.approx(0.0, abs=1e-9)
    assert math.isclose(onecycle[0], 1 / 30)
