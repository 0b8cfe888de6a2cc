"""bench/gpu.sh's results against BENCHMARKS.md's GPU goals, as a table.

    python bench/gpu_report.py OUT/results.jsonl
"""

from __future__ import annotations

import json
import statistics
import sys


def steady(records: list[dict], key: str) -> float | None:
    """The median of ``key`` over a run's progress records after its first (compilation, warm-up)."""
    values = [record[key] for record in records if key in record][1:]
    return statistics.median(values) if values else None


def goal(name: str, value: float | None, target: str, met: bool | None, unit: str = "") -> str:
    shown = "not measured" if value is None else f"{value:,.3g}{unit}" if abs(value) < 1000 else f"{value:,.0f}{unit}"
    verdict = "" if met is None or value is None else "met" if met else "NOT MET"
    return f"| {name} | {shown} | {target} | {verdict} |"


def resnet_rows(run: dict, title: str) -> list[str]:
    """bench/overhead.py's summary of one case against the goals."""
    if not run:
        return [goal(title, None, "", None)]
    images = run.get("launcher_samples_per_s")
    rows = [goal(f"{title}: launcher images/s", images, ">= 45,000", images >= 45_000),
            goal("  launcher / plain loop (pooled)", run["pooled_ratio"], ">= 0.98", run["pooled_ratio"] >= 0.98),
            goal("  A/A control", run["pooled_control_ratio"], "1.0 +- noise", None),
            goal("  plain loop images/s", run["plain_samples_per_s"], "", None)]
    if "data_wait_fraction" in run:
        rows.append(goal("  data wait", run["data_wait_fraction"], "< 3%", run["data_wait_fraction"] < 0.03))
    if "ratio_to_lightning" in run:
        rows += [goal("  launcher / Lightning", run["ratio_to_lightning"], ">= 1.3", run["ratio_to_lightning"] >= 1.3),
                 goal("  Lightning images/s", run["lightning_samples_per_s"], "", None)]
    if "observability_cost" in run:
        rows.append(goal("  observability's share of the step", run["observability_cost"], "", None))
    if "limit_samples_per_s" in run:
        rows.append(goal("  limit (plain, data on the GPU, compiled) images/s", run["limit_samples_per_s"], "", None))
    return rows


def main() -> None:
    lines = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
    sections = [line for line in lines if "section" in line]
    measured = {line["measured"]: line for line in lines if "measured" in line}
    print("| section | exit | seconds |\n|---|---|---|")
    for line in sections:
        print(f"| {line['section']} | {line['rc']} | {line['seconds']} |")
    print("\n| smoke run | last step | checkpoints | profiler traces |\n|---|---|---|---|")
    for name, run in measured.items():
        if name.startswith("smoke_"):
            steps = [record["step"] for record in run["records"] if "step" in record]
            print(f"| {name} | {max(steps, default='none')} | {', '.join(run['checkpoints']) or 'none'} "
                  f"| {len(run['profile'])} |")
    rows = ["| measurement | value | goal | |", "|---|---|---|---|"]
    for name, title in (("overhead", "eager, data on the GPU"), ("overhead_never", "eager, DataLoader"),
                        ("overhead_unobserved", "eager, data on the GPU (again)"),
                        ("overhead_compiled", "compiled, CUDA graphs")):
        rows += resnet_rows(measured.get(name, {}).get("result", {}), f"ResNet-18 b256 bf16 {title}")
    gpt = measured.get("gpt_100m", {}).get("records", [])
    mfu = steady(gpt, "perf/mfu")
    rows += [goal("gpt ~100M bf16 compiled: tokens/s", steady(gpt, "throughput/tokens_per_s"), "", None),
             goal("gpt: MFU", mfu, ">= 40%", (mfu or 0) >= 0.40),
             goal("gpt: peak allocated GiB", steady(gpt, "memory/peak_allocated_gib"), "", None)]
    modes = measured.get("activations", {}).get("result", {}).get("modes", {})
    for mode, numbers in modes.items():
        rows.append(goal(f"activation checkpointing {mode}: activation MiB (time vs off)",
                         numbers["activation_bytes"] / 2**20, f"time x{numbers['time_vs_off']:.2f}", None))
    cases = {case["case"]: case for case in measured.get("checkpoint", {}).get("result", [])}
    if "launcher" in cases and "launcher async" in cases:
        share = cases["launcher async"]["stall_again_s"] / cases["launcher"]["stall_again_s"]
        rows += [goal(f"checkpoint stall, {case} (s)", cases[case]["stall_again_s"], "", None) for case in cases]
        rows.append(goal("async stall / synchronous save", share, "<= 20%", share <= 0.2))
    print("\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
