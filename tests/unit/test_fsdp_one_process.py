"""dist.strategy=fsdp in this process (a process group of one, as `python -m launcher` makes it): which blocks are
sharded, what the config refuses, folder checkpoints (kept, pruned, verified, skipped when broken), and a longer
max_steps continuing a run part-way through an epoch. The 2-process versions are in tests/e2e/test_fsdp.py."""


import pytest
import torch
from helpers import build_trainer as build
from helpers import load_weights
from torch import nn

from launcher.checkpoint.formats import newest_good
from launcher.cli.main import load_validated
from launcher.distributed.env import DistEnv
from launcher.distributed.group import destroy_process_group, init_process_group
from launcher.distributed.strategy import repeated_blocks
from launcher.errors import LauncherError, UserError
from launcher.recipes import gpt, mlp

ONE_PROCESS, CPU = DistEnv.from_environ({}), torch.device("cpu")
FSDP = "dist.strategy=fsdp"
pytestmark = pytest.mark.usefixtures("trainer_dir")


@pytest.fixture
def group_of_one():
    init_process_group(ONE_PROCESS, "gloo", CPU, 60, even_alone=True)
    yield
    destroy_process_group()


def test_the_default_blocks_are_the_largest_list_of_alike_modules():
    class Tower(nn.Module):
        def __init__(self):
            super().__init__()
            self.small = nn.ModuleList([nn.Linear(2, 2)])
            self.layers = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)])

    tower = Tower()
    assert repeated_blocks(tower) == list(tower.layers)
    model = gpt.build_model(load_validated(["recipe=gpt"], ONE_PROCESS)[2])
    assert repeated_blocks(model) == list(model.blocks) == gpt.blocks(model)  # a Sequential of Blocks
    assert repeated_blocks(mlp.build_model(load_validated(["recipe=mlp"], ONE_PROCESS)[2])) == []  # unlike layers


def test_fp16_and_an_unknown_strategy_are_refused_before_anything_starts():
    with pytest.raises(UserError, match="train.amp=fp16 does not work with dist.strategy=fsdp: use train.amp=bf16"):
        load_validated(["recipe=gpt", FSDP, "train.amp=fp16"], ONE_PROCESS)
    with pytest.raises(UserError, match="dist.strategy='zero' is not one of: ddp, fsdp"):
        load_validated(["recipe=gpt", "dist.strategy=zero"], ONE_PROCESS)


def test_folder_checkpoints_are_kept_pruned_verified_and_a_broken_one_skipped(group_of_one, tmp_path, caplog):
    build("recipe=digits", "run.dir=run", "train.epochs=2", "ckpt.every_steps=10", "ckpt.best_metric=eval/accuracy",
          FSDP, recipe="digits").run()
    folder = tmp_path / "run" / "checkpoints"
    assert sorted(path.name for path in folder.iterdir()) == ["best", "step_000000030", "step_000000040",
                                                              "step_000000044"]
    assert (folder / "step_000000044" / "launcher.pt").is_file() and (folder / "best" / "launcher.pt").is_file()

    shard = folder / "step_000000044" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit
    shard.write_bytes(bytes(data))
    (folder / "step_000000040" / "launcher.pt").unlink()  # as a writer killed before it finished leaves it
    path, saved = newest_good(folder, None)
    assert path.name == "step_000000030" and saved["global_step"] == 30
    assert "step_000000044 is unreadable (its file __0_0.distcp does not match its checksum)" in caplog.text
    assert "step_000000040 is unreadable (it has no launcher.pt: its writer did not finish)" in caplog.text


def test_a_run_keeps_its_strategy(group_of_one):
    build("recipe=digits", "run.dir=run", "train.epochs=1", FSDP, recipe="digits").run()
    with pytest.raises(LauncherError, match="cannot continue with these keys changed since its checkpoint: "
                                            "dist.strategy fsdp -> ddp") as refused:
        build("recipe=digits", "run.dir=run", "train.epochs=2", recipe="digits")
    assert refused.value.exit_code == 2


