"""Batches of any structure, and the recipe hooks that read them (step, metrics), in one process."""

import math
from collections import namedtuple
from types import ModuleType

import torch

from launcher.engine.batches import batch_size, to_device
from launcher.recipe import Recipe

Pair = namedtuple("Pair", "image mask")


def test_every_tensor_moves_and_only_image_tensors_become_channels_last():
    images = torch.rand(2, 3, 4, 5)
    batch = {"pair": Pair(images, torch.ones(2, 7)), "ids": [torch.arange(2), "a"], "meta": ("x", 3), "n": None}
    moved = to_device(batch, torch.device("cpu"), lambda t: t.contiguous(memory_format=torch.channels_last)
                      if t.dim() == 4 else t)
    assert isinstance(moved["pair"], Pair) and moved["ids"][1] == "a" and moved["meta"] == ("x", 3)
    assert moved["n"] is None and moved["pair"].image.is_contiguous(memory_format=torch.channels_last)
    assert moved["pair"].mask.is_contiguous() and torch.equal(moved["ids"][0], torch.arange(2))
    assert batch_size(moved) == 2 and batch_size(([torch.zeros(5, 1)], "label")) == 5


def recipe_with(**hooks) -> Recipe:
    module = ModuleType("hooks")
    module.__dict__.update(hooks)
    return Recipe(name="hooks", module=module)


def test_the_default_step_and_metrics_are_those_of_an_input_target_classifier():
    recipe, model = recipe_with(), torch.nn.Linear(3, 4)
    inputs, targets = torch.rand(6, 3), torch.tensor([0, 1, 2, 3, 0, 1])
    loss, outputs = recipe.step(model, (inputs, targets))
    assert torch.equal(loss, torch.nn.functional.cross_entropy(model(inputs), targets))
    (correct, count), = recipe.metrics(outputs, (inputs, targets)).values()
    assert count == 6 and correct == (outputs.argmax(1) == targets).sum()
    regression = recipe_with(loss=torch.nn.functional.mse_loss)
    assert regression.metrics(torch.rand(6, 1), (inputs, torch.rand(6, 1))) == {}  # no accuracy for regression


def test_a_step_may_return_the_loss_alone_and_metrics_may_finish_their_value():
    recipe = recipe_with(step=lambda model, batch: model(batch["x"]).sum(),
                         metrics=lambda outputs, batch: {"perplexity": (torch.tensor(6.0), 3, math.exp)})
    loss, outputs = recipe.step(torch.nn.Linear(2, 1), {"x": torch.ones(4, 2)})
    assert loss.dim() == 0 and outputs is None
    assert recipe.metrics(None, {}) == {"perplexity": (torch.tensor(6.0), 3, math.exp)}
