"""The predict command (recipes/predict.py, python -m vlfuse.predict): answers printed, pictures drawn,
bad input stopped with one line."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
from accelerate.state import AcceleratorState
from conftest import tiny_config, tiny_model_config
from PIL import Image
from test_recipes import SMALL_DATA

from vlfuse.model import VLFuseModel
from vlfuse.predict import COLOURS, main
from vlfuse.training import train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def grounding_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("grounding")
    AcceleratorState._reset_state(True)
    train(tiny_config(*SMALL_DATA, "train.max_steps=2", f"train.output_dir={out}"))
    AcceleratorState._reset_state(True)
    return out / "final"


def test_grounding_prints_the_box_and_draws_it_where_predict_puts_it(
    grounding_model, photo, tmp_path, capsys
):
    output = tmp_path / "out" / "prediction.png"
    main([str(grounding_model), "--image", str(photo), "--text", "the red box", "--output", str(output)])
    printed = capsys.readouterr().out
    box = VLFuseModel.from_pretrained(grounding_model).predict([Image.open(photo)], ["the red box"])[0]
    x0, y0, x1, y1 = box.tolist()
    assert f"'the red box'  box xyxy = [{x0:.1f}, {y0:.1f}, {x1:.1f}, {y1:.1f}]" in printed
    assert f"picture: {output}" in printed
    picture = Image.open(output).convert("RGB")
    assert picture.width >= 96 and picture.height > 72  # the image, and the expression written below it
    left, top, right, bottom = (round(v) for v in (x0, y0, x1, y1))
    right, bottom = max(left, right), max(top, bottom)
    # the box's outline lies on the box's own pixels (left and right edges, half-way down)
    assert picture.getpixel((left, (top + bottom) // 2)) == COLOURS[0]
    assert picture.getpixel((right, (top + bottom) // 2)) == COLOURS[0]
    # and the image around it is untouched
    original = Image.open(photo).convert("RGB")
    for x, y in [(0, 0), (95, 71), (60, 5)]:
        if not (left - 1 <= x <= right + 1 and top - 1 <= y <= bottom + 1):
            assert picture.getpixel((x, y)) == original.getpixel((x, y))


def test_the_recipe_runs_the_same_command(grounding_model, photo, tmp_path):
    output = tmp_path / "p.png"
    result = subprocess.run(
        [sys.executable, str(ROOT / "recipes" / "predict.py"), str(grounding_model), "--image", str(photo)]
        + ["--text", "the red box", "a box", "--output", str(output)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("box xyxy = [") == 2 and output.is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--image", "{missing}", "--text", "a"], "error: no image file at {missing}"),
        (["--image", "{not_image}", "--text", "a"], "is not an image PIL can read"),
        (["--image", "{photo}", "--text", "  "], "error: --text number 1 is empty"),
        (
            ["--image", "{photo}", "--text", "a", "--task", "retrieval"],
            "is a 'grounding' model, not a 'retrieval'",
        ),
        (["--image", "{photo}", "{photo}", "--text", "a", "b", "c"], "2 images and 3 texts"),
    ],
    ids=["missing", "not-an-image", "empty-text", "other-task", "pairing"],
)
def test_bad_input_gets_one_line(grounding_model, photo, tmp_path, args, message):
    not_image = tmp_path / "notes.png"
    not_image.write_text("not a picture")
    names = {"missing": tmp_path / "missing.jpg", "not_image": not_image, "photo": photo}
    with pytest.raises(SystemExit) as stopped:
        main([str(grounding_model), *(a.format(**names) for a in args)])
    error = str(stopped.value.code)  # what sys.exit prints to stderr, with exit status 1
    assert "\n" not in error and error.startswith("error: ")
    assert message.format(**names) in error


@pytest.mark.parametrize(
    "overrides, expect",
    [
        (["model.task=classification", "model.answers=[red,blue,green]"], "-> "),
        (["model.task=matching"], "match probability"),
        (["model.task=retrieval", "model.fusion.name=projection"], "#1"),
    ],
    ids=["classification", "matching", "retrieval"],
)
def test_every_task_prints_its_answer_and_writes_a_picture(tmp_path, photo, capsys, overrides, expect):
    folder = VLFuseModel(tiny_model_config(*overrides)).save_pretrained(tmp_path / "model")
    images_dir = tmp_path / "images"
    images_dir.mkdir()
    for i, colour in enumerate([(200, 0, 0), (0, 200, 0), (0, 0, 200)]):
        Image.new("RGB", (40 + 10 * i, 50), colour).save(images_dir / f"{i}.png")
    retrieval = "retrieval" in overrides[0]
    inputs = ["--images-dir", str(images_dir)] if retrieval else ["--image", str(photo)]
    output = tmp_path / "picture.png"
    main(
        [
            str(folder),
            *inputs,
            "--text",
            "what colour is it?",
            "a red box",
            "--top-k",
            "2",
            "--output",
            str(output),
        ]
    )
    printed = capsys.readouterr().out
    assert expect in printed
    pictures = sorted(tmp_path.glob("picture*.png"))
    assert pictures and all(Image.open(p).size[0] > 0 for p in pictures)
    if retrieval:  # the top 2 of 3 images for each of 2 queries
        assert printed.count("#1 ") == 2 and printed.count("#2 ") == 2 and "#3 " not in printed
    if "classification" in overrides[0]:
        probabilities = [float(p) for p in re.findall(r"\((\d\.\d+)\)", printed.splitlines()[0])]
        # the top 2 answers of the first question, best first, probabilities of one distribution
        assert len(probabilities) == 2 and probabilities[0] >= probabilities[1] > 0
        assert sum(probabilities) <= 1.0 + 1e-6
