"""The config flow: engine defaults -> recipe defaults -> YAML -> overrides, typed, validated, read-only."""

import pytest
from helpers import REPO
from omegaconf import OmegaConf
from omegaconf.errors import ReadonlyConfigError

from launcher.cli.main import load
from launcher.config.build import build_config, freeze, load_yaml, parse_overrides, validate, with_run_dir
from launcher.config.keys import APPLIED, DEFINES, FREE, KEYS
from launcher.config.reference import TABLE_END, TABLE_START, with_table
from launcher.errors import UserError
from launcher.run.directory import derived_name

RECIPE_DEFAULTS = {"train": {"epochs": 3}, "optim": {"lr": 1}, "model": {"hidden": 64, "widths": [2.0, -3.4]}}


def build(overrides=(), yaml_values=None):
    return build_config(RECIPE_DEFAULTS, yaml_values or {}, parse_overrides(overrides), "recipe test DEFAULTS")


def test_layers_apply_in_order(tmp_path):
    file = tmp_path / "run.yaml"
    file.write_text("train:\n  epochs: 7\n  batch_size: 32\n")
    cfg = build(["train.batch_size=16"], load_yaml(str(file)))
    assert cfg.train.epochs == 7  # YAML over the recipe's 3
    assert cfg.train.batch_size == 16  # the command line over YAML
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)  # engine key keeps its type
    assert cfg.model.hidden == 64 and cfg.optim.momentum == 0.0


def test_unknown_key_suggests_the_nearest():
    with pytest.raises(UserError, match=r"unknown key 'train\.epoch': did you mean train\.epochs"):
        build(["train.epoch=3"])
    with pytest.raises(UserError, match=r"unknown key 'model\.hiden': did you mean model\.hidden"):
        build(["model.hiden=3"])


def test_unknown_key_in_yaml_is_named(tmp_path):
    file = tmp_path / "run.yaml"
    file.write_text("optim:\n  lrate: 0.1\n")
    with pytest.raises(UserError, match=r"config file: unknown key 'optim\.lrate'"):
        build(yaml_values=load_yaml(str(file)))


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.epochs=abc", r"train\.epochs='abc' is not an integer"),
        ("optim.lr=fast", r"optim\.lr='fast' is not a number"),
        ("data.download=maybe", r"data\.download='maybe' is not true or false"),
        ("model.hidden=1.5", r"model\.hidden=1\.5 is not an integer"),  # recipe keys are typed by their defaults
        ("model.widths=[a]", r"model\.widths=\['a'\] is not a list of numbers"),
        ("model.widths=3", r"model\.widths=3 is not a list of numbers"),
        ("model=3", r"'model' is a section, not a key"),
        ("train.epochs", r"expected key=value"),
    ],
)
def test_wrong_values_name_key_and_value(override, message):
    with pytest.raises(UserError, match=message):
        build([override])


def test_validation_against_the_world():
    with pytest.raises(UserError, match=r"train\.batch_size=10 .* split evenly over 4 processes.*e\.g\. 8 or 12"):
        validate(build(["train.batch_size=10"]), world_size=4, procs_per_node=4)
    with pytest.raises(UserError, match=r"optim\.name='adamx' is not one of: sgd, adam, adamw"):
        validate(build(["optim.name=adamx"]), 1, 1)
    with pytest.raises(UserError, match=r"dist\.backend=nccl needs CUDA GPUs"):
        validate(build(["dist.backend=nccl"]), 2, 2)
    with pytest.raises(UserError, match=r"dist\.bucket_cap_mb=0\.5 must be at least 1 \(DDP's first bucket\) "
                       r"with train\.compile=true"):
        validate(build(["train.compile=true", "dist.bucket_cap_mb=0.5"]), 2, 2)
    validate(build(["train.batch_size=12"]), world_size=4, procs_per_node=4)
    validate(build(["train.compile=true", "dist.bucket_cap_mb=0.5"]), 1, 1)  # one process: no DDP, no buckets


def test_frozen_config_is_read_only():
    cfg = freeze(build())
    with pytest.raises(ReadonlyConfigError):
        cfg.train.epochs = 5
    resolved = with_run_dir(cfg, "runs/x/1")
    assert resolved.run.dir == "runs/x/1" and cfg.run.dir == ""
    assert OmegaConf.is_readonly(resolved)


def test_every_declared_default_is_a_valid_value_of_its_key():
    for name, key in KEYS.items():
        assert not key.choices or key.default in key.choices, name
        assert not key.valid or key.valid[0](key.default), name
        assert key.resume in (FREE, APPLIED, DEFINES), name
    validate(build_config({}, {}, [], "no recipe"), 1, 1)


def test_the_documented_key_table_is_made_from_the_declarations():
    document = (REPO / "docs" / "configuration.md").read_text()
    assert TABLE_START in document and TABLE_END in document
    assert with_table(document) == document, (
        "docs/configuration.md's key table differs from launcher/config/keys.py: run "
        "python -m launcher.config.reference docs/configuration.md")


# Names of runs started by earlier versions (the launcher of ce770e8): they must keep naming the same directories.
EARLIER_RUN_NAMES = {
    "recipe=digits": "fcc59dd1d9", "recipe=digits train.seed=3 optim.lr=0.01": "e15cc02982",
    "recipe=gpt": "7056a659f8", "recipe=gpt dist.strategy=fsdp": "277538090a",
    "recipe=lenet sched.name=cosine train.epochs=40": "89bfec7d50", "recipe=resnet18 train.amp=bf16": "0caae13f29",
    "recipe=mlp wandb.mode=offline ckpt.keep=9": "fd33c410ec", "recipe=features": "cc70affd06",
    "recipe=linreg train.grad_accum=2": "88c9c090ae",
}


@pytest.mark.parametrize("command", sorted(EARLIER_RUN_NAMES))
def test_a_run_started_by_an_earlier_version_keeps_its_derived_name(command):
    _, recipe, cfg = load(command.split())
    assert derived_name(cfg, recipe) == EARLIER_RUN_NAMES[command]
