"""Single-image inference from the command line: a saved model (a folder or a Hub id), images and texts;
prints the answer and writes a picture of it.

    python -m vlfuse.predict runs/grounding/final --image photo.jpg --text "the dog on the left"
    python recipes/predict.py MODEL --image a.jpg --text "what colour is the shape?" --top-k 3
    python recipes/predict.py MODEL --images-dir photos/ --text "a red circle" --top-k 5

What each task shows (``SHOW``, by task name):

- grounding: one box per (image, expression), ``xyxy`` in the image's own pixels, drawn with the
  expression on the image;
- classification (VQA-style): the top answers with their probabilities per (image, question);
- matching: the probability that each text describes its image, texts ranked per image;
- retrieval: the top-k images of ``--images-dir`` (or of ``--image``) for each text query, as a strip.

One image serves all texts, or there is one image per text (the task's own pairing checks it). Bad
input (a missing file, a file that is no image, an empty text, a model of another task than ``--task``,
images and texts that do not pair) stops with a one-line error.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError

from vlfuse.model import VLFuseModel

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
# Box colours, one per expression (the first is the one a single expression gets).
COLOURS = [(255, 0, 255), (0, 255, 255), (255, 255, 0), (255, 128, 0), (0, 255, 0), (255, 0, 0)]
CAPTION_HEIGHT = 16  # pixels per line of text under a picture


class PredictError(ValueError):
    """Bad input to the predict command; the message names the file, text or option."""


@dataclass
class Inputs:
    images: list[Image.Image]
    image_names: list[str]
    texts: list[str]
    top_k: int = 5


@dataclass
class Shown:
    """What a prediction prints (one line each) and the pictures it draws."""

    lines: list[str] = field(default_factory=list)
    pictures: list[Image.Image] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------- input
def read_image(path: str | Path) -> Image.Image:
    """An RGB image from ``path``, or a ``PredictError`` naming the file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise PredictError(f"no image file at {path}")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise PredictError(f"{path} is not an image PIL can read ({err})") from None


def image_paths(images: Sequence[str], images_dir: str | None) -> list[Path]:
    paths = [Path(p) for p in images]
    if images_dir:
        folder = Path(images_dir).expanduser()
        if not folder.is_dir():
            raise PredictError(f"--images-dir: no folder at {folder}")
        paths += sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not paths:
            raise PredictError(f"--images-dir: {folder} holds no image ({', '.join(sorted(IMAGE_SUFFIXES))})")
    if not paths:
        raise PredictError("give at least one --image (or --images-dir)")
    return paths


def check_texts(texts: Sequence[str]) -> list[str]:
    if not texts:
        raise PredictError("give at least one --text")
    empty = [i for i, t in enumerate(texts) if not t.strip()]
    if empty:
        raise PredictError(f"--text number {empty[0] + 1} is empty")
    return list(texts)


