"""Markdown tables from the benchmarks' JSON output, as BENCHMARKS.md shows them.

    python bench/overhead.py > overhead.jsonl; python bench/startup.py > startup.jsonl
    python bench/checkpoint.py > checkpoint.json
    python bench/wandb_log.py > wandb_log.jsonl
    python bench/report.py overhead.jsonl startup.jsonl checkpoint.json [wandb_log.jsonl]

Runs on a GPU (their summaries name the device) get their own table.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def summaries(lines: list[dict], on_gpu: bool) -> list[dict]:
    """The per-case summaries of overhead.py's output, those of GPU runs or of CPU runs."""
    return [line for line in lines if line.get("summary") and (line["device"] != "cpu") == on_gpu]


def overhead_table(lines: list[dict]) -> str:
    rows = ["| model | processes | runs | launcher steps/s | plain steps/s | ratio: all runs pooled | ratio: median "
            "(min-max) of runs | A/A control: pooled, min-max | host reads per step: launcher / plain | "
            "collectives per step: launcher / plain | limit images/s (launcher's share) | Lightning images/s "
            "(launcher over Lightning) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for case in summaries(lines, on_gpu=False):
        ratio, control = case["ratio"], case["control_ratio"]
        rows.append(
            f"| {case['arch']} | {case['procs']} | {case['runs']} | {case['launcher_steps_per_s']:.1f} | "
            f"{case['plain_steps_per_s']:.1f} | **{case['pooled_ratio']:.3f}** | {ratio['median']:.3f} "
            f"({ratio['min']:.3f}-{ratio['max']:.3f}) | {case['pooled_control_ratio']:.3f}, "
            f"{control['min']:.3f}-{control['max']:.3f} | "
            f"{case['launcher_host_reads_per_step']:.2f} / {case['plain_host_reads_per_step']:.2f} | "
            f"{case['launcher_collectives_per_step']:.2f} / {case['plain_collectives_per_step']:.2f} | {_peers(case)}")
    return "\n".join(rows)


def gpu_table(lines: list[dict]) -> str:
    rows = ["| model | GPUs | device | launcher settings | launcher images/s | plain images/s | ratio: all runs pooled "
            "(min-max of runs) | A/A control: pooled | GPU waiting for data (launcher) | limit images/s (launcher's "
            "share) | Lightning images/s (launcher over Lightning) |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for case in summaries(lines, on_gpu=True):
        ratio, wait = case["ratio"], case.get("data_wait_fraction")
        rows.append(
            f"| {case['arch']} | {case['procs']} | {case['device']} | {' '.join(case['launcher_args'])} | "
            f"{case['launcher_samples_per_s']:,.0f} | {case['plain_samples_per_s']:,.0f} | "
            f"**{case['pooled_ratio']:.3f}** ({ratio['min']:.3f}-{ratio['max']:.3f}) | "
            f"{case['pooled_control_ratio']:.3f} | {'' if wait is None else f'{wait:.1%}'} | {_peers(case)}")
    return "\n".join(rows)


def _peers(case: dict) -> str:
    """The limit and Lightning columns, where the run measured them."""
    limit = (f"{case['limit_samples_per_s']:,.0f} ({case['ratio_to_limit']:.2f})" if "ratio_to_limit" in case
             else "")
    lightning = (f"{case['lightning_samples_per_s']:,.0f} ({case['ratio_to_lightning']:.2f}x)"
                 if "ratio_to_lightning" in case else "")
    return f"{limit} | {lightning} |"


def scaling_table(lines: list[dict]) -> str:
    cases = {(case["arch"], case["procs"]): case for case in summaries(lines, on_gpu=False)}
    rows = ["| model | program | samples/s, 1 process | samples/s, 2 processes | speedup |", "|---|---|---|---|---|"]
    for arch in dict.fromkeys(arch for arch, _ in cases):
        if (arch, 1) not in cases or (arch, 2) not in cases:
            continue
        for program in ("launcher", "plain"):
            one, two = (cases[arch, procs][f"{program}_samples_per_s"] for procs in (1, 2))
            rows.append(f"| {arch} | {program} | {one:,.0f} | {two:,.0f} | {two / one:.2f}x |")
    return "\n".join(rows)


def startup_table(lines: list[dict]) -> str:
    rows = ["| command | to the first step, s | to exit (1-step run), s |", "|---|---|---|"]
    for line in lines:
        rows.append(f"| `{line['command']}` | {line['first_step_s']:.2f} | {line['exit_s']:.2f} |")
    return "\n".join(rows)


def checkpoint_table(results: list[dict]) -> str:
    """Medians per case: the step loop's stall at the first checkpoint and at the next, the whole write, and (one
    process) the load and peak extra host memory."""
    rows = ["| case | parameters | stall, first (s) | stall, again (s) | whole write (s) | load (s) | peak extra host "
            "memory (MB) |", "|---|---|---|---|---|---|---|"]
    for case in dict.fromkeys(result["case"] for result in results):
        runs = [result for result in results if result["case"] == case]
        med = {key: statistics.median(run[key] for run in runs) for key in runs[0] if key.endswith(("_s", "_mb"))
               and key != "state_mb"}
        load = f"{med['load_s']:.2f}" if "load_s" in med else ""
        extra = f"{med['peak_extra_mb']:.1f}" if "peak_extra_mb" in med else ""
        rows.append(f"| {case} | {runs[0]['parameters']:,} | {med['stall_s']:.3f} | {med['stall_again_s']:.3f} | "
                    f"{med['write_s']:.3f} | {load} | {extra} |")
    return "\n".join(rows)


def wandb_log_table(lines: list[dict]) -> str:
    rows = ["| how a metrics record reaches wandb | wall ms per record | CPU ms per record (training process) |",
            "|---|---|---|"]
    for line in lines:
        rows.append(f"| {line['case']} | {line['wall_ms_per_record']:.3f} | {line['cpu_ms_per_record']:.3f} |")
    return "\n".join(rows)


def main() -> None:
    overhead, startup, checkpoint = (Path(name).read_text() for name in sys.argv[1:4])
    wandb_log = [json.loads(line) for line in Path(sys.argv[4]).read_text().splitlines()] if sys.argv[4:] else []
    overhead_lines = [json.loads(line) for line in overhead.splitlines()]
    print(overhead_table(overhead_lines), scaling_table(overhead_lines),
          *([gpu_table(overhead_lines)] if summaries(overhead_lines, on_gpu=True) else []),
          startup_table([json.loads(line) for line in startup.splitlines()]),
          checkpoint_table(json.loads(checkpoint)), *([wandb_log_table(wandb_log)] if wandb_log else []), sep="\n\n")


if __name__ == "__main__":
    main()
