"""What the LR schedule costs per optimizer step: the launcher's StepSchedule (a torch LRScheduler) against the plain
class it replaced, torch's LambdaLR, and no schedule at all, on a model small enough that the per-step Python cost
shows.

    python bench/schedule.py [--steps 20000 --rounds 9]

Each case times ``optimizer.step(); scheduler.step()`` (an LRScheduler also wraps ``optimizer.step`` to count
calls: that is in the time too), in rounds that rotate the order of the cases; two copies of the plain class
("plain" and "plain_again") are the A/A control. Prints one JSON object: microseconds per step, the median over
rounds, per case.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from launcher.engine.optim import StepSchedule


class PlainSchedule:
    """The schedule before it became an LRScheduler: the same arithmetic, no torch base class."""

    def __init__(self, optimizer: torch.optim.Optimizer, multiplier):
        self.optimizer, self.multiplier, self.last_step = optimizer, multiplier, 0
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]

    def step(self) -> None:
        self.last_step += 1
        factor = self.multiplier(self.last_step)
        for group, base_lr in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base_lr * factor


def multiplier(step: int) -> float:
    return min(1.0, (step + 1) / 100)


def make(case: str):
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for parameter in model.parameters():
        parameter.grad = torch.zeros_like(parameter)
    schedules = {
        "none": lambda: None,
        "plain": lambda: PlainSchedule(optimizer, multiplier),
        "plain_again": lambda: PlainSchedule(optimizer, multiplier),
        "lr_scheduler": lambda: StepSchedule(optimizer, multiplier),
        "lambda_lr": lambda: torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier),
    }
    return optimizer, schedules[case]()


def time_case(case: str, steps: int) -> float:
    optimizer, schedule = make(case)
    start = time.perf_counter()
    for _ in range(steps):
        optimizer.step()
        if schedule is not None:
            schedule.step()
    return (time.perf_counter() - start) / steps * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cases = ["none", "plain", "plain_again", "lr_scheduler", "lambda_lr"]
    times: dict[str, list[float]] = {case: [] for case in cases}
    for case in cases:
        time_case(case, args.steps // 10)  # warm up
    for round_ in range(args.rounds):
        shift = round_ % len(cases)
        for case in cases[shift:] + cases[:shift]:
            times[case].append(time_case(case, args.steps))
    medians = {case: statistics.median(values) for case, values in times.items()}
    print(json.dumps({"us_per_step_median": medians, "steps": args.steps, "rounds": args.rounds,
                      "schedule_us": {case: medians[case] - medians["none"] for case in cases[1:]}}))


if __name__ == "__main__":
    main()
