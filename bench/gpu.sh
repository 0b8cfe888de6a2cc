#!/usr/bin/env bash
# Every CUDA path once, then BENCHMARKS.md's GPU goals measured: about 5.5 minutes on one H100/H200.
#
#     [GPU_BUDGET_S=480] bash bench/gpu.sh OUT [SECTION ...]
#     # sections: smoke overhead gpt activations checkpoint compiled never (default: all), unobserved, profile
#
# Smoke runs (in parallel, not timed): digits (bf16, ckpt.async, profile.steps), ResNet-18 on synthetic CIFAR batches
# under fsdp, gpt under fsdp compiled with activation checkpointing and ckpt.async, then resumed, and gpt compiled
# with CUDA graphs. Then, one at a time: bench/overhead.py's ResNet-18 CIFAR b256 bf16 channels_last (launcher,
# plain loop, A/A control, limit, Lightning, data wait); gpt at ~100M parameters, bf16, compiled (tokens/s,
# perf/mfu, peak memory); bench/activations.py at that size (max_memory_allocated per activation checkpointing
# mode); bench/checkpoint.py's stall, synchronous and ckpt.async (pinned staging), 100M parameters on the GPU; last,
# overhead.py compiled (reduce-overhead). Each section has a time limit, so one that fails or hangs costs only its
# own. Writes OUT/gpu.log (all output), OUT/results.jsonl (one line per section: exit status, seconds, what it
# measured) and OUT/runs.tgz (the runs' logs and metrics.jsonl); bench/gpu_report.py prints the table against goals.
# Needs what the launcher needs but wandb (runs use wandb.mode=disabled); the launcher need not be installed.
set -u
out=$(mkdir -p "${1:?usage: bench/gpu.sh OUT [SECTION ...]}" && cd "$1" && pwd)
shift
sections=${*:-smoke overhead gpt activations checkpoint compiled never}
budget=${GPU_BUDGET_S:-480}  # seconds for all sections: each is cut to what is left, the report still written
repo=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)  # the runs, their checkpoints and logs (the logs and metrics go into OUT/runs.tgz)
cd "$repo"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled PYTHONPATH=$repo${PYTHONPATH:+:$PYTHONPATH}
linked=
if ! python3 -c 'import launcher.recipes' 2>/dev/null; then  # not installed (a bare GPU machine): recipes linked in
    ln -s ../recipes launcher/recipes && linked=$repo/launcher/recipes
fi
trap 'rm -rf "$work" ${linked:+"$linked"}' EXIT
quiet=(wandb.mode=disabled "log.to=[]")
torchrun1=(torchrun --standalone --nproc_per_node 1)
exec > >(tee -a "$out/gpu.log") 2>&1

# section NAME LIMIT_S COMMAND...: runs it with its output in $work/NAME.log, records exit status and seconds.
section() {
    local name=$1 limit=$2 began=$SECONDS left=$((budget - SECONDS - 15))
    shift 2
    if ((left < 30)); then
        echo "{\"section\": \"$name\", \"rc\": \"skipped: out of time\", \"seconds\": 0}" >>"$out/results.jsonl"
        echo "-- $name: skipped, ${left}s of the ${budget}s budget left"
        return 1
    fi
    ((limit > left)) && limit=$left
    echo "== $name (limit ${limit}s): $*"
    timeout -k 10 "$limit" "$@" >"$work/$name.log" 2>&1
    local rc=$?
    tail -n 4 "$work/$name.log" | cut -c1-300
    echo "{\"section\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - began))}" >>"$out/results.jsonl"
    echo "-- $name: exit $rc in $((SECONDS - began)) s"
}

# last_json NAME: the section's last line that is a JSON object, recorded as its measurement.
last_json() {
    python3 - "$1" "$work/$1.log" >>"$out/results.jsonl" <<'EOF'
import json, sys
lines = [line for line in open(sys.argv[2], errors="replace") if line.startswith(("{", "["))]
if lines:
    try:
        print(json.dumps({"measured": sys.argv[1], "result": json.loads(lines[-1])}))
    except ValueError:
        pass
EOF
}

# run_metrics NAME RUN_DIR: the run's metrics.jsonl records, its checkpoints and profiler traces, as its measurement.
run_metrics() {
    python3 - "$1" "$2" >>"$out/results.jsonl" <<'EOF'
import json, sys
from pathlib import Path
run = Path(sys.argv[2])
try:
    records = [json.loads(line) for line in open(run / "metrics.jsonl")]
except OSError:
    records = []
listed = lambda folder: sorted(path.name for path in folder.iterdir()) if folder.is_dir() else []
print(json.dumps({"measured": sys.argv[1], "records": records, "checkpoints": listed(run / "checkpoints"),
                  "profile": listed(run / "profile")}))
EOF
}