# -------------------------------------------------------------------------------------------- drawing
def _font(size: int = 12) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def with_caption(image: Image.Image, lines: Sequence[str]) -> Image.Image:
    """``image`` with ``lines`` of text written below it (the image's own pixels are left untouched)."""
    width = max(image.width, 8 + 7 * max((len(line) for line in lines), default=0))
    canvas = Image.new("RGB", (width, image.height + CAPTION_HEIGHT * len(lines) + 4), (255, 255, 255))
    canvas.paste(image, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text((4, image.height + 2 + CAPTION_HEIGHT * i), line, fill=(0, 0, 0), font=_font())
    return canvas


def draw_boxes(image: Image.Image, boxes: torch.Tensor, labels: Sequence[str]) -> Image.Image:
    """The boxes (``xyxy`` pixels) drawn on a copy of ``image``, each in its colour, and each label
    written under the picture in its box's colour."""
    picture = image.copy()
    draw = ImageDraw.Draw(picture)
    for i, box in enumerate(boxes.tolist()):
        x0, y0, x1, y1 = (round(v) for v in box)
        draw.rectangle([x0, y0, max(x0, x1), max(y0, y1)], outline=COLOURS[i % len(COLOURS)], width=2)
    canvas = with_caption(picture, [f"[{i + 1}] {label}" for i, label in enumerate(labels)])
    draw = ImageDraw.Draw(canvas)
    for i in range(len(labels)):  # a colour swatch before each caption line
        y = image.height + 2 + CAPTION_HEIGHT * i
        draw.rectangle([0, y, 2, y + CAPTION_HEIGHT - 4], fill=COLOURS[i % len(COLOURS)])
    return canvas


def strip(images: Sequence[Image.Image], captions: Sequence[str], height: int = 128) -> Image.Image:
    """Images side by side at one height, each captioned."""
    scaled = [im.resize((max(1, round(im.width * height / im.height)), height)) for im in images]
    tiles = [with_caption(im, [c]) for im, c in zip(scaled, captions)]
    canvas = Image.new("RGB", (sum(t.width for t in tiles), max(t.height for t in tiles)), (255, 255, 255))
    x = 0
    for tile in tiles:
        canvas.paste(tile, (x, 0))
        x += tile.width
    return canvas


# --------------------------------------------------------------------------------------- per task
def texts_per_image(inputs: Inputs) -> dict[int, list[int]]:
    """Which texts go with each image: all of them with a single image, else text ``i`` with image ``i``."""
    per_image: dict[int, list[int]] = {}
    for i in range(len(inputs.texts)):
        per_image.setdefault(0 if len(inputs.images) == 1 else i, []).append(i)
    return per_image


def show_grounding(model: VLFuseModel, inputs: Inputs) -> Shown:
    boxes = model.predict(inputs.images, inputs.texts)
    shown = Shown()
    for image, rows in texts_per_image(inputs).items():
        for r in rows:
            x0, y0, x1, y1 = boxes[r].tolist()
            shown.lines.append(
                f"{inputs.image_names[image]}  {inputs.texts[r]!r}  "
                f"box xyxy = [{x0:.1f}, {y0:.1f}, {x1:.1f}, {y1:.1f}]"
            )
        shown.pictures.append(draw_boxes(inputs.images[image], boxes[rows], [inputs.texts[r] for r in rows]))
    return shown


def _ranked(names: Sequence[str], scores: torch.Tensor, k: int) -> list[tuple[str, float]]:
    values, order = scores.topk(min(k, len(names)))
    return [(names[i], v) for i, v in zip(order.tolist(), values.tolist())]


def show_classification(model: VLFuseModel, inputs: Inputs) -> Shown:
    outputs, _ = model.task.paired_outputs(model, inputs.images, inputs.texts)
    names = model.answer_vocabulary[:-1]  # the never-predicted "unknown" class is last
    probabilities = outputs["logits"].float().softmax(dim=1)[:, :-1].cpu()
    shown = Shown()
    for i, question in enumerate(inputs.texts):
        image = 0 if len(inputs.images) == 1 else i
        top = _ranked(names, probabilities[i], inputs.top_k)
        answers = ", ".join(f"{a} ({p:.3f})" for a, p in top)
        shown.lines.append(f"{inputs.image_names[image]}  {question!r}  -> {answers}")
        shown.pictures.append(
            with_caption(inputs.images[image], [f"Q: {question}", *(f"{a}: {p:.3f}" for a, p in top)])
        )
    return shown


def show_matching(model: VLFuseModel, inputs: Inputs) -> Shown:
    probability = model.predict(inputs.images, inputs.texts)
    shown = Shown()
    for image, rows in texts_per_image(inputs).items():
        ranked = _ranked([inputs.texts[r] for r in rows], probability[rows], inputs.top_k)
        for text, p in ranked:
            shown.lines.append(f"{inputs.image_names[image]}  {text!r}  match probability {p:.3f}")
        shown.pictures.append(with_caption(inputs.images[image], [f"{p:.3f}  {t}" for t, p in ranked]))
    return shown


def show_retrieval(model: VLFuseModel, inputs: Inputs) -> Shown:
    with torch.no_grad():
        similarity = model.embed_texts(inputs.texts) @ model.embed_images(inputs.images).T
    shown = Shown()
    for i, text in enumerate(inputs.texts):
        top = _ranked(list(range(len(inputs.images))), similarity[i].cpu(), inputs.top_k)
        for rank, (index, score) in enumerate(top, 1):
            shown.lines.append(f"{text!r}  #{rank}  {inputs.image_names[index]}  similarity {score:.3f}")
        shown.pictures.append(
            with_caption(
                strip(
                    [inputs.images[j] for j, _ in top], [f"#{r} {s:.3f}" for r, (_, s) in enumerate(top, 1)]
                ),
                [f"query: {text}"],
            )
        )
    return shown


# What the command shows for each task, by name (a task registered from outside adds its own entry).
SHOW: dict[str, Callable[[VLFuseModel, Inputs], Shown]] = {
    "grounding": show_grounding,
    "vqa": show_classification,
    "itm": show_matching,
    "retrieval": show_retrieval,
}


# ---------------------------------------------------------------------------------------------- command
def output_paths(output: Path, count: int) -> list[Path]:
    """``output`` for one picture; ``<stem>_<i><suffix>`` for several."""
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}_{i}{output.suffix}") for i in range(count)]


