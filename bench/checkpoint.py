"""Checkpoint cost: how long the step loop is stalled per checkpoint, the whole write, load and peak extra memory.

    python bench/checkpoint.py [--params 100_000_000] [--fsdp-params 50_000_000] [--width 4096] [--dir /tmp]
        [--cases torch.save launcher "launcher async" fsdp "fsdp async"]

Cases: torch.save; the launcher's checkpoint written in the foreground and with ``ckpt.async`` (the loop waits only
for a copy into host memory), for a 100M-parameter model in one process, on the GPU where there is one (the copy is
then into pinned host memory); and a sharded model under ``dist.strategy=fsdp`` on 2 processes (gloo, on the CPU),
foreground and background (torch's ``dcp.async_save``).

"load" is what a resume does: load the file, put it into the model and optimizer, and touch the optimizer state
as the next step does. Each case runs in a fresh process (so one cannot inherit the other's memory), after one
SGD-with-momentum step (so the optimizer holds a momentum buffer as large as the model). Memory is the process's
resident set, sampled every millisecond during the save; "extra" is the peak minus the resident set just before the
save. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


class PeakRss:
    """Samples the resident set in a thread while the block runs."""

    def __enter__(self):
        self.before, self.peak, self._done = rss_bytes(), 0, threading.Event()
        self._thread = threading.Thread(target=self._sample)
        self._thread.start()
        return self

    def _sample(self):
        while not self._done.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def build(params: int, width: int = 4096):
    """A stack of linear layers of about ``params`` parameters."""
    import torch

    return torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(max(1, round(params / width**2)))])


def stepped(model, device="cpu"):
    """Its optimizer after one SGD-with-momentum step (a momentum buffer as large as the model)."""
    import torch

    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model(torch.randn(2, model[0].in_features, device=device)).sum().backward()
    optimizer.step()
    return optimizer


def checkpointer_for(folder: Path, strategy: str, in_background: bool, dist_env):
    from omegaconf import OmegaConf

    from launcher.checkpoint.checkpointer import Checkpointer

    cfg = OmegaConf.create({"ckpt": {"keep": 2, "best_metric": "", "best_mode": "max", "async": in_background},
                            "optim": {"name": "sgd"}, "train": {"batch_size": 1}, "dist": {"strategy": strategy}})
    return Checkpointer(folder, cfg, dist_env, "bench", "folder" if strategy == "fsdp" else "file"), cfg


def training_state(optimizer, device):
    import torch

    from launcher.engine.state import TrainingState

    state = TrainingState(torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0), None, 1, device)
    state.position.global_step = 1
    return state


def stall_again(checkpointer, model, optimizer, state) -> float:
    """The stall of a second checkpoint, one step later: what every save after the first costs the loop."""
    state.position.global_step += 1
    start = time.perf_counter()
    checkpointer.save(model, optimizer, state)
    stall_s = time.perf_counter() - start
    checkpointer.finish()
    return stall_s


def run_case(case: str, params: int, width: int, folder: Path) -> dict:
    """One case in this process: ``torch.save``, ``launcher`` (the step loop waits for the whole write) or
    ``launcher async`` (``ckpt.async``: it waits for the copy into host memory; ``write_s`` is the whole write).
    The model trains on the GPU where there is one: the copy the loop waits for is then device to pinned host."""
    import torch

    from launcher.checkpoint.formats import load_checkpoint
    from launcher.distributed.env import DistEnv

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build(params, width).to(device)
    optimizer = stepped(model, device)
    state_bytes = 2 * sum(p.numel() * p.element_size() for p in model.parameters())
    checkpointer, _ = checkpointer_for(folder, "ddp", case == "launcher async", DistEnv())
    state = training_state(optimizer, device)
    start = time.perf_counter()
    with PeakRss() as memory:
        if case.startswith("launcher"):
            path = checkpointer.save(model, optimizer, state)
        else:
            path = folder / "plain.pt"
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "global_step": 1}, path)
        stall_s = time.perf_counter() - start
        checkpointer.finish()
    write_s = time.perf_counter() - start
    again_s = stall_again(checkpointer, model, optimizer, state) if case.startswith("launcher") else stall_s
    start = time.perf_counter()
    if case.startswith("launcher"):  # verified, then put back as a resume does
        checkpointer.restore(path, load_checkpoint(path), model, optimizer, state)
    else:
        saved = torch.load(path, weights_only=True)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
    for value in optimizer.state.values():  # and touched, as the next step touches it (memory-mapped pages fault in)
        value["momentum_buffer"].mul_(1)
    return {
        "case": case,
        "device": str(device),
        "parameters": sum(p.numel() for p in model.parameters()),
        "state_mb": state_bytes / 2**20,
        "stall_s": stall_s,
        "stall_again_s": again_s,
        "write_s": write_s,
        "load_s": time.perf_counter() - start,
        "peak_extra_mb": (memory.peak - memory.before) / 2**20,
        "file_mb": path.stat().st_size / 2**20,
    }


def run_sharded_case(case: str, params: int, width: int, folder: Path) -> dict | None:
    """Under torchrun: one sharded save (``dist.strategy=fsdp``), in the foreground or the background, timed on every
    rank; rank 0 returns the slowest rank's stall and write."""
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from launcher.distributed.env import DistEnv

    dist.init_process_group("gloo")
    dist_env = DistEnv.from_environ()
    model = build(params, width)
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    optimizer = stepped(model)
    checkpointer, _ = checkpointer_for(folder, "fsdp", case == "fsdp async", dist_env)
    state = training_state(optimizer, torch.device("cpu"))
    dist.barrier()
    start = time.perf_counter()
    checkpointer.save(model, optimizer, state)
    stall_s = time.perf_counter() - start
    checkpointer.finish()
    write_s = time.perf_counter() - start
    again_s = stall_again(checkpointer, model, optimizer, state)
    times = [None] * dist_env.world_size
    dist.all_gather_object(times, (stall_s, write_s, again_s))
    dist.destroy_process_group()
    if not dist_env.is_main:
        return None
    parameters = dist_env.world_size * sum(p.to_local().numel() for p in model.parameters())
    return {"case": case, "processes": dist_env.world_size, "parameters": parameters,
            "stall_s": max(time[0] for time in times), "stall_again_s": max(time[2] for time in times),
            "write_s": max(time[1] for time in times)}


