"""Checkpoint cost for a 100M-parameter model: save/load seconds and peak extra host memory, launcher vs torch.save.

    python bench/checkpoint.py [--params 100_000_000] [--dir /tmp]

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


def run_case(case: str, params: int, folder: Path) -> dict:
    import torch
    from omegaconf import OmegaConf

    from launcher.checkpoint.checkpointer import Checkpointer
    from launcher.checkpoint.files import load_checkpoint
    from launcher.distributed.env import DistEnv
    from launcher.engine.state import TrainingState

    width = 4096
    layers = max(1, round(params / (width * width)))
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model(torch.randn(2, width)).sum().backward()
    optimizer.step()
    state_bytes = 2 * sum(p.numel() * p.element_size() for p in model.parameters())
    training_state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "global_step": 1}
    cfg = OmegaConf.create({"ckpt": {"keep": 1, "best_metric": "", "best_mode": "max"}, "optim": {"name": "sgd"},
                            "train": {"batch_size": 1}, "dist": {"strategy": "ddp"}})
    state = TrainingState(torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0), None, 1, torch.device("cpu"))
    state.position.global_step = 1
    checkpointer = Checkpointer(folder, cfg, DistEnv(), run_id="bench")
    start = time.perf_counter()
    with PeakRss() as memory:
        if case == "launcher":
            path = checkpointer.save(model, optimizer, state)
        else:
            path = folder / "plain.pt"
            torch.save(training_state, path)
    save_s = time.perf_counter() - start
    start = time.perf_counter()
    if case == "launcher":  # verified, then put back as a resume does
        checkpointer.restore(path, load_checkpoint(path), model, optimizer, state)
    else:
        saved = torch.load(path, weights_only=True)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
    for value in optimizer.state.values():  # and touched, as the next step touches it (memory-mapped pages fault in)
        value["momentum_buffer"].mul_(1)
    return {
        "case": case,
        "parameters": sum(p.numel() for p in model.parameters()),
        "state_mb": state_bytes / 2**20,
        "save_s": save_s,
        "load_s": time.perf_counter() - start,
        "peak_extra_mb": (memory.peak - memory.before) / 2**20,
        "file_mb": path.stat().st_size / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=int, default=100_000_000)
    parser.add_argument("--dir", default=None)
    parser.add_argument("--reps", type=int, default=2, help="runs of each case, alternating")
    parser.add_argument("--case", choices=("launcher", "torch.save"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        with tempfile.TemporaryDirectory(dir=args.dir) as folder:
            print(json.dumps(run_case(args.case, args.params, Path(folder))))
        return
    results = []
    for case in ("torch.save", "launcher") * args.reps:
        command = [sys.executable, __file__, "--case", case, "--params", str(args.params)]
        command += ["--dir", args.dir] if args.dir else []
        results.append(json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
