"""README is the manual: its install and test commands are what CI runs, and its recipe examples work."""

import math
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from helpers import REPO, check_ok, epoch_records, launch

README = (REPO / "README.md").read_text()


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_ci_installs_and_tests_exactly_as_readme_says():
    install_and_test = next(block for block in code_blocks("bash") if "pip install" in block)
    ci_script = (REPO / ".ci" / "run").read_text().splitlines()
    for command in install_and_test.strip().splitlines():
        assert command in ci_script, f"README's `{command}` is not what .ci/run runs"


def test_the_readme_recipe_example_trains(tmp_path):
    example = next(block for block in code_blocks("python") if block.startswith("# my_recipe.py"))
    (tmp_path / "my_recipe.py").write_text(example)
    result = check_ok(launch(["recipe=my_recipe.py", "model.hidden=128", "--cfg"], tmp_path))
    printed = yaml.safe_load(result.stdout.split("\n", 1)[1])
    assert printed["model"] == {"hidden": 128, "head_lr_mult": 0.5} and printed["optim"]["name"] == "adamw"
    check_ok(launch(["recipe=my_recipe.py", "run.dir=out"], tmp_path, nproc=2))
    assert epoch_records(tmp_path / "out")[-1]["eval/accuracy"] > 0.6


def test_the_readme_hooks_example_trains_on_dict_batches_of_padded_sequences(tmp_path):
    example = next(block for block in code_blocks("python") if block.startswith("# sequences.py"))
    (tmp_path / "sequences.py").write_text(example)
    check_ok(launch(["recipe=sequences.py", "run.dir=out", "wandb.mode=disabled", "eval.sharded=true"], tmp_path,
                    nproc=2))
    last = epoch_records(tmp_path / "out")[-1]
    assert last["eval/accuracy"] > 0.8 and last["eval/perplexity"] == pytest.approx(math.exp(last["eval/loss"]))


def test_the_readme_datasets_example_trains_on_parquet_files_through_hugging_face_datasets(tmp_path):
    example = next(block for block in code_blocks("python") if block.startswith("# rows.py"))
    (tmp_path / "rows.py").write_text(example)
    generator = torch.Generator().manual_seed(0)
    for name, count in (("train0", 256), ("train1", 256), ("eval", 128)):
        labels = torch.randint(0, 3, (count,), generator=generator)
        features = torch.randn(count, 8, generator=generator) + 3 * torch.nn.functional.one_hot(labels, 8)
        table = pa.table({"features": features.tolist(), "label": labels.tolist()})
        pq.write_table(table, tmp_path / f"{name}.parquet")
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    check_ok(launch(["recipe=rows.py", "run.dir=out", "wandb.mode=disabled"], tmp_path, nproc=2,
                    env=env))
    assert epoch_records(tmp_path / "out")[-1]["eval/accuracy"] > 0.9


def test_the_cpu_only_install_takes_the_pinned_pair_from_pytorchs_cpu_index_then_installs_as_ci_does():
    (cpu_only,) = [block for block in code_blocks("bash") if "download.pytorch.org/whl/cpu" in block]
    torch_line, project_line = cpu_only.strip().splitlines()[-2:]
    assert torch_line == ("pip install torch torchvision -c .ci/constraints.txt "
                          "--index-url https://download.pytorch.org/whl/cpu")
    ci_install = next(line for line in (REPO / ".ci" / "run").read_text().splitlines() if "pip install" in line)
    assert ci_install.endswith(f"&& {project_line}")  # the same pins, which the +cpu builds satisfy


def test_the_recipe_table_is_one_table_with_a_row_for_every_shipped_recipe():
    from launcher.recipe import available_recipes

    section = README.split("## Recipes shipped\n\n", 1)[1]
    table = section.split("\n\n", 1)[0].splitlines()
    assert all(line.startswith("| ") for line in table)
    assert sorted(line.split("`")[1] for line in table[2:]) == available_recipes()