CASES = ["torch.save", "launcher", "launcher async", "fsdp", "fsdp async"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=int, default=100_000_000)
    parser.add_argument("--fsdp-params", type=int, default=50_000_000, help="the sharded model's, over 2 processes")
    parser.add_argument("--width", type=int, default=4096, help="of the layers (a test's small model: narrower)")
    parser.add_argument("--dir", default=None)
    parser.add_argument("--reps", type=int, default=2, help="runs of each case, alternating")
    parser.add_argument("--cases", nargs="+", choices=CASES, default=CASES,
                        help="which cases (one GPU: the fsdp ones need 2 processes, which gloo runs on the CPU)")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:  # in a folder of its own (the ranks of a sharded case share the one they are given)
        from launcher.cli.main import exit_process

        sharded = args.case.startswith("fsdp")
        result = (run_sharded_case if sharded else run_case)(args.case, args.params, args.width, Path(args.dir))
        if result:
            print(json.dumps(result))
        exit_process(0)  # a sharded case's gloo group outlives destroy_process_group: ended as a worker is
    results = []
    for case in args.cases * args.reps:
        sharded = case.startswith("fsdp")
        with tempfile.TemporaryDirectory(dir=args.dir) as folder:
            command = [sys.executable, *(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
                                         if sharded else []),
                       __file__, "--case", case, "--params", str(args.fsdp_params if sharded else args.params),
                       "--width", str(args.width), "--dir", folder]
            # Its stderr goes to ours: a failed case says why.
            case_run = subprocess.run(command, check=False, stdout=subprocess.PIPE, text=True)
        if case_run.returncode != 0:
            raise SystemExit(f"{' '.join(command)} failed ({case_run.returncode}): its stderr is above")
        results.append(json.loads(case_run.stdout.strip().splitlines()[-1]))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
