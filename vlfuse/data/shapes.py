"""The embedded offline dataset: generated referring expressions over coloured shapes.

Each image holds 2-5 objects, every one a distinct (size, colour, shape) triple, so that the full
description is always unique. The referent is drawn uniformly among the image's objects *before* any
expression is written, so an image alone says nothing about which object is meant: a model that
ignores the text cannot beat chance (1 / number of objects). Expressions use attributes ("the small red
circle"), extremes ("the lowest blue shape") and relations ("the square left of the green triangle"),
each kept only if it picks out the referent and nothing else.

Rows follow the Hub grounding layout: ``image`` (PIL), ``text`` (a list of expressions for the object),
``box`` (absolute ``xyxy`` pixels). The same images serve the other two tasks: ``captions`` (three
captions of the whole image, for retrieval) and ``question`` / ``answer`` / ``question_type`` (one
question about colour, shape, count, existence or a spatial relation, for VQA-style classification).
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

NAME = "shapes"

COLOURS = {
    "red": (220, 45, 45),
    "green": (40, 175, 65),
    "blue": (50, 90, 235),
    "yellow": (235, 210, 40),
    "purple": (150, 65, 205),
}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
EXTREMES = {  # word -> (coordinate, pick the minimum?)
    "leftmost": ("cx", True),
    "rightmost": ("cx", False),
    "highest": ("cy", True),
    "lowest": ("cy", False),
}
RELATIONS = ("left of", "right of", "above", "below")
# Every word an expression can contain (the bundled tokenizer's vocabulary is built from this).
VOCABULARY = sorted(
    {"the", "shape", "of", "object", "one"}
    | set(COLOURS)
    | set(SHAPES)
    | set(SIZES)
    | set(EXTREMES)
    | {w for r in RELATIONS for w in r.split()}
)


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: str
    box: tuple[float, float, float, float]  # xyxy pixels

    @property
    def cx(self) -> float:
        return (self.box[0] + self.box[2]) / 2

    @property
    def cy(self) -> float:
        return (self.box[1] + self.box[3]) / 2


def _describe(obj: Obj, use_size: bool, use_colour: bool, use_shape: bool) -> str:
    words = [obj.size] if use_size else []
    words += [obj.colour] if use_colour else []
    words.append(obj.shape if use_shape else "shape")
    return " ".join(words)


def _matches(obj: Obj, ref: Obj, use_size: bool, use_colour: bool, use_shape: bool) -> bool:
    return (
        (not use_size or obj.size == ref.size)
        and (not use_colour or obj.colour == ref.colour)
        and (not use_shape or obj.shape == ref.shape)
    )


_ATTRIBUTE_SETS = [
    (s, c, h) for s in (False, True) for c in (False, True) for h in (False, True) if s or c or h
]


def _relation_holds(a: Obj, rel: str, b: Obj, margin: float) -> bool:
    if rel == "left of":
        return a.box[2] + margin <= b.box[0]
    if rel == "right of":
        return a.box[0] >= b.box[2] + margin
    if rel == "above":
        return a.box[3] + margin <= b.box[1]
    return a.box[1] >= b.box[3] + margin  # below


def expressions_for(objects: list[Obj], target: Obj, rng: random.Random, size: int) -> list[str]:
    """Expressions that pick out ``target`` and only it, by attributes, extremes and relations."""
    attribute, extreme, relation = [], [], []
    for attrs in _ATTRIBUTE_SETS:
        if sum(_matches(o, target, *attrs) for o in objects) == 1:
            attribute.append("the " + _describe(target, *attrs))
    margin = size * 0.04
    for word, (coord, smallest) in EXTREMES.items():
        for attrs in [(False, False, False), *_ATTRIBUTE_SETS]:
            group = [o for o in objects if _matches(o, target, *attrs)]
            if len(group) < 2:
                continue
            values = sorted(getattr(o, coord) for o in group)
            best = values[0] if smallest else values[-1]
            runner_up = values[1] if smallest else values[-2]
            if getattr(target, coord) == best and abs(best - runner_up) > margin:
                noun = _describe(target, *attrs) if any(attrs) else "shape"
                extreme.append(f"the {word} {noun}")
    for landmark in objects:
        if landmark is target:
            continue
        for lattrs in _ATTRIBUTE_SETS:
            if sum(_matches(o, landmark, *lattrs) for o in objects) != 1:
                continue
            for rel in RELATIONS:
                if not _relation_holds(target, rel, landmark, margin):
                    continue
                for attrs in ((False, False, True), (False, True, False), (False, True, True)):
                    group = [o for o in objects if o is not landmark and _matches(o, target, *attrs)]
                    if sum(_relation_holds(o, rel, landmark, margin) for o in group) == 1:
                        relation.append(
                            f"the {_describe(target, *attrs)} {rel} the {_describe(landmark, *lattrs)}"
                        )
    chosen = []
    # Prefer the harder kinds, so the model must read relations and extremes, not just nouns.
    for pool in (relation, extreme, attribute):
        if pool:
            chosen.append(rng.choice(pool))
    rng.shuffle(chosen)
    return chosen[: rng.randint(1, 2)] if len(chosen) > 1 else chosen


def _draw(draw: ImageDraw.ImageDraw, obj: Obj) -> None:
    x0, y0, x1, y1 = obj.box
    colour = COLOURS[obj.colour]
    if obj.shape == "circle":
        draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=colour)
    elif obj.shape == "square":
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=colour)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=colour)


def make_example(rng: random.Random, size: int = 64) -> dict:
    """One image with its referent's box and expressions (and, under ``objects``, every object)."""
    while True:
        n = rng.randint(2, 5)
        triples = rng.sample([(s, c, h) for s in SIZES for c in COLOURS for h in SHAPES], n)
        objects: list[Obj] = []
        for obj_size, colour, shape in triples:
            side = rng.uniform(0.13, 0.19) * size if obj_size == "small" else rng.uniform(0.27, 0.36) * size
            for _ in range(50):
                x0, y0 = rng.uniform(0, size - side), rng.uniform(0, size - side)
                box = (x0, y0, x0 + side, y0 + side)
                gap = size * 0.02
                if all(
                    box[0] >= o.box[2] + gap
                    or box[2] + gap <= o.box[0]
                    or box[1] >= o.box[3] + gap
                    or box[3] + gap <= o.box[1]
                    for o in objects
                ):
                    objects.append(Obj(shape, colour, obj_size, tuple(round(v) for v in box)))
                    break
        if len(objects) < 2:
            continue
        target = objects[rng.randrange(len(objects))]
        texts = expressions_for(objects, target, rng, size)
        if not texts:  # the full description is unique, so this does not happen; kept as a guard
            continue
        shade = rng.randint(0, 70)
        image = Image.new("RGB", (size, size), (shade, shade, shade))
        draw = ImageDraw.Draw(image)
        for obj in objects:
            _draw(draw, obj)
        return {
            "image": image,
            "text": texts,
            "box": [float(v) for v in target.box],
            "num_objects": len(objects),
            # Every object's box, referent included: lets one measure what ignoring the text would score.
            "object_boxes": [[float(v) for v in o.box] for o in objects],
            "objects": objects,
        }


