"""Finding and loading recipes: short names from `recipes/`, dotted module paths, or paths to `.py` files.

A recipe is a plain module. It must define ``build_model(cfg)`` and ``build_datasets(cfg)``; it may define
``DEFAULTS`` (a nested dict: engine keys it changes and keys of its own, typed by their default values),
``param_groups(model, cfg)``, ``loss(outputs, targets)`` and ``predictions(outputs)`` (multi-output models), and the
hooks below (``collate``, ``step``, ``metrics``, ``samples``, ``augment``, ``tokens_per_sample``,
``flops_per_sample``, ``blocks``, ``tp_plan``).
It never touches ranks, devices, samplers or process groups: the engine owns those.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from launcher.distributed.strategy import repeated_blocks
from launcher.errors import UserError, describe
from launcher.packaged import recipes_package

REQUIRED = ("build_model", "build_datasets")


def _same(outputs):
    return outputs


@dataclass(frozen=True)
class Recipe:
    """A loaded recipe module with the engine's defaults for what it leaves out."""

    name: str  # short name, used in run directories
    module: ModuleType
    origin: str = ""  # where it came from: a shipped recipe's short name, a dotted module path, a file's absolute path

    @property
    def defaults(self) -> Mapping[str, Any]:
        return getattr(self.module, "DEFAULTS", {})

    def build_model(self, cfg) -> nn.Module:
        model = self.module.build_model(cfg)
        if not isinstance(model, nn.Module):
            raise UserError(f"recipe {self.name}: build_model(cfg) returned {type(model).__name__}, not an nn.Module")
        return model

    def build_datasets(self, cfg):
        """(train, eval) datasets of (input, target) pairs; eval may be None (no evaluation)."""
        datasets = self.module.build_datasets(cfg)
        if not (isinstance(datasets, (tuple, list)) and len(datasets) == 2 and datasets[0] is not None):
            raise UserError(f"recipe {self.name}: build_datasets(cfg) must return (train, eval), eval may be None")
        return tuple(datasets)

    def param_groups(self, model: nn.Module, cfg) -> list[dict]:
        """The recipe's optimizer groups, or one group holding every parameter."""
        if hasattr(self.module, "param_groups"):
            return list(self.module.param_groups(model, cfg))
        return [{"params": list(model.parameters())}]

    @property
    def loss(self) -> Callable:
        """The recipe's ``loss(outputs, targets)`` (a mean over the batch), else cross-entropy."""
        return getattr(self.module, "loss", F.cross_entropy)

    @property
    def predictions(self) -> Callable:
        """The recipe's ``predictions(outputs)``: what accuracy scores when the model has several outputs."""
        return getattr(self.module, "predictions", _same)

    @property
    def collate(self) -> Callable | None:
        """The recipe's ``collate(samples) -> batch`` for its loaders, else the DataLoader's default."""
        return getattr(self.module, "collate", None)

    def step(self, model: nn.Module, batch) -> tuple[torch.Tensor, Any]:
        """(the batch's mean loss, what evaluation's metrics need) for one batch.

        The recipe's ``step(model, batch)``, which returns the loss or (loss, outputs); else
        ``loss(model(inputs), targets)`` of an (inputs, targets) batch.
        """
        if hasattr(self.module, "step"):
            result = self.module.step(model, batch)
            if isinstance(result, tuple) and len(result) != 2:
                raise UserError(f"recipe {self.name}: step(model, batch) returned a tuple of {len(result)}: it must "
                                "return the batch's mean loss, or (loss, outputs)")
            loss, outputs = result if isinstance(result, tuple) else (result, None)
            return self._checked(loss, "step(model, batch)"), outputs
        inputs, targets = batch
        outputs = model(inputs)
        return self._checked(self.loss(outputs, targets), "loss(outputs, targets)"), outputs

    def _checked(self, loss, hook: str) -> torch.Tensor:
        """``loss``, if it is what backward and the loss sums take: a floating-point tensor of one value.

        Else the recipe's mistake in one line, not an AttributeError from backward. Checked every step: its metadata
        only, never its value (no wait for the device).
        """
        if isinstance(loss, torch.Tensor) and loss.dim() == 0 and loss.is_floating_point():
            return loss
        if isinstance(loss, torch.Tensor):
            what = f"a tensor of dtype {str(loss.dtype).removeprefix('torch.')} and shape {tuple(loss.shape)}"
        else:
            what = "None" if loss is None else f"a {type(loss).__name__}"
        raise UserError(f"recipe {self.name}: {hook} returned {what}: it must return the batch's mean loss, a "
                        "floating-point tensor of one value (shape ())")

    def metrics(self, outputs, batch) -> dict[str, tuple]:
        """name -> (sum, count) or (sum, count, finish) for one evaluation batch.

        The recipe's ``metrics(outputs, batch)``, else accuracy for a classifier ((batch, classes) scores of integer
        targets).
        """
        if hasattr(self.module, "metrics"):
            return dict(self.module.metrics(outputs, batch))
        scores, targets = self.predictions(outputs), batch[1] if isinstance(batch, (tuple, list)) else None
        if not (isinstance(scores, torch.Tensor) and isinstance(targets, torch.Tensor)):
            return {}
        if scores.dim() != 2 or targets.dim() != 1 or targets.is_floating_point():
            return {}
        return {"accuracy": ((scores.argmax(dim=1) == targets).sum(), len(targets))}

    def samples(self, model: nn.Module, eval_set, cfg) -> list[str]:
        """A few lines the model writes after an evaluation, for a person to read (the recipe's, else none).

        The recipe's ``samples(model, eval_set, cfg)``: a language model's generated text, say. Called with the model
        in eval mode and without gradients, on the random streams the engine puts back after it; on every rank under
        fsdp (every forward is a collective: each rank must run as many), else on rank 0.
        """
        if not hasattr(self.module, "samples"):
            return []
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                lines = self.module.samples(model, eval_set, cfg)
        finally:
            model.train(was_training)
        if not (isinstance(lines, (list, tuple)) and all(isinstance(line, str) for line in lines)):
            raise UserError(f"recipe {self.name}: samples(model, eval_set, cfg) returned {type(lines).__name__}: it "
                            "must return a list of str (the lines to show)")
        return list(lines)

    @property
    def augment(self) -> Callable | None:
        """The recipe's ``augment(batch, generator, cfg) -> batch``, else None.

        A batched augmentation of training batches on the device, drawing its random numbers from ``generator`` (a
        torch.Generator there).
        """
        return getattr(self.module, "augment", None)

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        """The model's repeated blocks (a transformer's layers), what fsdp shards and activation checkpointing wraps.

        The recipe's ``blocks(model)`` (or, its name before, ``fsdp_blocks(model)``), else the children of the
        model's largest list of alike modules (``repeated_blocks``).
        """
        hook = getattr(self.module, "blocks", None) or getattr(self.module, "fsdp_blocks", None)
        return list(hook(model)) if hook else repeated_blocks(model)

    def tp_plan(self, model: nn.Module, cfg) -> dict:
        """``dist.tp``: the recipe's ``tp_plan(model, cfg)``, how its blocks split over a tensor-parallel group.

        A dict as torch's ``parallelize_module`` takes it: a submodule's name (``*`` for any one name, as in
        ``blocks.*.attention.q``) -> ``ColwiseParallel()``, ``RowwiseParallel()``, ``SequenceParallel()``.
        """
        if not hasattr(self.module, "tp_plan"):
            raise UserError(f"dist.tp={cfg.dist.tp} splits the model's blocks over processes, and recipe {self.name} "
                            "says not how: give it tp_plan(model, cfg) (recipes/gpt.py has one), or set dist.tp=1",
                            same_on_all_ranks=True)
        return dict(self.module.tp_plan(model, cfg))

    def tokens_per_sample(self, cfg) -> int | None:
        """The recipe's ``tokens_per_sample(cfg)``: with it, throughput is also counted in tokens per second."""
        return self.module.tokens_per_sample(cfg) if hasattr(self.module, "tokens_per_sample") else None

    def flops_per_sample(self, cfg) -> float | None:
        """The recipe's ``flops_per_sample(cfg)``: forward and backward FLOPs of one training sample.

        For a model the engine cannot count on the meta device (engine/flops.py); else None.
        """
        return self.module.flops_per_sample(cfg) if hasattr(self.module, "flops_per_sample") else None


