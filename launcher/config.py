"""One configuration: engine defaults -> recipe defaults -> YAML file -> key=value overrides, validated, read-only.

Every key has a type, taken from its default value; a value of another type, or a key that does not exist,
fails with a message naming the key, the value and what would work.
"""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any, Iterable, Mapping, NamedTuple

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from omegaconf.nodes import AnyNode, BooleanNode, FloatNode, IntegerNode, StringNode

from launcher.dist_env import BACKENDS, FIRST_BUCKET_MB, check_backend
from launcher.errors import UserError

ENGINE_DEFAULTS: dict[str, Any] = {
    "recipe": "",
    # dir "" = runs/<recipe>/<name>; name "" = a name derived from the keys that define the run (launcher/run_dir.py).
    "run": {"dir": "", "name": ""},
    "train": {
        "epochs": 10, "batch_size": 256, "seed": 0, "log_every": 50,
        "grad_accum": 1,  # micro-batches per optimizer step; the global batch (and so the math) stays batch_size
        "clip_grad_norm": 0.0,  # 0: off
        "max_steps": 0,  # 0: no limit; else stop after this many optimizer steps (smoke runs)
        "limit_eval_batches": 0,  # 0: the whole eval set; else only its first N batches
        "amp": "none",  # none | bf16 | fp16 (fp16 with a GradScaler)
        "compile": False,  # torch.compile of the model inside DDP (TorchDynamo splits graphs at DDP buckets)
        "channels_last": False,  # NHWC memory format for models and image batches
        # glibc malloc keeps freed host memory (up to 1 GB) for the next step instead of faulting it in again.
        "keep_host_memory": True,
    },
    "sched": {"name": "constant", "warmup_steps": 0, "step_size": 1000, "gamma": 0.1, "min_lr_ratio": 0.0},
    "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.0, "weight_decay": 0.0},
    "data": {"root": "data", "num_workers": 0, "download": False},
    "eval": {"batch_size": 512, "sharded": False, "only": False},
    # resume: auto = the newest good checkpoint in run.dir, if any; never; or a checkpoint's path.
    "ckpt": {"every_epochs": 1, "every_steps": 0, "keep": 3, "best_metric": "", "best_mode": "max", "resume": "auto"},
    # 30 min: long enough for rank 0 to evaluate while the others wait, short enough to end a hung job.
    # stop_check_every: steps between the ranks' agreements on a stop signal (a stop comes within twice that).
    "dist": {"backend": "auto", "nproc_per_node": 1, "timeout_s": 1800, "bucket_cap_mb": 25.0, "stop_check_every": 10},
    "log": {"level": "info"},
    # auto: online when W&B credentials are configured, else offline (upload later with `wandb sync`).
    "wandb": {"mode": "auto", "project": "launcher", "entity": "", "name": "", "group": "", "tags": []},
    "model": {},
}

# How a key may change when a run continues from its checkpoint (launcher/resume.py). A key in neither list
# defines the run (the model, the data, the seed, the optimizer's kind, the recipe's own keys): a changed one is a
# different run, refused on resume and given a directory of its own by the derived run name.
CHANGES_FREELY = ("run", "train.epochs", "train.max_steps", "train.log_every", "train.limit_eval_batches",
                  "train.compile", "train.channels_last", "train.keep_host_memory", "data.root", "data.num_workers",
                  "data.download", "eval", "ckpt", "dist", "log", "wandb")
# Applied to the restored optimizer and schedule (batch size: at an epoch boundary only, where no position breaks).
APPLIED_ON_RESUME = ("optim.lr", "optim.momentum", "optim.weight_decay", "sched", "train.clip_grad_norm",
                     "train.grad_accum", "train.amp", "train.batch_size")


def _matches(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == prefix or key.startswith(prefix + ".") for prefix in prefixes)


def changes_freely(key: str) -> bool:
    return _matches(key, CHANGES_FREELY)


def applied_on_resume(key: str) -> bool:
    return _matches(key, APPLIED_ON_RESUME)


OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "step", "cosine", "onecycle")
AMP_MODES = ("none", "bf16", "fp16")
LOG_LEVELS = ("debug", "info", "warning", "error")
WANDB_MODES = ("auto", "online", "offline", "disabled")

_NODE_TYPES = {bool: BooleanNode, int: IntegerNode, float: FloatNode, str: StringNode}


def _typed_node(value: Any):
    """A node that keeps the type of its default: later values are converted to it or rejected."""
    if isinstance(value, Mapping):
        section = OmegaConf.create({})
        for key, sub in value.items():
            section[key] = _typed_node(sub)
        return section
    if isinstance(value, (list, tuple)):
        kinds = {type(v) for v in value}
        element_type = kinds.pop() if len(kinds) == 1 and next(iter(kinds), None) in (int, float, str, bool) else Any
        return ListConfig(list(value), element_type=element_type)
    node_type = _NODE_TYPES.get(type(value))
    return node_type(value) if node_type else AnyNode(value)


def leaves(tree: Mapping, prefix: str = "") -> Iterable[tuple[str, Any]]:
    """(dotted key, value) for every leaf of a nested mapping."""
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from leaves(value, path + ".")
        else:
            yield path, value


def leaf_keys(cfg: DictConfig) -> list[str]:
    """Every settable key of a config, dotted."""
    return [key for key, _ in leaves(OmegaConf.to_container(cfg))]


def _type_name(node) -> str:
    if isinstance(node, ListConfig):
        element_type = node._metadata.element_type
        names = {int: " of integers", float: " of numbers", str: " of strings", bool: " of true/false"}
        of = names.get(element_type, "")
        return f"a list{of}, e.g. [1, 2]"
    names = {BooleanNode: "true or false", IntegerNode: "an integer", FloatNode: "a number", StringNode: "a string"}
    return names.get(type(node), "any value")


def _set(cfg: DictConfig, key: str, value: Any, origin: str) -> None:
    """Set an existing leaf, checking the key exists and the value fits its type."""
    valid = leaf_keys(cfg)
    if key not in valid:
        sub_keys = [k for k in valid if k.startswith(key + ".")]
        if sub_keys:
            raise UserError(f"{origin}: '{key}' is a section, not a key; set one of: {', '.join(sub_keys)}")
        close = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
        hint = f"did you mean {' or '.join(close)}?" if close else f"valid keys are: {', '.join(valid)}"
        raise UserError(f"{origin}: unknown key '{key}': {hint}")
    parent_key, _, leaf = key.rpartition(".")
    node = (OmegaConf.select(cfg, parent_key) if parent_key else cfg)._get_node(leaf)
    try:
        if isinstance(node, ListConfig) and not isinstance(value, list):
            raise ValueError("a list key takes a list")
        OmegaConf.update(cfg, key, value, merge=True)
    except (OmegaConfBaseException, ValueError):
        raise UserError(f"{origin}: {key}={value!r} is not {_type_name(node)}") from None


class Override(NamedTuple):
    key: str
    value: Any
    origin: str  # where it was written, for error messages: "command line", "sweep.txt line 3"


def _parse_override(item: str, origin: str) -> Override:
    key, sep, text = item.partition("=")
    where = "" if origin == "command line" else f"{origin}: "
    if not sep or not key:
        raise UserError(f"{where}expected key=value, got '{item}' (e.g. recipe={item} or train.epochs=3)")
    # YAML rules give "3" -> 3, "true" -> True, "[1,2]" -> a list, as OmegaConf's own dotlist does.
    try:
        parsed = OmegaConf.from_dotlist([f"value={text}"])
    except Exception as error:  # the YAML parser's: an unclosed bracket or quote
        problem = str(error).splitlines()[0]
        raise UserError(f"{where}{key}={text} is not a value ({problem}): close its bracket or quote; a value with "
                        f"spaces goes in quotes, quoted again for the shell: '{key}=\"my run\"'") from None
    return Override(key.strip(), OmegaConf.to_container(parsed)["value"], origin)


