"""The library's shape: layered imports (import-linter), no imports hidden in function bodies, a model and
loop that only reach tasks through the registry, and a task that plugs in from outside the library."""

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from PIL import Image

from vlfuse.config import load_cli_config, load_config
from vlfuse.model import VLFuseModel
from vlfuse.schema import ConfigError
from vlfuse.tasks import TASKS, get_task, task_name
from vlfuse.tasks.base import ClassifierHead, Task, pair_inputs

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = sorted((ROOT / "vlfuse").rglob("*.py"))
# Modules that may name tasks: the tasks themselves.
TASK_MODULES = {p for p in LIBRARY if p.parent.name == "tasks"}


def test_import_layers_contract_is_kept():
    lint = Path(sys.executable).parent / "lint-imports"
    assert lint.is_file() or shutil.which("lint-imports"), "import-linter is in the dev extra"
    result = subprocess.run(
        [str(lint) if lint.is_file() else "lint-imports"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout[-3000:]
    assert "1 kept, 0 broken" in result.stdout


def _functions(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_vlfuse_import_inside_a_function(path):
    hidden = [
        f"{fn.name}: {ast.unparse(node)}"
        for fn in _functions(path)
        for node in ast.walk(fn)
        if isinstance(node, ast.ImportFrom | ast.Import)
        and any(name.startswith("vlfuse") for name in _imported(node))
    ]
    assert hidden == []


def _imported(node: ast.Import | ast.ImportFrom) -> list[str]:
    if isinstance(node, ast.ImportFrom):
        return [node.module or ""]
    return [alias.name for alias in node.names]


def test_functions_stay_short():
    long = [
        f"{path.relative_to(ROOT)}:{fn.name} ({fn.end_lineno - fn.lineno + 1} lines)"
        for path in LIBRARY
        for fn in _functions(path)
        if fn.end_lineno - fn.lineno + 1 > 60  # docstring included
    ]
    assert long == []


SHARED_MODULES = [
    "model.py",
    "config.py",
    "schema/__init__.py",
    "schema/fields.py",
    "schema/study.py",
    "schema/mixing.py",
    "compare.py",
    "hub.py",
    "distributed.py",
    "predict.py",
    *(f"training/{p.name}" for p in sorted((ROOT / "vlfuse" / "training").glob("*.py"))),
]


def test_modules_stay_small():
    large = [
        f"{path.relative_to(ROOT)} ({n} lines)"
        for path in LIBRARY
        if (n := len(path.read_text().splitlines())) > 400
    ]
    assert large == []


def test_the_model_class_holds_the_network_only():
    source = (ROOT / "vlfuse" / "model.py").read_text()
    (cls,) = [n for n in ast.parse(source).body if isinstance(n, ast.ClassDef) and n.name == "VLFuseModel"]
    assert cls.end_lineno - cls.lineno + 1 < 300
    imports = [
        m
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.ImportFrom | ast.Import)
        for m in _imported(node)
    ]
    assert not [
        m for m in imports if m.split(".")[0] in ("huggingface_hub", "safetensors", "json", "tempfile")
    ]


@pytest.mark.parametrize("module", SHARED_MODULES)
def test_shared_modules_name_no_task(module):
    source = (ROOT / "vlfuse" / module).read_text()
    tree = ast.parse(source)
    task_names = set(TASKS)
    compared = [
        ast.unparse(node)
        for node in ast.walk(tree)
        if isinstance(node, ast.Compare)
        and any(isinstance(c, ast.Constant) and c.value in task_names for c in [node.left, *node.comparators])
    ]
    assert compared == [], "a task == branch"
    imports = [
        m for node in ast.walk(tree) if isinstance(node, ast.ImportFrom | ast.Import) for m in _imported(node)
    ]
    assert [m for m in imports if m.startswith("vlfuse.tasks.")] == [], "only the registry, vlfuse.tasks"


# ------------------------------------------------------------------------------ a task from outside
class CountTask(Task):
    """A toy task defined outside the library: how many of the text's words are in it (as a class)."""

    name = "count_words"
    recipe = "my_recipe.py"
    primary_metric = "accuracy"
    report_metrics = ("accuracy",)
    fusions = ("concat",)

    def build_head(self, cfg, fusion):
        return ClassifierHead(fusion.dim, fusion.output_kind, 4)

    def predict(self, model, images, texts):
        outputs, _ = model.infer(*pair_inputs(images, texts))
        return outputs["logits"].argmax(dim=1).tolist()


def test_a_task_registered_from_outside_builds_saves_and_predicts(tmp_path, monkeypatch):
    monkeypatch.setitem(TASKS, CountTask.name, CountTask)
    with pytest.raises(ConfigError, match="count_words needs fusion.name=concat"):
        load_config(overrides=["model.task=count_words"])
    cfg = tiny_config("model.task=count_words", "model.fusion.name=concat")
    model = VLFuseModel(cfg.model)
    assert isinstance(model.task, CountTask) and model.head.mlp[-1].out_features == 4
    images = [Image.new("RGB", (40, 30), (200, 0, 0)), Image.new("RGB", (20, 50))]
    predicted = model.predict(images, ["one two", "three"])
    assert len(predicted) == 2 and all(0 <= p < 4 for p in predicted)
    model.save_pretrained(tmp_path / "saved")
    loaded = VLFuseModel.from_pretrained(tmp_path / "saved")
    assert isinstance(loaded.task, CountTask) and loaded.predict(images, ["one two", "three"]) == predicted
    with pytest.raises(ValueError, match="embeddings come from a retrieval model"):
        loaded.embed_images(images)


def test_unknown_task_names_the_known_ones():
    with pytest.raises(ConfigError, match="'model.task'; allowed: " + ", ".join(TASKS)):
        get_task("vqe")


def test_former_task_names_are_still_accepted(tmp_path):
    assert get_task("classification").name == "vqa" and get_task("matching").name == "itm"
    assert (
        load_config(overrides=["model.task=classification", "model.fusion.name=concat"]).model.task == "vqa"
    )
    # a model saved under a former name loads as its task's model
    cfg = tiny_config("model.task=matching", "model.fusion.name=concat")
    folder = VLFuseModel(cfg.model).save_pretrained(tmp_path / "itm")
    meta = json.loads((folder / "vlfuse_config.json").read_text())
    assert meta["model"]["task"] == "itm"
    meta["model"]["task"] = "matching"  # as a model saved before the rename says
    (folder / "vlfuse_config.json").write_text(json.dumps(meta))
    assert VLFuseModel.from_pretrained(folder).config.task == task_name("matching") == "itm"


def test_pairs_by_index_encode_each_input_once():
    cfg = tiny_config("model.fusion.name=concat", "model.task=classification", "model.answers=[yes,no]")
    model = VLFuseModel(cfg.model).eval()
    pixels = torch.randn(2, 3, 64, 64)
    tokens = model.text_encoder.tokenize(["a red circle", "two squares", "the left one"])
    with torch.no_grad():
        paired = model(pixel_values=pixels, **tokens, image_index=torch.tensor([0, 1, 1]))["logits"]
        explicit = model(pixel_values=pixels[[0, 1, 1]], **tokens)["logits"]
        swapped = model(
            pixel_values=pixels, **tokens, image_index=torch.tensor([1, 0]), text_index=torch.tensor([2, 0])
        )["logits"]
        by_hand = model(pixel_values=pixels[[1, 0]], **{k: v[[2, 0]] for k, v in tokens.items()})["logits"]
    torch.testing.assert_close(paired, explicit)
    torch.testing.assert_close(swapped, by_hand)


# ------------------------------------------------------------------------- recipes know their task
RECIPES = {
    "grounding": "grounding.py",
    "retrieval": "retrieval.py",
    "vqa": "vqa.py",
    "itm": "itm.py",
}
CONFIGS = {"grounding": "grounding", "retrieval": "retrieval", "vqa": "vqa", "itm": "itm"}


@pytest.mark.parametrize("recipe_task", list(RECIPES))
@pytest.mark.parametrize("config_task", list(RECIPES))
def test_a_recipe_refuses_another_tasks_config(recipe_task, config_task):
    own = ROOT / "recipes" / "configs" / CONFIGS[recipe_task] / "shapes.yaml"
    other = ROOT / "recipes" / "configs" / CONFIGS[config_task] / "shapes.yaml"
    argv = ["--config", str(other), "train.max_steps=1"]
    if recipe_task == config_task:
        assert load_cli_config(argv, own, task=recipe_task).model.task == recipe_task
        return
    with pytest.raises(ConfigError) as err:
        load_cli_config(argv, own, task=recipe_task)
    message = str(err.value)
    assert f"recipes/{RECIPES[recipe_task]} trains model.task={recipe_task}" in message
    assert f"has model.task={config_task}: run recipes/{RECIPES[config_task]}" in message


def test_the_vqa_recipe_given_a_grounding_config_stops_before_training(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "recipes" / "vqa.py"),
            "--config",
            str(ROOT / "recipes" / "configs" / "grounding" / "shapes.yaml"),
            f"train.output_dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "error: recipes/vqa.py trains model.task=vqa, but the config " in result.stderr
    assert "has model.task=grounding: run recipes/grounding.py for it" in result.stderr
    assert not (tmp_path / "config.yaml").exists()