def available_recipes() -> list[str]:
    """Short names of the shipped recipes (`recipes/`, installed as launcher.recipes; `_` modules are helpers)."""
    return sorted(m.name for m in pkgutil.iter_modules(recipes_package().__path__) if not m.name.startswith("_"))


def _is_file_spec(spec: str) -> bool:
    return spec.endswith(".py") or "/" in spec or "\\" in spec


def recipe_name(spec: str) -> str:
    """The short name a recipe spec gives its runs: a file's stem, a module path's last part."""
    return Path(spec).stem if _is_file_spec(spec) else spec.rsplit(".", 1)[-1]


def load_recipe(spec: str) -> Recipe:
    """Import the recipe named by ``spec`` and check it defines what the engine calls."""
    if _is_file_spec(spec):
        path = Path(spec).expanduser()
        module = _import_file(path)
        origin = str(path.resolve())
    else:
        module_name = spec if "." in spec else f"{recipes_package().__name__}.{spec}"
        module = _import_module(module_name, spec)
        origin = spec
    name = recipe_name(spec)
    missing = [fn for fn in REQUIRED if not callable(getattr(module, fn, None))]
    if missing:
        raise UserError(
            f"recipe={spec} ({module.__file__}) does not define {' and '.join(f'{fn}(cfg)' for fn in missing)}; "
            "a recipe needs build_model(cfg) -> nn.Module and build_datasets(cfg) -> (train, eval)"
        )
    if not isinstance(getattr(module, "DEFAULTS", {}), Mapping):
        raise UserError(f"recipe={spec}: DEFAULTS must be a dict of config sections, e.g. {{'train': {{'epochs': 5}}}}")
    return Recipe(name=name, module=module, origin=origin)