def parse_overrides(items: Iterable[str], origin: str = "command line") -> list[Override]:
    """``key=value`` strings (from the command line, or ``origin``), in order (a later one wins)."""
    return [_parse_override(item, origin) for item in items]


def load_yaml(path: str) -> dict:
    """A YAML config file as a plain nested dict."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"--config {path}: no such file")
    try:
        loaded = OmegaConf.load(file)
    except Exception as error:  # the YAML parser's message says where the syntax is wrong
        raise UserError(f"--config {path}: not valid YAML: {error}") from None
    if not isinstance(loaded, DictConfig):
        raise UserError(f"--config {path}: expected a mapping of keys to values at the top level")
    return OmegaConf.to_container(loaded)


def recipe_name_from(yaml_values: Mapping, overrides: list[Override]) -> str:
    """The recipe named on the command line, else in the YAML file."""
    named = [override.value for override in overrides if override.key == "recipe"]
    recipe = str(named[-1]) if named else str(yaml_values.get("recipe") or "")
    if not recipe:
        raise UserError("no recipe given: add recipe=<name>, e.g. `python -m launcher recipe=digits`")
    return recipe


def build_config(
    recipe_defaults: Mapping, yaml_values: Mapping, overrides: list[Override], recipe_origin: str
) -> DictConfig:
    """Merge the four layers into one config (not yet validated, still writable)."""
    cfg = _typed_node(ENGINE_DEFAULTS)
    for key, value in leaves(recipe_defaults):
        _add_recipe_default(cfg, key, value, recipe_origin)
    OmegaConf.set_struct(cfg, True)
    for key, value in leaves(yaml_values):
        _set(cfg, key, value, "config file")
    for key, value, origin in overrides:
        _set(cfg, key, value, origin)
    return cfg


def _add_recipe_default(cfg: DictConfig, key: str, value: Any, origin: str) -> None:
    """A recipe default either changes an engine key (keeping its type) or adds a key of its own."""
    if key in leaf_keys(cfg):
        _set(cfg, key, value, origin)
        return
    *sections, leaf = key.split(".")
    parent = cfg
    for section in sections:
        if section not in parent:
            parent[section] = OmegaConf.create({})
        parent = parent[section]
        if not isinstance(parent, DictConfig):
            raise UserError(f"{origin}: '{key}' puts a key under '{section}', which is a value, not a section")
    parent[leaf] = _typed_node(value)


def validate(cfg: DictConfig, world_size: int, procs_per_node: int, local_gpus: bool = True) -> None:
    """Check values against each other and against the world the job will run in.

    ``local_gpus``: the job runs on this machine, so its GPUs can be counted (not so when submitting to Slurm).
    """
    checks = [
        (cfg.train.epochs >= 1, "train.epochs", "at least 1"),
        (0 <= cfg.train.seed < 2**31, "train.seed", "in [0, 2**31)"),
        (cfg.train.batch_size >= 1, "train.batch_size", "at least 1"),
        (cfg.train.log_every >= 1, "train.log_every", "at least 1"),
        (cfg.train.grad_accum >= 1, "train.grad_accum", "at least 1"),
        (cfg.train.clip_grad_norm >= 0, "train.clip_grad_norm", "0 (off) or more"),
        (cfg.train.max_steps >= 0, "train.max_steps", "0 (no limit) or more"),
        (cfg.train.limit_eval_batches >= 0, "train.limit_eval_batches", "0 (all) or more"),
        (cfg.sched.warmup_steps >= 0, "sched.warmup_steps", "0 or more"),
        (cfg.sched.step_size >= 1, "sched.step_size", "at least 1"),
        (0 <= cfg.sched.min_lr_ratio <= 1, "sched.min_lr_ratio", "in [0, 1]"),
        (cfg.optim.lr > 0, "optim.lr", "greater than 0"),
        (0 <= cfg.optim.momentum < 1, "optim.momentum", "in [0, 1)"),
        (cfg.optim.weight_decay >= 0, "optim.weight_decay", "0 or more"),
        (cfg.data.num_workers >= 0, "data.num_workers", "0 or more"),
        (cfg.eval.batch_size >= 1, "eval.batch_size", "at least 1"),
        (cfg.dist.nproc_per_node >= 1, "dist.nproc_per_node", "at least 1"),
        (cfg.dist.timeout_s >= 1, "dist.timeout_s", "at least 1 (seconds)"),
        (cfg.dist.bucket_cap_mb > 0, "dist.bucket_cap_mb", "greater than 0"),
        (cfg.dist.stop_check_every >= 1, "dist.stop_check_every", "at least 1"),
        (cfg.ckpt.every_epochs >= 0, "ckpt.every_epochs", "0 (off) or more"),
        (cfg.ckpt.every_steps >= 0, "ckpt.every_steps", "0 (off) or more"),
        (cfg.ckpt.keep >= 1, "ckpt.keep", "at least 1"),
        (cfg.ckpt.best_metric == "" or cfg.ckpt.best_metric.startswith("eval/"), "ckpt.best_metric",
         "an eval metric such as eval/accuracy or eval/loss, or '' (off)"),
    ]
    for ok, key, wanted in checks:
        if not ok:
            raise UserError(f"{key}={OmegaConf.select(cfg, key)} must be {wanted}")
    _check_choice("optim.name", cfg.optim.name, OPTIMIZERS)
    _check_choice("dist.backend", cfg.dist.backend, BACKENDS)
    _check_choice("sched.name", cfg.sched.name, SCHEDULES)
    _check_choice("train.amp", cfg.train.amp, AMP_MODES)
    _check_choice("ckpt.best_mode", cfg.ckpt.best_mode, ("max", "min"))
    _check_choice("log.level", cfg.log.level, LOG_LEVELS)
    _check_choice("wandb.mode", cfg.wandb.mode, WANDB_MODES)
    if cfg.ckpt.resume not in ("auto", "never") and not Path(cfg.ckpt.resume).is_file():
        raise UserError(f"ckpt.resume={cfg.ckpt.resume}: no such file; use auto, never, or a checkpoint's path")
    parts = world_size * cfg.train.grad_accum
    if cfg.train.batch_size % parts:
        below = cfg.train.batch_size - cfg.train.batch_size % parts
        accum = cfg.train.grad_accum
        over = f"{world_size} processes" + (f" x {accum} micro-batches" if accum > 1 else "")
        raise UserError(
            f"train.batch_size={cfg.train.batch_size} is the global batch and must split evenly over {over}: "
            f"use a multiple of {parts}, e.g. {below or parts} or {below + parts}"
        )
    if cfg.train.compile and world_size > 1 and cfg.dist.bucket_cap_mb < FIRST_BUCKET_MB:
        # TorchDynamo's DDPOptimizer refuses buckets smaller than DDP's first one (an assertion deep in torch).
        raise UserError(f"dist.bucket_cap_mb={cfg.dist.bucket_cap_mb} must be at least {FIRST_BUCKET_MB:g} "
                        "(DDP's first bucket) with train.compile=true; use e.g. dist.bucket_cap_mb=25")
    if local_gpus:
        check_backend(cfg.dist.backend, procs_per_node)


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UserError(f"{key}={value!r} is not one of: {', '.join(choices)}")


def freeze(cfg: DictConfig) -> DictConfig:
    """Make the config read-only: nothing downstream changes what the user asked for."""
    OmegaConf.set_readonly(cfg, True)
    return cfg


def with_run_dir(cfg: DictConfig, run_dir: str) -> DictConfig:
    """A read-only copy of ``cfg`` with ``run.dir`` filled in."""
    resolved = copy.deepcopy(cfg)
    OmegaConf.set_readonly(resolved, False)
    resolved.run.dir = run_dir
    return freeze(resolved)
