"""Every engine key, declared once.

Each key has its default (whose Python type is the key's type), a one-line meaning, its allowed values (choices or
a range) and what a resume may do with it. Validation, `python -m launcher --help`, the derived run name, the
resume checks and docs/configuration.md's key table all come from this table. It imports nothing from the rest of
the launcher, so every layer may read it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

# What a resume may do with a key (launcher/run/start.py):
FREE = "changes freely"  # how long, how the run is watched, saved and spread over processes
APPLIED = "applied on resume"  # to the restored optimizer and schedule
DEFINES = "defines the run"  # changed, it is another run: refused on resume, and another derived run name


@dataclass(frozen=True)
class Key:
    """One key's declaration.

    It has ``default`` (its type is the key's), ``meaning`` (one line), ``choices`` or ``valid`` (a test and what it
    wants), the resume policy, ``details`` for the documentation's table, and ``on_change``: what a resume with
    another value says.
    """

    default: Any
    meaning: str
    choices: tuple[str, ...] = ()
    valid: tuple[Callable[[Any], bool], str] | None = None
    resume: str = DEFINES
    details: str = ""
    on_change: str = ""
    echoed: bool = True  # an invalid value is said back (not one that may hold a credential)

    @property
    def type_name(self) -> str:
        if isinstance(self.default, (list, tuple)):
            return "list"
        return type(self.default).__name__

    def wanted(self) -> str:
        """What a value must be, in words ('' when any value of its type will do)."""
        if self.choices:
            return f"one of: {', '.join(self.choices)}"
        return self.valid[1] if self.valid else ""


def at_least(low: int) -> tuple[Callable[[Any], bool], str]:
    return (lambda value: value >= low), f"{low} or more"


def above(low: float) -> tuple[Callable[[Any], bool], str]:
    return (lambda value: value > low), f"greater than {low:g}"


_CONTAINER_SCHEMES = ("abfs", "abfss", "az")  # adlfs's container@account names a place, not a user


def _storage_url(value: str) -> bool:
    """'' or protocol://path, with no user, password, query or fragment in it.

    Credentials come from the storage library's own environment and files; a user name alone may be a token, and a
    query is where signed URLs carry theirs. Azure's ``container@account`` is the one ``@`` allowed: a container's
    name (lowercase letters, digits, hyphens) is no secret.
    """
    protocol, _, rest = value.partition("://")
    if value == "" or not (re.fullmatch(r"[a-z][a-z0-9+.-]*", protocol) and rest) or any(c in rest for c in "?#"):
        return value == ""
    userinfo = rest.split("/")[0].rpartition("@")[0]
    return not userinfo or protocol in _CONTAINER_SCHEMES and bool(re.fullmatch(r"[a-z0-9-]+", userinfo))


# log.to's names: where rank 0's records go besides metrics.jsonl, each one class in launcher/tracking/sinks.py (its
# SINKS). Here, the module each imports and the package that brings it, so a missing one fails before a process
# starts; None for wandb, a dependency of the launcher (its process warns if it cannot start, and training goes on).
SINK_LIBRARIES: dict[str, tuple[str, str] | None] = {"wandb": None, "tensorboard": ("tensorboard", "tensorboard"),
                                                     "mlflow": ("mlflow", "mlflow-skinny")}


KEYS: dict[str, Key] = {
    "recipe": Key("", "the recipe: a short name from recipes/, a dotted module path, or a .py file (required)"),
    # run: where the run lives
    "run.dir": Key("", "where the run writes; '' means runs/<recipe>/<run.name>", resume=FREE,
                   details="One run per directory (reliability.md)."),
    "run.name": Key("", "the run's name; '' derives it from the keys that define the run", resume=FREE,
                    details="So the same command finds the same run."),
    # train: the loop
    "train.epochs": Key(10, "epochs to train", valid=at_least(1), resume=FREE),
    "train.batch_size": Key(256, "the global batch, split evenly over the processes", valid=at_least(1),
                            resume=APPLIED, details="Changed on resume only at an epoch boundary."),
    "train.seed": Key(0, "seeds model init and data order alike on every rank, then seed + rank per rank",
                      valid=((lambda value: 0 <= value < 2**31), "in [0, 2**31)")),
    "train.log_every": Key(50, "steps between progress lines (the loop's only host reads)", valid=at_least(1),
                           resume=FREE),
    "train.grad_accum": Key(1, "micro-batches per optimizer step; the math stays that of train.batch_size",
                            valid=at_least(1), resume=APPLIED,
                            details="Each process runs batch_size / (processes x grad_accum) samples at a time; "
                                    "gradients are reduced once per step."),
    "train.clip_grad_norm": Key(0.0, "clip the global gradient norm to this (0: off)",
                                valid=at_least(0), resume=APPLIED,
                                details="The norm before clipping is logged as grad_norm."),
    "train.max_steps": Key(0, "stop after this many optimizer steps (0: no limit), e.g. for smoke runs",
                           valid=at_least(0), resume=FREE),
    "train.limit_eval_batches": Key(0, "evaluate only the first N eval batches (0: all)", valid=at_least(0),
                                    resume=FREE),
    "train.amp": Key("none", "mixed precision: bf16 (CPU and CUDA) or fp16 (with a checkpointed GradScaler)",
                     choices=("none", "bf16", "fp16"), resume=APPLIED),
    "train.compile": Key(False, "torch.compile the model, inside DDP, so each bucket's all-reduce overlaps backward",
                         resume=FREE, details="Needs dist.bucket_cap_mb >= 1 on several processes (design.md)."),
    "train.compile_mode": Key("default", "torch.compile's mode (reduce-overhead: CUDA graphs)",
                              choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
                              resume=FREE),
    "train.activation_checkpointing": Key(
        "off", "recompute the blocks' activations in backward: off, full (every block), N (every N-th), op",
        valid=((lambda value: value in ("off", "full", "op") or value.isdigit() and int(value) > 0),
               "off, full, op, or a whole number N > 0 (every N-th block)"),
        resume=FREE,
        details="Less activation memory for more compute: full keeps only each block's input (about a third more "
                "compute); op keeps the outputs of matmuls and attention and recomputes the rest. Bitwise the same "
                "training either way (README, \"Which parallelism\")."),
    "train.channels_last": Key(False, "NHWC memory format for the model and image batches", resume=FREE,
                               details="Faster convolutions on recent GPUs."),
    "train.keep_host_memory": Key(True, "glibc keeps freed host memory for the next step instead of faulting it in",
                                  resume=FREE, details="No effect where the C library is not glibc (BENCHMARKS.md)."),
    # sched: the learning-rate schedule, stepped every optimizer step
    "sched.name": Key("constant", "the LR schedule, stepped every optimizer step",
                      choices=("constant", "step", "cosine", "onecycle"), resume=APPLIED,
                      details="step: times sched.gamma every sched.step_size steps; cosine: down to "
                              "sched.min_lr_ratio of the LR; onecycle: cosine after a warmup of 30% of the steps."),
    "sched.warmup_steps": Key(0, "linear warmup from 0 over this many steps, before any schedule",
                              valid=at_least(0), resume=APPLIED),
    "sched.step_size": Key(1000, "sched.name=step: steps between LR drops", valid=at_least(1), resume=APPLIED),
    "sched.gamma": Key(0.1, "sched.name=step: the factor of each drop", resume=APPLIED),
    "sched.min_lr_ratio": Key(0.0, "where cosine and onecycle end, as a fraction of each group's LR",
                              valid=((lambda value: 0 <= value <= 1), "in [0, 1]"), resume=APPLIED),
    # optim: the optimizer
    "optim.name": Key("sgd", "the optimizer; on CUDA its fused implementation", choices=("sgd", "adam", "adamw")),
    "optim.lr": Key(0.1, "learning rate (param groups may set their own)", valid=above(0), resume=APPLIED),
    "optim.momentum": Key(0.0, "SGD momentum", valid=((lambda value: 0 <= value < 1), "in [0, 1)"), resume=APPLIED),
    "optim.weight_decay": Key(0.0, "weight decay", valid=at_least(0), resume=APPLIED),
    # data: loading
    "data.root": Key("data", "where recipes look for data sets", resume=FREE),
    "data.num_workers": Key(-1, "DataLoader worker processes per rank; -1 chooses for the device",
                            valid=at_least(-1),
                            resume=FREE,
                            on_change="training continues exactly: each sample's random numbers are seeded by its "
                                      "place in the epoch, whichever process reads it",
                            details="-1: none on a CPU (the training needs the cores, and in-memory data is fastest "
                                    "read in the process); on a GPU 4, or fewer when the cores this process may "
                                    "use, shared by the node's processes, are fewer (one kept for the process)."),
    "data.download": Key(False, "let recipes download missing data", resume=FREE),
    "data.tokens": Key("", "a token corpus folder (python -m launcher.tokens) for a recipe that reads one",
                       details="recipe=gpt trains from its train/ and eval/ instead of its own bytes ('')."),
    "data.resident": Key("auto", "keep an in-memory data set on the device and index batches there",
                         choices=("auto", "always", "never"), resume=FREE,  # not on/off: YAML reads them as bools
                         details="In exactly the DataLoader path's order (same weights, resumes, 1 vs N processes): "
                                 "always (a TensorDataset, else an error), never, or auto (a TensorDataset on a GPU "
                                 "within data.resident_share of its memory). The header says which path runs."),
    "data.resident_share": Key(0.25, "the share of the GPU's memory data.resident=auto may give the data set",
                               valid=((lambda value: 0 < value <= 1), "in (0, 1]"), resume=FREE),
    # eval: evaluation after each epoch
    "eval.batch_size": Key(512, "evaluation batch", valid=at_least(1), resume=FREE),
    "eval.every_steps": Key(0, "also evaluate every N optimizer steps, inside epochs (0: at epochs' ends only)",
                            valid=at_least(0), resume=FREE,
                            details="A stream, which has no epochs, is evaluated this way (and at train.max_steps). "
                                    "Evaluation never moves training's random streams: how often it runs changes "
                                    "nothing of the training."),
    "eval.sharded": Key(False, "every rank evaluates a share and the sums are all-reduced (the same numbers)",
                        resume=FREE, details="false: rank 0 evaluates the whole set. Under dist.strategy=fsdp every "
                                             "rank always evaluates (a sharded model cannot run on one)."),
    "eval.only": Key(False, "evaluate a checkpoint or model.pt (ckpt.resume, else the newest in run.dir) and exit",
                     resume=FREE),
    # ckpt: checkpoints
    "ckpt.every_epochs": Key(1, "write a checkpoint every N epochs (0: off); the last epoch always writes one",
                             valid=at_least(0), resume=FREE),
    "ckpt.every_steps": Key(0, "also write one every N optimizer steps, inside epochs (0: off)",
                            valid=at_least(0), resume=FREE),
    "ckpt.keep": Key(3, "step checkpoints kept, newest first; older ones of this run are deleted", valid=at_least(1),
                     resume=FREE),
    "ckpt.async": Key(False, "write checkpoints in the background: the step loop waits only for a copy in host memory",
                      resume=FREE, details="At most one write in flight; the last checkpoint and a stop's are on "
                                           "disk before the run ends. Off by default: the copy takes as much host "
                                           "memory as the model and optimizer state, and on a CPU-only machine the "
                                           "writer takes cores from training (reliability.md, \"Asynchronous "
                                           "checkpoints\")."),
    "ckpt.remote": Key("", "also keep the run's checkpoints, model.pt and ledger at this fsspec URL (s3://bucket/"
                           "prefix, gs://, az://, file://), uploaded in the background ('': off)",
                       valid=(_storage_url, "'' or a URL such as s3://bucket/prefix, with no credentials in it (the "
                                            "storage library reads them from its own environment and files)"),
                       resume=FREE, echoed=False,
                       details="A start whose run.dir holds no run continues from the newest checkpoint there that "
                               "verifies. One run per prefix (reliability.md, \"Checkpoints in object storage\")."),
    "ckpt.remote_wait_s": Key(30.0, "how long a run's end waits for a ckpt.remote that fails, giving it back included",
                              valid=above(0), resume=FREE,
                              details="What is not uploaded by then waits in run.dir for the next start. Keep it "
                                      "below the grace a scheduler gives a stopped job (Slurm's KillWait, "
                                      "Kubernetes' terminationGracePeriodSeconds: 30 s by default)."),
    "ckpt.best_metric": Key("", "also keep the best checkpoint by this eval metric as best.pt ('' : off)",
                            valid=((lambda value: value == "" or value.startswith("eval/")),
                                   "an eval metric such as eval/accuracy or eval/loss, or '' (off)"),
                            resume=FREE, details="best/ under dist.strategy=fsdp."),
    "ckpt.best_mode": Key("max", "whether ckpt.best_metric is best at its max or its min", choices=("max", "min"),
                          resume=FREE),
    "ckpt.resume": Key("auto", "auto: the newest good checkpoint of the run in run.dir; never: step 0; or a path",
                       resume=FREE, details="never starts at step 0 in a directory that holds no run yet."),
    # dist: processes and their communication
    "dist.backend": Key("auto", "the process group's backend; auto: nccl with CUDA, gloo otherwise",
                        choices=("auto", "gloo", "nccl"), resume=FREE),
    "dist.nproc_per_node": Key(1, "processes python -m launcher starts through torchrun", valid=at_least(1),
                               resume=FREE, details="Under torchrun, torchrun's --nproc_per_node counts.",
                               on_change="the data order and each sample's random numbers continue exactly; each "
                                         "rank's own streams (dropout) start afresh"),
    "dist.threads": Key(0, "CPU threads of each process's torch operations (0: auto)", valid=at_least(0),
                        resume=FREE,
                        details="auto: OMP_NUM_THREADS where set (torchrun sets 1 when it starts several processes), "
                                "else the cores this process may use, less one, shared by the node's processes; at "
                                "least 1 (an operation's threads wait for the slowest: one core kept free keeps a "
                                "busy machine from stalling them all). On a machine of your own, every core may be "
                                "faster. The header says how many."),
    "dist.timeout_s": Key(1800, "a rank waiting longer than this in a collective ends the job instead of hanging",
                          valid=at_least(1), resume=FREE,
                          details="Long enough for rank 0 to evaluate while the others wait."),
    "dist.bucket_cap_mb": Key(25.0, "DDP's gradient bucket size", valid=above(0), resume=FREE),
    "dist.stop_check_every": Key(10, "steps between the ranks' agreements on a stop signal", valid=at_least(1),
                                 resume=FREE, details="A tiny asynchronous all-gather, which also carries each "
                                                      "rank's own time and memory to rank 0's reports; a stop comes "
                                                      "within twice this many steps."),
    "dist.sync_batchnorm": Key(False, "BatchNorm statistics over the global batch instead of each rank's share",
                               resume=FREE,
                               details="torch's SyncBatchNorm on GPUs, the same statistics from all-reduced sums "
                                       "elsewhere. Without it a BatchNorm model computes something different on N "
                                       "processes than on one; with it the same, within float rounding. It costs an "
                                       "all-reduce per BatchNorm layer per step."),
    "dist.strategy": Key("ddp", "ddp: a whole model per process; fsdp: parameters, gradients, optimizer sharded",
                         choices=("ddp", "fsdp"),
                         details="fsdp: FSDP2, checkpoints as folders of shards (README, \"DDP or FSDP\"). A run "
                                 "keeps the strategy it began with: its checkpoints are of that kind."),
    "dist.tp": Key(1, "fsdp: processes that split each block's matrices (tensor parallel); FSDP shards across",
                   valid=at_least(1), resume=FREE,
                   details="A 2-D mesh: dist.tp processes compute each batch together, the world divided by dist.tp "
                           "groups of them read different batches. The recipe's tp_plan(model, cfg) says how its "
                           "blocks split; its checkpoints resume on any mesh."),
    "dist.reshard_after_forward": Key(True, "fsdp: free each block's gathered weights after its forward", resume=FREE,
                                      details="false keeps them from forward to backward (less communication, more "
                                              "memory)."),
    # log and wandb: what the run tells
    "log.to": Key(["wandb"], "where rank 0's records go besides metrics.jsonl (always written)",
                  valid=((lambda names: all(name in SINK_LIBRARIES for name in names)),
                         f"a list of: {', '.join(SINK_LIBRARIES)} (or [])"),
                  resume=FREE,
                  details="Each gets the config, the model summary, every metric at its step, the text records and "
                          "model.pt; a resumed run continues the same run in each. wandb.mode=disabled leaves wandb "
                          "out. tensorboard writes to run.dir/tensorboard; mlflow to MLFLOW_TRACKING_URI, else "
                          "run.dir/mlruns (tracking.md)."),
    "log.level": Key("info", "rank 0's log level (--quiet: warning); other ranks print only errors",
                     choices=("debug", "info", "warning", "error"), resume=FREE),
    "log.straggler_share": Key(0.2, "warn when a rank's own time exceeds the median rank's by this share of the "
                                    "step time, in two progress reports in a row (0: never)",
                               valid=((lambda value: 0 <= value <= 1), "in [0, 1]"), resume=FREE,
                               details="A rank's own time: waiting for its data and the host's part of its forward. "
                                       "perf/slowest_rank and perf/slowest_vs_median are logged at every report."),
    "profile.steps": Key("", "FIRST-LAST: a torch.profiler trace of those optimizer steps, per rank, in <run "
                             "dir>/profile ('': off)",
                         valid=((lambda value: value == "" or step_span(value) is not None), "'' or FIRST-LAST, e.g. "
                                                                                             "20-24, or one step"),
                         resume=FREE, details="Chrome/Perfetto JSON, and on CUDA a memory snapshot (README, "
                                              "\"Seeing inside a run\"). Nothing is paid when it is ''."),
    "wandb.mode": Key("auto", "auto: online with W&B credentials, else offline (wandb sync uploads later)",
                      choices=("auto", "online", "offline", "disabled"), resume=FREE),
    "wandb.project": Key("launcher", "W&B project", resume=FREE),
    "wandb.entity": Key("", "W&B team or user ('': your default)", resume=FREE),
    "wandb.name": Key("", "W&B run name ('': <recipe>-<run name>)", resume=FREE),
    "wandb.group": Key("", "W&B run group ('': the Slurm array job of a sweep task)", resume=FREE),
    "wandb.tags": Key([], "W&B run tags, e.g. [baseline,lr-sweep]", resume=FREE),
}

# The section for a recipe's own keys (the engine has none there); a recipe may add keys to the others too.
RECIPE_SECTIONS = ("model",)
# A recipe's own key defines the run, unless it sits in a section all about how the run is watched and kept, or in
# the schedule's.
_RECIPE_KEY_RESUME = {"run": FREE, "eval": FREE, "ckpt": FREE, "log": FREE, "profile": FREE, "wandb": FREE,
                      "sched": APPLIED}


def step_span(value: str) -> tuple[int, int] | None:
    """(first, last) of a span of steps written FIRST-LAST or N (not FIRST:LAST, which YAML reads as a number)."""
    span = re.fullmatch(r"(\d+)(?:-(\d+))?", value, re.ASCII)
    if not span or not 1 <= int(span[1]) <= int(span[2] or span[1]):
        return None
    return int(span[1]), int(span[2] or span[1])


def leaves(tree: Mapping, prefix: str = "") -> Iterable[tuple[str, Any]]:
    """(dotted key, value) for every leaf of a nested mapping."""
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from leaves(value, path + ".")
        else:
            yield path, value


def resume_policy(key: str) -> str:
    """FREE, APPLIED or DEFINES for a dotted key, an engine key's or a recipe's own."""
    return KEYS[key].resume if key in KEYS else _RECIPE_KEY_RESUME.get(key.split(".")[0], DEFINES)


DEFAULTS: dict[str, Any] = {key: declared.default for key, declared in KEYS.items()}
