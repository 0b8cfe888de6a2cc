"""One configuration: engine defaults -> recipe defaults -> YAML file -> key=value overrides, validated, read-only.

Every key has a type, taken from its default value (an engine key's declared in config/keys.py, a recipe key's in
its DEFAULTS); a value of another type, or a key that does not exist, fails with a message naming the key, the value
and what would work.
"""

from __future__ import annotations

import copy
import difflib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, NamedTuple

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from omegaconf.nodes import AnyNode, BooleanNode, FloatNode, IntegerNode, StringNode

from launcher.config.keys import DEFAULTS, KEYS, RECIPE_SECTIONS, SINK_LIBRARIES, leaves
from launcher.config.machine import check_backend, check_compile_buckets
from launcher.errors import UserError

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
    text: str | None = None  # as written: what a text key takes, where YAML would read a number (3:4 as 184)


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
    return Override(key.strip(), OmegaConf.to_container(parsed)["value"], origin, text.strip())


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
    for key, value in DEFAULTS.items():
        _add(cfg, types, key, value)
    for section in RECIPE_SECTIONS:
        cfg[section] = OmegaConf.create({})
    for key, value in leaves(recipe_defaults):
        _add_recipe_default(cfg, types, key, value, recipe_origin)
    OmegaConf.set_struct(cfg, True)
    for key, value in leaves(yaml_values):
        _set(cfg, types, key, value, "config file")
    for key, value, origin, text in overrides:
        if text is not None and types.get(key, KeyType(None)).kind is str and not isinstance(value, str):
            value = text
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
    """Check every engine key against its declaration, and values against each other.

    Values are also checked against the world the job will run in.

    ``local_gpus``: the job runs on this machine, so its GPUs can be counted (not so when submitting to Slurm).
    """
    for key, declared in KEYS.items():
        value = OmegaConf.select(cfg, key)
        if value is None:
            raise UserError(f"{key}=null is not a value: give it one ({declared.type_name}, default "
                            f"{declared.default!r})")
        if declared.choices and value not in declared.choices:
            raise UserError(f"{key}={value!r} is not {declared.wanted()}")
        if declared.valid and not declared.valid[0](value):
            raise UserError(f"{key}={value} must be {declared.wanted()}" if declared.echoed else
                            f"{key} must be {declared.wanted()}")
    if cfg.dist.strategy == "fsdp" and cfg.train.amp == "fp16":
        # FSDP2 casts parameters itself (its MixedPrecisionPolicy); torch's GradScaler knows no sharded gradients.
        raise UserError("train.amp=fp16 does not work with dist.strategy=fsdp: use train.amp=bf16 (FSDP2 computes in "
                        "bf16 and reduces gradients in fp32), or dist.strategy=ddp")
    if cfg.ckpt.resume not in ("auto", "never") and not Path(cfg.ckpt.resume).exists():
        raise UserError(f"ckpt.resume={cfg.ckpt.resume}: no such file or folder; use auto, never, or a checkpoint's "
                        "path")
    _check_mesh(cfg, world_size)
    check_sink_libraries(cfg.log.to)
    groups = world_size // cfg.dist.tp  # tensor-parallel peers compute one part of each batch together
    parts = groups * cfg.train.grad_accum
    if cfg.train.batch_size % parts:
        below = cfg.train.batch_size - cfg.train.batch_size % parts
        accum = cfg.train.grad_accum
        over = (f"{world_size} processes" if groups == world_size else f"{groups} groups of dist.tp={cfg.dist.tp} "
                "processes") + (f" x {accum} micro-batches" if accum > 1 else "")
        raise UserError(
            f"train.batch_size={cfg.train.batch_size} is the global batch and must split evenly over {over}: "
            f"use a multiple of {parts}, e.g. {below or parts} or {below + parts}"
        )
    check_compile_buckets(cfg, world_size)
    if local_gpus:
        check_backend(cfg.dist.backend, procs_per_node)


def _check_mesh(cfg: DictConfig, world_size: int) -> None:
    """``dist.tp``: fsdp's, and a mesh the world fills (groups of dist.tp processes)."""
    tp = cfg.dist.tp
    if tp > 1 and cfg.dist.strategy != "fsdp":
        raise UserError(f"dist.tp={tp} splits each block over processes within FSDP: set dist.strategy=fsdp too")
    if world_size % tp:
        raise UserError(f"dist.tp={tp} does not divide the {world_size} processes into tensor-parallel groups: use a "
                        f"divisor of {world_size}, or {tp} x N processes")


def check_sink_libraries(names: Iterable[str]) -> None:
    """Each of ``log.to``'s sinks has its library installed (found, not imported: that is rank 0's, as it starts)."""
    for name in names:
        if SINK_LIBRARIES[name] is None:
            continue
        module = SINK_LIBRARIES[name][0]
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError) as error:  # a finder that refuses it, a module without a spec
            raise sink_library_missing(name, f"{type(error).__name__}: {error}") from None
        if not found:
            raise sink_library_missing(name, "not installed")


def sink_library_missing(name: str, why: str) -> UserError:
    """The one line for a ``log.to`` sink whose library cannot be had, saying what would work."""
    module, package = SINK_LIBRARIES[name] or (name, name)
    return UserError(f"log.to names {name}, but its library {module} cannot be used ({why}): pip install {package}, "
                     f"or leave {name} out of log.to", same_on_all_ranks=True)


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
