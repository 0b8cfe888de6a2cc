"""What logging one metrics record costs the training process: wandb's own ``run.log``, called in the process (as
the launcher did before), against the launcher's ``WandbRun.log`` (one pipe write to its wandb process).

    python bench/wandb_log.py [--records 100] [--every 0.05]

Both log offline, the same record (the launcher's per-``log_every`` record) with a pause between records, as
training does. Prints one JSON object per case: milliseconds per record, wall and CPU of this process (all its
threads: wandb's own sender thread is among them when wandb runs here).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

from launcher.tracking.wandb import WandbRun

RECORD = {"epoch": 1, "train/loss": 2.3, "throughput/samples_per_s": 8000.0, "lr/group0": 0.1, "lr/group1": 0.1}


def per_record_ms(log, records: int, every: float) -> dict:
    wall = cpu = 0.0
    for step in range(1, records + 1):
        time.sleep(every)
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        log(step)
        wall += time.perf_counter() - start_wall
        cpu += time.process_time() - start_cpu
    return {"wall_ms_per_record": 1000 * wall / records, "cpu_ms_per_record": 1000 * cpu / records}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=100)
    parser.add_argument("--every", type=float, default=0.05, help="seconds between records")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        import wandb

        run = wandb.init(mode="offline", dir=directory, settings=wandb.Settings(silent=True, console="off"))
        result = per_record_ms(lambda step: run.log(RECORD, step=step), args.records, args.every)
        run.finish()
        print(json.dumps({"case": "wandb run.log in the training process", **result}), flush=True)

        options = {"project": "launcher-bench", "dir": directory, "id": "benchlog", "resume": "allow"}
        launcher_run = WandbRun()
        launcher_run.begin("benchlog", 0, {"mode": "offline", "options": options, "log_level": "warning"})
        time.sleep(5)  # started: what is timed is logging, not the start
        result = per_record_ms(lambda step: launcher_run.log({"step": step, **RECORD}), args.records, args.every)
        launcher_run.finish()
        print(json.dumps({"case": "launcher WandbRun.log (wandb in its own process)", **result}), flush=True)


if __name__ == "__main__":
    main()
