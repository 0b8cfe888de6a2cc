# Shared by the sbatch templates in this folder (sourced, not run). See docs/slurm.md.

# Processes per node: LAUNCHER_NPROC, else the GPUs Slurm gave this node, else 1.
launcher_nproc() {
    echo "${LAUNCHER_NPROC:-${SLURM_GPUS_ON_NODE:-1}}"
}

# torchrun passes these on to its workers (SIGUSR2 is the templates' stop signal; see launcher_run).
TORCHRUN_SIGNALS=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR2

# Run "$@" (an srun command line) and survive the time limit:
# Slurm sends SIGUSR1 to this batch shell only, some time before the limit (--signal=B:USR1@SECONDS). The shell
# relays SIGUSR2 to srun, which forwards it to torchrun, which (--signals-to-handle) forwards it to the workers:
# they finish their step, agree, write a checkpoint and exit (code 75). Then the job requeues itself; the requeued
# job keeps its job id, so the launcher finds the same run directory and resumes. SIGTERM would not do for the
# relay (srun answers it by killing the step), and SIGUSR1 stays out of the training processes, where NCCL and
# debuggers may use it.
launcher_run() {
    local stop_requested=0 child status outcome
    # The run's rank 0 writes how it ended here: finished, stopped (a checkpoint; the same job continues) or failed.
    # Its folder is made here: the job's output may go elsewhere (sbatch -o), and no logs/ need exist.
    export LAUNCHER_STATUS_FILE="${LAUNCHER_STATUS_FILE:-$PWD/logs/${SLURM_JOB_NAME}-${SLURM_ARRAY_JOB_ID:-$SLURM_JOB_ID}${SLURM_ARRAY_TASK_ID:+_$SLURM_ARRAY_TASK_ID}.status}"
    if ! mkdir -p "$(dirname "$LAUNCHER_STATUS_FILE")" 2>/dev/null; then
        echo "launcher: cannot make the folder of $LAUNCHER_STATUS_FILE; the status goes to ${TMPDIR:-/tmp} (this node)"
        LAUNCHER_STATUS_FILE="${TMPDIR:-/tmp}/$(basename "$LAUNCHER_STATUS_FILE")"
    fi
    rm -f "$LAUNCHER_STATUS_FILE"
    trap 'stop_requested=1; echo "launcher: SIGUSR1: stopping to requeue job $SLURM_JOB_ID"; kill -USR2 "$child"' USR1
    "$@" &
    child=$!
    while :; do
        wait "$child"
        status=$?
        kill -0 "$child" 2>/dev/null || break  # `wait` also returns when the trap runs: wait again
    done
    # No status at all (rank 0 never got as far as writing it): the exit code says what it can.
    outcome=$(cat "$LAUNCHER_STATUS_FILE" 2>/dev/null || { [ "$status" = 0 ] && echo finished || echo failed; })
    echo "launcher: the run $outcome (exit $status)"
    if [ "$outcome" = finished ]; then
        exit 0
    fi
    if [ "$outcome" = stopped ] && [ "$stop_requested" = 1 ]; then
        scontrol requeue "$SLURM_JOB_ID"
        exit 0
    fi
    if [ "$outcome" = stopped ]; then
        exit 75  # stopped by someone else's signal (a preemption): a checkpoint is written, the same job continues
    fi
    exit $(( status == 0 ? 1 : status ))
}

# The head node's address, taken on the node itself (node names need not resolve) and never a loopback address
# such as Debian's 127.0.1.1 for the host name, which other nodes cannot reach. LAUNCHER_HEAD_ADDR overrides it.
launcher_head_addr() {
    local head
    head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
    if [ -n "${LAUNCHER_HEAD_ADDR:-}" ]; then
        echo "$LAUNCHER_HEAD_ADDR"
        return
    fi
    srun --nodes=1 --ntasks=1 -w "$head" bash -c '
        addr=$(hostname --ip-address | cut -d" " -f1)
        case "$addr" in 127.*|"") addr=$(hostname -I | cut -d" " -f1) ;; esac
        echo "$addr"'
}
