"""Run under torchrun: one training step of the launcher's compiled DDP model, profiled, as JSON on rank 0's stdout.

Prints the backward pass as a time-ordered list of ``compiled`` (one compiled backward graph piece) and
``allreduce`` (DDP launching one bucket's all-reduce) events, which is what tells whether communication overlaps
the backward pass.
"""

import json

import torch
import torch.distributed as dist
from torch import nn
from torch.profiler import ProfilerActivity, profile

from launcher.config.build import build_config, freeze, parse_overrides
from launcher.distributed.env import DistEnv
from launcher.distributed.strategy import DDP


def backward_events(model: nn.Module, inputs: torch.Tensor) -> list[str]:
    for _ in range(2):  # compile, and let DDP rebuild its buckets in backward order, before measuring
        model(inputs).sum().backward()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model(inputs).sum().backward()
    kinds = {"CompiledFunctionBackward": "compiled", "c10d::allreduce_": "allreduce"}
    events = sorted((e for e in prof.events() if e.name in kinds), key=lambda e: e.time_range.start)
    return [kinds[e.name] for e in events]


def main() -> None:
    dist_env = DistEnv.from_environ()
    dist.init_process_group("gloo")
    cfg = freeze(build_config({}, {}, parse_overrides(["train.compile=true", "dist.bucket_cap_mb=1.0"]), "engine"))
    torch.manual_seed(0)
    layers = nn.Sequential(*[nn.Linear(512, 512) for _ in range(8)])  # 1 MB of weights each: one bucket each
    events = backward_events(DDP(cfg, dist_env, torch.device("cpu")).wrap(layers), torch.randn(8, 512))
    if dist_env.is_main:
        print(json.dumps(events))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