smoke() {
    local runs=$work/runs pids=()
    BENCH_TRAIN_SAMPLES=10240 section smoke_resnet18_fsdp 150 "${torchrun1[@]}" -m launcher recipe=bench/workload.py \
        model.arch=resnet18 dist.strategy=fsdp train.amp=bf16 train.channels_last=true ckpt.async=true train.epochs=2 \
        run.dir="$runs/resnet18" "${quiet[@]}" &
    pids+=($!)
    section smoke_digits 150 "${torchrun1[@]}" -m launcher recipe=digits train.amp=bf16 ckpt.async=true \
        train.epochs=3 profile.steps=3-5 run.dir="$runs/digits" "${quiet[@]}" &
    pids+=($!)
    section smoke_gpt_cudagraphs 150 "${torchrun1[@]}" -m launcher recipe=gpt train.amp=bf16 train.compile=true \
        train.compile_mode=reduce-overhead train.max_steps=60 run.dir="$runs/gpt_graphs" "${quiet[@]}" &
    pids+=($!)
    (
        gpt_fsdp=(recipe=gpt dist.strategy=fsdp train.amp=bf16 train.compile=true train.activation_checkpointing=full
                  ckpt.async=true ckpt.every_steps=20 profile.steps=21-23 run.dir="$runs/gpt_fsdp" "${quiet[@]}")
        section smoke_gpt_fsdp 150 "${torchrun1[@]}" -m launcher "${gpt_fsdp[@]}" train.max_steps=40 &&
            section smoke_gpt_fsdp_resumed 100 "${torchrun1[@]}" -m launcher "${gpt_fsdp[@]}" train.max_steps=60
    ) &
    pids+=($!)
    wait "${pids[@]}"  # a bare wait would wait for the log's tee too (bash 5.1 waits for process substitutions)
    for name in resnet18 digits gpt_graphs gpt_fsdp; do run_metrics "smoke_$name" "$runs/$name"; done
}

# resnet NAME LIMIT_S OVERHEAD.PY ARGS: bench/overhead.py's ResNet-18 (CIFAR stem, b256, one process); 60 warm-up and
# 24 x 15 timed steps per side fit in 110,000 samples (two launcher sides, --unobserved: twice that).
resnet() {
    local name=$1 limit=$2
    shift 2
    BENCH_TRAIN_SAMPLES=${BENCH_TRAIN_SAMPLES:-110000} section "$name" "$limit" python3 bench/overhead.py \
        --archs resnet18 --procs 1 --reps 1 --chunks 24 --chunk-steps 15 --warmup 60 --data-wait --workdir "$work" "$@"
    last_json "$name"
}

overhead() {  # the launcher by default (data resident on the GPU)
    resnet overhead 170 --limit --lightning --launcher-args train.amp=bf16 train.channels_last=true "${quiet[@]}"
}

never() {  # the launcher on the plain loop's data path (a DataLoader from host memory): like for like
    resnet overhead_never 150 --lightning --launcher-args train.amp=bf16 train.channels_last=true \
        data.resident=never "${quiet[@]}"
}

compiled() {  # every side compiled with CUDA graphs (the plain loop, the limit and Lightning as the launcher)
    resnet overhead_compiled 200 --limit --lightning --launcher-args train.amp=bf16 train.channels_last=true \
        train.compile=true train.compile_mode=reduce-overhead "${quiet[@]}"
}

unobserved() {  # what the launcher's observability (whereabouts, rank stats, FLOPs, memory) costs per step, eager
    BENCH_TRAIN_SAMPLES=220000 resnet overhead_unobserved 170 --unobserved --lightning --launcher-args train.amp=bf16 \
        train.channels_last=true "${quiet[@]}"
}

profile() {  # a torch.profiler trace of 3 eager steps of the launcher's loop (what the CPU does per step)
    BENCH_TRAIN_SAMPLES=25600 section profile 90 "${torchrun1[@]}" -m launcher recipe=bench/workload.py \
        model.arch=resnet18 train.amp=bf16 train.channels_last=true train.epochs=1 profile.steps=60-62 \
        run.dir="$work/runs/profile" "${quiet[@]}"
    gzip -c "$work/runs/profile/profile/rank_0.json" >"$out/profile_rank_0.json.gz" 2>/dev/null
}

GPT_100M=(model.layers=8 model.width=1024 model.heads=16 model.context=1024)

gpt() {  # 8 blocks of width 1024: 102M parameters, on 32 windows of 1,024 bytes a step
    section gpt_100m 170 "${torchrun1[@]}" -m launcher recipe=gpt "${GPT_100M[@]}" train.batch_size=32 \
        train.amp=bf16 train.compile=true train.max_steps=200 train.log_every=25 data.train_bytes=20000000 \
        ckpt.every_epochs=0 run.dir="$work/runs/gpt_100m" "${quiet[@]}"
    run_metrics gpt_100m "$work/runs/gpt_100m"
}

activations() {
    section activations 90 python3 bench/activations.py --rounds 2 --steps 3 "${GPT_100M[@]}" train.batch_size=16
    last_json activations
}

checkpoint() {
    section checkpoint 90 python3 bench/checkpoint.py --cases torch.save launcher "launcher async" --reps 1 \
        --dir "$work"
    python3 - "$work/checkpoint.log" >>"$out/results.jsonl" <<'EOF'
import json, sys
text = open(sys.argv[1], errors="replace").read()
start = text.rfind("\n[") + 1  # the list json.dumps(indent=1) began
if text[start:].startswith("["):
    try:
        print(json.dumps({"measured": "checkpoint", "result": json.loads(text[start:])}))
    except ValueError:
        pass
EOF
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader
python3 -c 'import sys, torch; print(sys.version.split()[0], torch.__version__, torch.cuda.get_device_name())'
for name in $sections; do $name; done
tar czf "$out/runs.tgz" -C "$work" --exclude='*.pt' --exclude='*.distcp' --exclude='*.bin' --exclude=profile . \
    2>/dev/null
python3 bench/gpu_report.py "$out/results.jsonl"