def test_momentum_turned_on_at_a_resume_is_applied_under_fsdp_as_under_ddp(group_of_one):
    """The folder lacks the momentum buffers the resumed optimizer has: they start at zero, as a file's start empty."""
    for strategy in ("ddp", "fsdp"):
        common = ["recipe=digits", f"run.dir={strategy}", f"dist.strategy={strategy}"]
        build(*common, "train.epochs=1", "optim.momentum=0", recipe="digits").run()
        build(*common, "train.epochs=2", "optim.momentum=0.9", recipe="digits").run()
    ddp, fsdp = load_weights("ddp"), load_weights("fsdp")
    assert max((ddp[key] - fsdp[key]).abs().max().item() for key in ddp) < 1e-6


def test_a_longer_max_steps_continues_the_epoch_where_the_shorter_one_stopped():
    build("run.dir=reference", "train.max_steps=30").run()
    build("run.dir=run", "train.max_steps=5").run()
    resumed = build("run.dir=run", "train.max_steps=30")
    assert (resumed.position.epoch, resumed.position.step_in_epoch) == (1, 5)
    resumed.run()
    reference, final = load_weights("reference"), load_weights("run")
    assert all(torch.equal(reference[key], final[key]) for key in reference)


CONVOLUTIONS = """
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

DEFAULTS = {"train": {"epochs": 1, "batch_size": 8}, "optim": {"lr": 0.05}}

def build_model(cfg):
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))

def build_datasets(cfg):
    generator = torch.Generator().manual_seed(0)
    images, labels = torch.rand(40, 3, 8, 8, generator=generator), torch.randint(0, 4, (40,), generator=generator)
    return TensorDataset(images[:32], labels[:32]), TensorDataset(images[32:], labels[32:])

def loss(outputs, targets):
    return F.cross_entropy(outputs, targets)
"""


def test_a_model_with_batchnorm_trains_in_bf16_and_channels_last(group_of_one, tmp_path):
    """fully_shard takes contiguous weights only, and bf16 weights beside BatchNorm's fp32 statistics fail: the weights
    stay contiguous and fp32, the batches channels_last, the step under autocast."""
    (tmp_path / "convolutions.py").write_text(CONVOLUTIONS)
    trainer = build("recipe=convolutions.py", "run.dir=run", FSDP, "train.amp=bf16", "train.channels_last=true",
                    recipe="convolutions.py")
    weights = [parameter.to_local() for parameter in trainer.model.parameters()]
    assert all(weight.dtype == torch.float32 and weight.is_contiguous() for weight in weights)
    before = [weight.clone() for weight in weights]
    trainer.run()
    assert all(not torch.equal(old, new.to_local()) for old, new in zip(before, trainer.model.parameters()))
    assert trainer.precision.dtype == torch.bfloat16  # autocast


def test_background_sharded_saves_take_a_new_stager_where_torchs_closes_itself_after_one(group_of_one, monkeypatch,
                                                                                            tmp_path):
    """torch 2.10 and 2.11 close DCP's stager after each copy (pytorch#170431): one kept for the run fails its second
    save with KeyError. Emulated here on a torch that does not."""
    from torch.distributed.checkpoint.staging import DefaultStager

    staged = DefaultStager._stage

    def closing_after_one(self, state_dict, **kwargs):
        copied = staged(self, state_dict, **kwargs)
        self._state_dict_stager.close()
        return copied

    monkeypatch.setattr(DefaultStager, "_stage", closing_after_one)
    build("recipe=digits", "run.dir=run", "train.epochs=1", "ckpt.every_steps=5", "ckpt.async=true", FSDP,
          recipe="digits").run()
    written = sorted(path.name for path in (tmp_path / "run" / "checkpoints").iterdir())
    assert written == ["step_000000015", "step_000000020", "step_000000022"]
