import random
from collections import Counter

from vlfuse.config import TextEncoderConfig
from vlfuse.data import shapes
from vlfuse.encoders.text import TextEncoder, resolve_text_encoder_name


def _rows(n, seed=0):
    return list(shapes.generate(n, seed))


def test_deterministic_from_seed():
    a, b, c = _rows(20, 3), _rows(20, 3), _rows(20, 4)
    assert [r["text"] for r in a] == [r["text"] for r in b]
    assert [r["box"] for r in a] == [r["box"] for r in b]
    assert list(a[0]["image"].getdata()) == list(b[0]["image"].getdata())
    assert [r["box"] for r in a] != [r["box"] for r in c]


def test_objects_and_expressions():
    rows = _rows(300)
    kinds = Counter()
    for r in rows:
        assert 2 <= r["num_objects"] <= 5
        assert 1 <= len(r["text"]) <= 2 and all(t.startswith("the ") for t in r["text"])
        x0, y0, x1, y1 = r["box"]
        assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
        for t in r["text"]:
            if any(rel in t for rel in shapes.RELATIONS):
                kinds["relation"] += 1
            elif any(e in t for e in shapes.EXTREMES):
                kinds["extreme"] += 1
            else:
                kinds["attribute"] += 1
    assert min(kinds.values()) > 30, kinds


def _parse(desc, objects):
    words = desc.split()
    return [
        o
        for o in objects
        if all(
            (w == "shape")
            or (w in shapes.SIZES and o.size == w)
            or (w in shapes.COLOURS and o.colour == w)
            or (w in shapes.SHAPES and o.shape == w)
            for w in words
        )
    ]


def _resolve(text, objects, size=64):
    """Which objects an expression denotes, read independently of how it was written."""
    assert text.startswith("the ")
    for rel in shapes.RELATIONS:
        if f" {rel} the " in text:
            subject, landmark = text[4:].split(f" {rel} the ")
            (mark,) = _parse(landmark, objects)  # the landmark itself must be unique
            return [
                o
                for o in _parse(subject, objects)
                if o is not mark and shapes._relation_holds(o, rel, mark, size * 0.04)
            ]
    first, rest = text[4:].split(" ", 1) if " " in text[4:] else (text[4:], "")
    if first in shapes.EXTREMES:
        coord, smallest = shapes.EXTREMES[first]
        group = _parse(rest, objects)
        pick = min if smallest else max
        return [pick(group, key=lambda o: getattr(o, coord))]
    return _parse(text[4:], objects)


def test_expressions_pick_out_exactly_the_referent():
    rng = random.Random(0)
    checked = 0
    for _ in range(300):
        n = rng.randint(2, 5)
        triples = rng.sample(
            [(s, c, h) for s in shapes.SIZES for c in shapes.COLOURS for h in shapes.SHAPES], n
        )
        objects = []
        for i, (sz, colour, shape) in enumerate(triples):
            x = 4 + 12 * i
            objects.append(shapes.Obj(shape, colour, sz, (x, rng.randint(0, 40), x + 8, 0)))
        objects = [
            shapes.Obj(o.shape, o.colour, o.size, (o.box[0], o.box[1], o.box[2], o.box[1] + 8))
            for o in objects
        ]
        target = rng.choice(objects)
        for text in shapes.expressions_for(objects, target, rng, 64):
            assert _resolve(text, objects) == [target], (text, objects, target)
            checked += 1
    assert checked > 300


def test_referent_is_uniform_among_objects():
    # The referent is drawn before any text: its rank among the image's objects by x, y or size carries
    # no signal, so a model that ignores the text is at chance (1 / number of objects).
    rows = [r for r in _rows(3000, seed=5) if r["num_objects"] == 3]
    assert len(rows) > 400
    for key in (lambda b: b[0], lambda b: b[1], lambda b: b[2] - b[0]):
        ranks = Counter(sorted(r["object_boxes"], key=key).index(r["box"]) for r in rows)
        for rank in range(3):
            assert abs(ranks[rank] / len(rows) - 1 / 3) < 0.06, ranks


def test_bundled_tokenizer_covers_the_vocabulary():
    tok = TextEncoder(TextEncoderConfig(name="vlfuse:tiny-bert", pretrained=False)).tokenizer
    for word in shapes.VOCABULARY:
        assert tok.tokenize(word) == [word], word
    assert resolve_text_encoder_name("vlfuse:tiny-bert").endswith("tiny-bert")
