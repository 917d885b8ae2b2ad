"""The ``vlfuse`` command: shipped configs by name, the subcommands, and the wheel installed on its own."""

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from vlfuse.cli import main
from vlfuse.config import SHIPPED_CONFIGS, find_config, shipped_configs
from vlfuse.schema import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_every_recipe_config_ships_in_the_package_and_recipes_configs_is_the_same_folder():
    shipped = shipped_configs()
    assert "grounding/refcoco_frozen" in shipped and "accelerate/cpu_2proc" in shipped
    assert (ROOT / "recipes" / "configs").resolve() == SHIPPED_CONFIGS  # one copy of each config
    on_disk = {
        p.relative_to(SHIPPED_CONFIGS).with_suffix("").as_posix() for p in SHIPPED_CONFIGS.rglob("*.yaml")
    }
    assert set(shipped) == on_disk


def test_a_config_is_found_by_path_or_by_shipped_name_and_a_typo_is_named(tmp_path, monkeypatch):
    own = tmp_path / "grounding" / "refcoco_frozen.yaml"  # a user's file of the same name wins
    own.parent.mkdir()
    own.write_text("model: {task: grounding}\n")
    monkeypatch.chdir(tmp_path)
    assert find_config("grounding/refcoco_frozen.yaml") == Path("grounding/refcoco_frozen.yaml")
    assert find_config("grounding/refcoco_frozen") == SHIPPED_CONFIGS / "grounding" / "refcoco_frozen.yaml"
    assert find_config("recipes/configs/vqa/shapes.yaml") == SHIPPED_CONFIGS / "vqa" / "shapes.yaml"
    with pytest.raises(
        ConfigError, match="no config file 'grounding/refcoco_frozn'.*did you mean grounding/refcoco_frozen"
    ):
        find_config("grounding/refcoco_frozn")


def test_the_command_lists_configs_prints_a_shipped_config_and_names_a_bad_command(capsys):
    main(["configs"])
    out = capsys.readouterr().out
    assert "  grounding/refcoco_frozen " in out and "  accelerate/fsdp " in out
    with pytest.raises(SystemExit) as stop:
        main(["train", "vqa", "--config", "vqa/vqav2_small", "train.max_steps=7", "--print-config"])
    assert stop.value.code == 0
    printed = capsys.readouterr().out
    assert "dataset: merve/vqav2-small" in printed and "max_steps: 7" in printed
    with pytest.raises(SystemExit, match="unknown command 'trian'"):
        main(["trian", "grounding"])
    with pytest.raises(SystemExit, match="error: .*trains model.task=grounding, but the config"):
        main(["train", "grounding", "--config", "vqa/shapes"])
    with pytest.raises(SystemExit) as stop:
        main(["study", "--help"])
    assert stop.value.code == 0 and "usage: vlfuse study [--config FILE]" in capsys.readouterr().out


def _tree_copy(target: Path) -> Path:
    """The working tree's files as a clean checkout has them (tracked and new, not ignored)."""
    files = (
        subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True, check=True
        )
        .stdout.decode()
        .split("\0")
    )
    for name in filter(None, files):
        source, dest = ROOT / name, target / name
        if not source.exists() and not source.is_symlink():
            continue  # deleted, not yet committed
        dest.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():
            dest.symlink_to(os.readlink(source))
        else:
            shutil.copy2(source, dest)
    return target


@pytest.mark.slow
def test_the_wheel_installed_alone_trains_predicts_and_lists_from_an_empty_folder(tmp_path):
    """A wheel built from a clean copy of the tree, installed into a fresh venv whose only other packages
    are this venv's dependencies (a .pth line: not a site folder, so the editable vlfuse there is not
    seen), run from an empty folder: the commands, the shipped configs and the embedded data all come
    from the wheel."""
    tree = _tree_copy(tmp_path / "tree")
    dist = tmp_path / "dist"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(tree),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(dist),
        ],
        check=True,
    )
    (wheel,) = dist.glob("vlfuse-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python, vlfuse = venv / "bin" / "python", venv / "bin" / "vlfuse"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([python, "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)], check=True)
    work = tmp_path / "empty"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")} | {
        "HF_HUB_OFFLINE": "1",
        "VLFUSE_CACHE": str(tmp_path / "cache"),
        "PATH": f"{venv / 'bin'}:/usr/bin:/bin",
    }

    def run(*args: str) -> str:
        done = subprocess.run(args, cwd=work, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    where = run(str(python), "-c", "import vlfuse; print(vlfuse.__file__)")
    assert where.startswith(site), where  # the wheel's copy, not the source tree
    assert "commands:" in run(str(vlfuse), "--help")
    assert "grounding/refcoco_frozen" in run(str(vlfuse), "configs")
    assert "study.budget" in run(str(vlfuse), "study", "--help")
    out = run(
        str(vlfuse),
        "train",
        "grounding",
        "train.max_steps=2",
        "train.output_dir=out",
        "train.eval_every=null",
    )
    assert "acc@0.5" in out and (work / "out" / "final" / "model.safetensors").is_file()
    from PIL import Image

    Image.new("RGB", (64, 48), (200, 40, 40)).save(work / "red.png")
    shown = run(str(vlfuse), "predict", "out/final", "--image", "red.png", "--text", "the red square")
    assert "'the red square'" in shown and "box xyxy = [" in shown and (work / "prediction.png").is_file()
    # under Accelerate: the module form
    out = run(
        str(python), "-m", "accelerate.commands.launch", "--num_processes", "1", "--cpu", "-m", "vlfuse",
        "train", "retrieval", "train.max_steps=2", "train.output_dir=out2", "train.eval_every=null",
    )  # fmt: skip
    assert "text->image R@1" in out and (work / "out2" / "final" / "model.safetensors").is_file()