def predict(args: argparse.Namespace) -> Shown:
    """Loads the model, reads and checks the inputs, runs the task's prediction and writes its pictures."""
    texts = check_texts(args.text)
    paths = image_paths(args.image, args.images_dir)
    images = [read_image(p) for p in paths]
    model = VLFuseModel.from_pretrained(
        args.model, revision=args.revision, trust_remote_code=args.trust_remote_code
    )
    task = model.config.task
    if args.task and task != args.task:
        raise PredictError(f"{args.model} is a {task!r} model, not a {args.task!r} one (--task)")
    if task not in SHOW:
        raise PredictError(f"{args.model}: the predict command shows {', '.join(SHOW)}, not {task!r}")
    shown = SHOW[task](model, Inputs(images, [p.name for p in paths], texts, args.top_k))
    for picture, path in zip(shown.pictures, output_paths(Path(args.output), len(shown.pictures))):
        path.parent.mkdir(parents=True, exist_ok=True)
        picture.save(path)
        shown.lines.append(f"picture: {path}")
    return shown


def parser(prog: str = "python -m vlfuse.predict") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Runs a saved vlfuse model on images and texts; prints the answer and draws it.",
    )
    p.add_argument("model", help="a saved model folder (a run's final/) or a Hub model id")
    p.add_argument("--image", nargs="+", default=[], help="image file(s): one for all texts, or one per text")
    p.add_argument("--images-dir", help="retrieval: a folder of images to rank for each text")
    p.add_argument("--text", nargs="+", default=[], help="expression(s), question(s) or caption(s)")
    p.add_argument("--top-k", type=int, default=5, help="answers / images to show (default 5)")
    p.add_argument("--output", default="prediction.png", help="the picture (several: <stem>_<i>.png)")
    p.add_argument("--task", help="refuse a model of another task (grounding, retrieval, ...)")
    add_loading_arguments(p)
    return p


def add_loading_arguments(p: argparse.ArgumentParser) -> None:
    """``--revision`` and ``--trust-remote-code``, as ``VLFuseModel.from_pretrained`` takes them."""
    p.add_argument("--revision", help="the Hub revision of a model id")
    p.add_argument(
        "--trust-remote-code", action="store_true", help="allow custom code the model's text tower asks for"
    )


def main(argv: Sequence[str] | None = None, prog: str = "python -m vlfuse.predict") -> Shown:
    args = parser(prog).parse_args(argv)
    try:
        shown = predict(args)
    except (PredictError, FileNotFoundError, ValueError, OSError) as err:
        sys.exit(f"error: {err}")
    print("\n".join(shown.lines))
    return shown


if __name__ == "__main__":
    main()