def _unknown(spec: str) -> UserError:
    return UserError(
        f"unknown recipe '{spec}': use a short name ({', '.join(available_recipes())}), "
        "a dotted module path (my_project.my_recipe) or a path to a .py file"
    )


def _import_module(module_name: str, spec: str) -> ModuleType:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        # Only a missing recipe module means "unknown recipe"; a missing import inside the recipe is its own error.
        if error.name and module_name.startswith(error.name):
            raise _unknown(spec) from None
        raise _import_failed(spec, error) from None
    except SyntaxError as error:
        raise _syntax_error(spec, error) from None
    except Exception as error:
        raise _import_failed(spec, error) from None


def _import_file(path: Path) -> ModuleType:
    if not path.is_file():
        where = f" (relative to {Path.cwd()})" if not path.is_absolute() else ""
        raise UserError(f"recipe={path}: no such file{where}; a recipe is a short name "
                        f"({', '.join(available_recipes())}), a dotted module path or a path to a .py file")
    if path.suffix != ".py":
        raise UserError(f"recipe={path} is not a Python file: a recipe file ends in .py")
    module_name = f"launcher_recipe_{path.stem}"
    loader_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[module_name] = module  # dataclasses and pickling look modules up here
    try:
        loader_spec.loader.exec_module(module)
    except Exception as error:
        del sys.modules[module_name]
        raise (_syntax_error if isinstance(error, SyntaxError) else _import_failed)(str(path), error) from None
    return module


def _import_failed(spec: str, error: Exception) -> UserError:
    """The recipe's own code failed as it was imported (a missing package, a typo): where, in its frames alone."""
    return UserError(f"recipe={spec} failed to import: {describe(error)}")


def _syntax_error(spec: str, error: SyntaxError) -> UserError:
    line = (error.text or "").strip()
    return UserError(f"recipe={spec}: syntax error in {error.filename}, line {error.lineno}: {error.msg}: {line}")
