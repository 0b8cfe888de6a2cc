"""One configuration: engine defaults -> recipe defaults -> YAML file -> key=value overrides, validated, read-only.

Every key has a type, taken from its default value; a value of another type, or a key that does not exist,
fails with a message naming the key, the value and what would work.
"""

from __future__ import annotations

import copy
import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, NamedTuple

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from omegaconf.nodes import AnyNode, BooleanNode, FloatNode, IntegerNode, StringNode

from launcher.config.schema import ENGINE_DEFAULTS, leaves
from launcher.distributed.env import BACKENDS, check_backend, first_bucket_mb
from launcher.distributed.parallel import COMPILE_MODES, STRATEGIES
from launcher.engine.optim import OPTIMIZERS, SCHEDULES
from launcher.engine.precision import AMP_MODES
from launcher.engine.resident import RESIDENT_MODES
from launcher.errors import UserError
from launcher.tracking.terminal import LOG_LEVELS
from launcher.tracking.wandb import WANDB_MODES

_NODE_TYPES = {bool: BooleanNode, int: IntegerNode, float: FloatNode, str: StringNode}
_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
_ELEMENT_NAMES = {bool: " of true/false", int: " of integers", float: " of numbers", str: " of strings"}


@dataclass(frozen=True)
class KeyType:
    """What a key takes, from its default value: the config's own record (OmegaConf's nodes convert values to it)."""

    kind: type | None  # bool, int, float or str; None: anything
    is_list: bool = False
    element: type | None = None  # a list's element type, when its default had one

    @classmethod
    def of(cls, value: Any) -> "KeyType":
        if isinstance(value, (list, tuple)):
            kinds = {type(v) for v in value}
            element = kinds.pop() if len(kinds) == 1 and next(iter(kinds)) in _ELEMENT_NAMES else None
            return cls(None, is_list=True, element=element)
        return cls(type(value) if type(value) in _TYPE_NAMES else None)

    def node(self, value: Any):
        """An OmegaConf node holding ``value`` that keeps this type: later values are converted to it or refused."""
        if self.is_list:
            return ListConfig(list(value), element_type=self.element or Any)
        return _NODE_TYPES[self.kind](value) if self.kind else AnyNode(value)

    def describe(self) -> str:
        if self.is_list:
            return f"a list{_ELEMENT_NAMES.get(self.element, '')}, e.g. [1, 2]"
        return _TYPE_NAMES.get(self.kind, "any value")


def _add(cfg: DictConfig, types: dict[str, KeyType], key: str, value: Any) -> None:
    """A new key (an engine default, or a recipe's own), typed by its value."""
    *sections, leaf = key.split(".")
    parent = cfg
    for section in sections:
        if section not in parent:
            parent[section] = OmegaConf.create({})
        parent = parent[section]
    types[key] = KeyType.of(value)
    parent[leaf] = types[key].node(value)


def _set(cfg: DictConfig, types: dict[str, KeyType], key: str, value: Any, origin: str) -> None:
    """Set an existing leaf, checking the key exists and the value fits its type."""
    if key not in types:
        sub_keys = [k for k in types if k.startswith(key + ".")]
        if sub_keys:
            raise UserError(f"{origin}: '{key}' is a section, not a key; set one of: {', '.join(sub_keys)}")
        close = difflib.get_close_matches(key, list(types), n=3, cutoff=0.6)
        hint = f"did you mean {' or '.join(close)}?" if close else f"valid keys are: {', '.join(types)}"
        raise UserError(f"{origin}: unknown key '{key}': {hint}")
    try:
        if types[key].is_list and not isinstance(value, list):
            raise ValueError("a list key takes a list")
        OmegaConf.update(cfg, key, value, merge=True)
    except (OmegaConfBaseException, ValueError):
        raise UserError(f"{origin}: {key}={value!r} is not {types[key].describe()}") from None


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
    cfg, types = OmegaConf.create({}), {}
    for key, value in leaves(ENGINE_DEFAULTS):
        _add(cfg, types, key, value)
    for key, value in leaves(recipe_defaults):
        _add_recipe_default(cfg, types, key, value, recipe_origin)
    OmegaConf.set_struct(cfg, True)
    for key, value in leaves(yaml_values):
        _set(cfg, types, key, value, "config file")
    for key, value, origin in overrides:
        _set(cfg, types, key, value, origin)
    return cfg