# ------------------------------------------------------------------------- captions (retrieval)
def _article(words: str) -> str:
    return ("an " if words[0] in "aeiou" else "a ") + words


def _listing(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def captions_for(objects: list[Obj], rng: random.Random, size: int) -> list[str]:
    """Three captions of the whole image: every object (size, colour, shape) in a random order; two
    objects by colour and shape; a spatial relation between two objects (or two more objects)."""
    full = [_article(_describe(o, True, True, True)) for o in objects]
    rng.shuffle(full)
    pair = rng.sample(objects, 2)
    captions = [_listing(full), _listing([_article(_describe(o, False, True, True)) for o in pair])]
    margin = size * 0.04
    relations = [
        (a, rel, b)
        for a in objects
        for b in objects
        if a is not b
        for rel in RELATIONS
        if _relation_holds(a, rel, b, margin)
    ]
    if relations:
        a, rel, b = rng.choice(relations)
        captions.append(
            f"{_article(_describe(a, False, True, True))} {rel} {_article(_describe(b, False, True, True))}"
        )
    else:
        others = rng.sample(objects, 2)
        captions.append(_listing([_article(_describe(o, True, False, True)) for o in others]))
    return captions


# ------------------------------------------------------------------------------ questions (VQA)
QUESTION_TYPES = ("colour", "shape", "count", "exist", "relation")
_OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def _unique_description(objects: list[Obj], target: Obj, without: str) -> str | None:
    """The shortest description of ``target`` that names it uniquely without using ``without``."""
    allowed = [a for a in _ATTRIBUTE_SETS if not a[("size", "colour", "shape").index(without)]]
    for attrs in sorted(allowed, key=sum):
        if sum(_matches(o, target, *attrs) for o in objects) == 1:
            words = _describe(target, *attrs)
            return words.replace(" shape", " object") if not attrs[2] else words
    return None


def question_for(objects: list[Obj], rng: random.Random, size: int) -> tuple[str, str, str]:
    """One question about the image and its answer: ``(question, answer, question type)``. Types are drawn
    uniformly from colour, shape, count, exist and relation; yes/no answers are balanced."""
    while True:
        kind = rng.choice(QUESTION_TYPES)
        if kind in ("colour", "shape"):
            target = rng.choice(objects)
            words = _unique_description(objects, target, kind)
            if words is None:
                continue
            answer = target.colour if kind == "colour" else target.shape
            return f"what {kind} is the {words}?", answer, kind
        if kind == "count":
            by = rng.choice(("colour", "shape", "all"))
            if by == "all":
                return "how many shapes are there?", str(len(objects)), kind
            present = [getattr(o, by) for o in objects]
            values = list(COLOURS) if by == "colour" else list(SHAPES)
            value = rng.choice(present) if rng.random() < 0.75 else rng.choice(values)
            count = present.count(value)
            noun = f"{value} shapes" if by == "colour" else f"{value}s"
            return f"how many {noun} are there?", str(count), kind
        if kind == "exist":
            present = {(o.colour, o.shape) for o in objects}
            if rng.random() < 0.5:
                colour, shape = rng.choice(sorted(present))
            else:
                absent = [(c, h) for c in COLOURS for h in SHAPES if (c, h) not in present]
                colour, shape = rng.choice(absent)
            answer = "yes" if (colour, shape) in present else "no"
            return f"is there {_article(colour + ' ' + shape)}?", answer, kind
        # relation: "is the X left of the Y?", asked only where it or its opposite clearly holds
        a, b = rng.sample(objects, 2)
        wa, wb = _unique_description(objects, a, "size"), _unique_description(objects, b, "size")
        if wa is None or wb is None:
            continue
        margin = size * 0.04
        holding = [r for r in RELATIONS if _relation_holds(a, r, b, margin)]
        if not holding:
            continue
        rel = rng.choice(holding)
        if rng.random() < 0.5:
            return f"is the {wa} {rel} the {wb}?", "yes", kind
        return f"is the {wa} {_OPPOSITE[rel]} the {wb}?", "no", kind


def generator_version() -> str:
    """A hash of this module's source: cached copies of the dataset are rebuilt when the generator changes."""
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


def generate(num_images: int, seed: int, size: int = 64, version: str = ""):
    """Yields ``num_images`` rows, deterministically from ``seed`` (``version`` only keys the cache).

    Captions and the question come from a second random stream per image, so the grounding columns do
    not depend on them."""
    rng = random.Random(seed)
    for i in range(num_images):
        row = make_example(rng, size)
        objects = row.pop("objects")
        extra = random.Random(f"{seed}-extra-{i}")
        row["captions"] = captions_for(objects, extra, size)
        row["question"], row["answer"], row["question_type"] = question_for(objects, extra, size)
        yield row
