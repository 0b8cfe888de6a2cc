"""The wheel installs anywhere: built from the repository's files, installed (not editable) into a fresh virtual
environment, and run from a folder outside the repository, it trains a shipped recipe, renders a Slurm template,
and adds exactly one top-level package."""

import os
import subprocess
import sys
import venv
import zipfile

from helpers import REPO, check_ok


def run(command: list[str], cwd, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_the_wheel_installed_in_a_fresh_environment_trains_and_renders_templates_from_anywhere(tmp_path):
    source = tmp_path / "source"  # the tracked files only: what a fresh clone holds
    files = check_ok(run(["git", "ls-files", "-z"], REPO)).stdout.split("\0")
    for name in filter(None, files):
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_bytes((REPO / name).read_bytes())
    check_ok(run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--wheel-dir",
                  str(tmp_path / "dist"), str(source)], tmp_path))
    (wheel,) = (tmp_path / "dist").glob("launcher-*.whl")
    top_level = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert top_level == {"launcher", wheel.name.removesuffix("-py3-none-any.whl") + ".dist-info"}

    # A fresh environment whose dependencies (torch, ...) come from this one's site-packages, through a .pth file:
    # only launcher itself is installed there, from the wheel.
    fresh = tmp_path / "fresh"
    venv.create(fresh, with_pip=True)
    python = str(fresh / "bin" / "python")
    site = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path).stdout.strip()
    ours = [path for path in sys.path if path.endswith("site-packages")]
    (tmp_path / site / "dependencies.pth").write_text("\n".join(ours) + "\n")
    check_ok(run([python, "-m", "pip", "install", "--no-deps", "--no-index", str(wheel)], tmp_path))

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "HOME": str(tmp_path), "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    env.pop("WANDB_API_KEY", None)
    where = check_ok(run([python, "-c", "import launcher; print(launcher.__file__)"], elsewhere, env)).stdout
    assert where.startswith(str(fresh)), where
    assert "No module named 'recipes'" in run([python, "-c", "import recipes"], elsewhere, env).stderr

    trained = check_ok(run([python, "-m", "launcher", "recipe=digits", "train.epochs=1"], elsewhere, env))
    assert "done: 22 steps" in trained.stdout and (elsewhere / "runs" / "digits").is_dir()
    dry = check_ok(run([python, "-m", "launcher.slurm", "single", "recipe=digits", "--dry-run"], elsewhere, env))
    (script,) = (elsewhere / "logs").glob("*.sbatch")
    assert dry.stdout.startswith(f"# sbatch logs/{script.name} recipe=digits")
    templates = next(line.split("=", 1)[1] for line in script.read_text().splitlines()
                     if line.startswith("export LAUNCHER_TEMPLATES="))
    assert templates.startswith(str(fresh)) and os.path.isfile(os.path.join(templates, "common.sh"))
