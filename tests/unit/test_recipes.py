"""The shipped recipes build, and the recipe interface does what README promises."""

import importlib.util
import re
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

from launcher.config.build import build_config, parse_overrides
from launcher.engine.optim import build_optimizer
from launcher.errors import UserError
from launcher.recipe import Recipe, available_recipes, load_recipe


def config_for(recipe, overrides=()):
    return build_config(recipe.defaults, {}, parse_overrides(overrides), recipe.name)


def test_shipped_recipes():
    assert available_recipes() == ["digits", "features", "gpt", "lenet", "linreg", "mlp", "resnet18", "stream"]


@pytest.mark.parametrize(
    "name, input_shape", [("lenet", (1, 1, 28, 28)), ("mlp", (1, 1, 28, 28)), ("digits", (1, 1, 8, 8))]
)
def test_classifiers_build_and_map_images_to_ten_logits(name, input_shape):
    recipe = load_recipe(name)
    model = recipe.build_model(config_for(recipe))
    assert model(torch.rand(input_shape)).shape == (1, 10)


def test_lenet_param_groups_give_the_classifier_its_own_learning_rate():
    recipe = load_recipe("lenet")
    cfg = config_for(recipe, ["model.classifier_lr_mult=0.1"])
    model = recipe.build_model(cfg)
    optimizer = build_optimizer(model, recipe.param_groups(model, cfg), cfg)
    assert [group["lr"] for group in optimizer.param_groups] == [0.9, pytest.approx(0.09)]
    assert sum(len(group["params"]) for group in optimizer.param_groups) == len(list(model.parameters()))


def test_lenet_is_d2l_lenet_with_sigmoid_and_xavier_init():
    recipe = load_recipe("lenet")
    model = recipe.build_model(config_for(recipe))
    assert sum(isinstance(m, torch.nn.Sigmoid) for m in model.modules()) == 4
    assert sum(p.numel() for p in model.parameters()) == 61_706  # d2l's LeNet-5
    # Xavier-uniform on Linear(400, 120) reaches sqrt(6 / 520) = 0.107; PyTorch's default stops at 1/20 = 0.05.
    assert model.classifier[1].weight.abs().max() > 0.08


def test_linreg_data_follows_the_true_parameters():
    recipe = load_recipe("linreg")
    train, _ = recipe.build_datasets(config_for(recipe))
    x, y = train.tensors
    fit = torch.linalg.lstsq(torch.cat([x, torch.ones(len(x), 1)], dim=1), y).solution.flatten()
    torch.testing.assert_close(fit, torch.tensor([2.0, -3.4, 4.2]), atol=2e-3, rtol=0)


def test_resnet18_loads_a_pretrained_state_dict_keeping_a_new_head(tmp_path, caplog):
    recipe = load_recipe("resnet18")
    build = lambda *overrides: recipe.build_model(  # noqa: E731
        build_config(recipe.defaults, {}, parse_overrides(overrides), "resnet18"))
    source = build("model.num_classes=2")
    torch.save(source.state_dict(), tmp_path / "pretrained.pt")
    same = build("model.num_classes=2", f"model.pretrained={tmp_path / 'pretrained.pt'}")
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), same.state_dict().values()))
    with caplog.at_level("WARNING"):
        finetune = build("model.num_classes=5", f"model.pretrained={tmp_path / 'pretrained.pt'}")
    assert torch.equal(finetune.layer4[1].conv2.weight, source.layer4[1].conv2.weight)
    assert finetune.fc.out_features == 5 and "2 tensors kept as built" in caplog.text and "fc.weight" in caplog.text


def recipe_with(**hooks) -> Recipe:
    module = types.ModuleType("hooked")
    module.__dict__.update(hooks)
    return Recipe(name="hooked", module=module)


@pytest.mark.parametrize("hooks, said", [
    ({"loss": lambda outputs, targets: None}, "loss(outputs, targets) returned None"),
    ({"step": lambda model, batch: None}, "step(model, batch) returned None"),
    ({"step": lambda model, batch: 0.5}, "step(model, batch) returned a float"),
    ({"step": lambda model, batch: model(batch[0])},
     "step(model, batch) returned a tensor of dtype float32 and shape (4, 3)"),
    ({"step": lambda model, batch: (batch[1].sum(), None)},
     "step(model, batch) returned a tensor of dtype int64 and shape ()"),
    ({"step": lambda model, batch: (model(batch[0]).mean(),)}, "step(model, batch) returned a tuple of 1"),
])
def test_a_step_or_loss_that_returns_no_scalar_loss_is_named_with_what_it_returned(hooks, said):
    batch = (torch.rand(4, 2), torch.tensor([0, 1, 2, 0]))
    with pytest.raises(UserError, match=re.escape(f"recipe hooked: {said}")):
        recipe_with(**hooks).step(torch.nn.Linear(2, 3), batch)


def test_a_step_may_return_the_loss_or_the_loss_and_outputs():
    model, batch = torch.nn.Linear(2, 3), (torch.rand(4, 2), torch.tensor([0, 1, 2, 0]))
    loss, outputs = recipe_with().step(model, batch)  # cross-entropy of model(inputs)
    assert loss.dim() == 0 and outputs.shape == (4, 3)
    assert recipe_with(step=lambda model, batch: loss).step(model, batch) == (loss, None)
    assert recipe_with(step=lambda model, batch: (loss, outputs)).step(model, batch) == (loss, outputs)


def test_digits_reads_scikit_learns_shipped_file_as_load_digits_does_without_importing_it(monkeypatch):
    from sklearn.datasets import load_digits as scikit_learns

    from launcher.recipes import digits

    images, labels = digits.load_digits()
    shipped = scikit_learns()
    assert np.array_equal(images, shipped.images) and np.array_equal(labels, shipped.target)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)  # not installed
    with pytest.raises(UserError, match="recipe digits needs scikit-learn, which ships the data: pip install "):
        digits.load_digits()


def test_importing_the_digits_recipe_and_reading_its_data_imports_no_scikit_learn():
    code = ("import sys; from launcher.recipes import digits; digits.load_digits(); "
            "print(sorted(name for name in sys.modules if name.startswith(('sklearn', 'scipy', 'pandas'))))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"