def _add_recipe_default(cfg: DictConfig, types: dict[str, KeyType], key: str, value: Any, origin: str) -> None:
    """A recipe default either changes an engine key (keeping its type) or adds a key of its own."""
    if key in types:
        _set(cfg, types, key, value, origin)
        return
    sections = key.split(".")[:-1]
    for depth in range(1, len(sections) + 1):
        if ".".join(sections[:depth]) in types:
            raise UserError(f"{origin}: '{key}' puts a key under '{sections[depth - 1]}', which is a value, "
                            "not a section")
    _add(cfg, types, key, value)


def validate(cfg: DictConfig, world_size: int, procs_per_node: int, local_gpus: bool = True) -> None:
    """Check values against each other and against the world the job will run in.

    ``local_gpus``: the job runs on this machine, so its GPUs can be counted (not so when submitting to Slurm).
    """
    _check_ranges(cfg)
    _check_choices(cfg)
    if cfg.ckpt.resume not in ("auto", "never") and not Path(cfg.ckpt.resume).exists():
        raise UserError(f"ckpt.resume={cfg.ckpt.resume}: no such file or folder; use auto, never, or a checkpoint's "
                        "path")
    _check_world(cfg, world_size)
    if local_gpus:
        check_backend(cfg.dist.backend, procs_per_node)


def _check_ranges(cfg: DictConfig) -> None:
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
        (cfg.data.num_workers >= -1, "data.num_workers", "-1 (chosen for the device) or 0 or more"),
        (0 < cfg.data.resident_share <= 1, "data.resident_share", "in (0, 1]"),
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


def _check_choices(cfg: DictConfig) -> None:
    _check_choice("optim.name", cfg.optim.name, OPTIMIZERS)
    _check_choice("dist.backend", cfg.dist.backend, BACKENDS)
    _check_choice("sched.name", cfg.sched.name, SCHEDULES)
    _check_choice("train.amp", cfg.train.amp, AMP_MODES)
    _check_choice("ckpt.best_mode", cfg.ckpt.best_mode, ("max", "min"))
    _check_choice("log.level", cfg.log.level, LOG_LEVELS)
    _check_choice("wandb.mode", cfg.wandb.mode, WANDB_MODES)
    _check_choice("data.resident", cfg.data.resident, RESIDENT_MODES)
    _check_choice("train.compile_mode", cfg.train.compile_mode, COMPILE_MODES)
    _check_choice("dist.strategy", cfg.dist.strategy, STRATEGIES)
    if cfg.dist.strategy == "fsdp" and cfg.train.amp == "fp16":
        # FSDP2 casts parameters itself (its MixedPrecisionPolicy); torch's GradScaler knows no sharded gradients.
        raise UserError("train.amp=fp16 does not work with dist.strategy=fsdp: use train.amp=bf16 (FSDP2 computes in "
                        "bf16 and reduces gradients in fp32), or dist.strategy=ddp")


def _check_world(cfg: DictConfig, world_size: int) -> None:
    """The global batch splits evenly over the processes; compile's buckets fit DDP's."""
    parts = world_size * cfg.train.grad_accum
    if cfg.train.batch_size % parts:
        below = cfg.train.batch_size - cfg.train.batch_size % parts
        accum = cfg.train.grad_accum
        over = f"{world_size} processes" + (f" x {accum} micro-batches" if accum > 1 else "")
        raise UserError(
            f"train.batch_size={cfg.train.batch_size} is the global batch and must split evenly over {over}: "
            f"use a multiple of {parts}, e.g. {below or parts} or {below + parts}"
        )
    if cfg.train.compile and world_size > 1 and cfg.dist.bucket_cap_mb < first_bucket_mb():
        # TorchDynamo's DDPOptimizer refuses buckets smaller than DDP's first one (an assertion deep in torch).
        raise UserError(f"dist.bucket_cap_mb={cfg.dist.bucket_cap_mb} must be at least {first_bucket_mb():g} "
                        "(DDP's first bucket) with train.compile=true; use e.g. dist.bucket_cap_mb=25")


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
