import random
import re
from collections import Counter

from vlfuse.data import shapes
from vlfuse.encoders.text import TextEncoder, resolve_text_encoder_name
from vlfuse.schema import TextEncoderConfig


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


# ----------------------------------------------------------------- captions and questions (retrieval, VQA)
def _matching(desc: str, objects):
    """The objects a description ("small red object", "blue circle") fits: an independent reader."""
    words = desc.split()
    return [
        o
        for o in objects
        if all(
            (w not in shapes.SIZES or o.size == w)
            and (w not in shapes.COLOURS or o.colour == w)
            and (w not in shapes.SHAPES or o.shape == w)
            for w in words
        )
    ]


def _holds(a, rel, b, margin):
    if rel == "left of":
        return a.box[2] + margin <= b.box[0]
    if rel == "right of":
        return a.box[0] >= b.box[2] + margin
    if rel == "above":
        return a.box[3] + margin <= b.box[1]
    return a.box[1] >= b.box[3] + margin


def _scenes(n, seed=0):
    rng = random.Random(seed)
    for _ in range(n):
        objects = shapes.make_example(rng, 64)["objects"]
        yield objects, rng


def test_every_question_is_answered_correctly():

    kinds, answers = Counter(), Counter()
    for objects, rng in _scenes(400):
        question, answer, kind = shapes.question_for(objects, rng, 64)
        kinds[kind] += 1
        answers[(kind, answer)] += 1
        if m := re.fullmatch(r"what (colour|shape) is the (.+)\?", question):
            found = _matching(m[2], objects)
            assert len(found) == 1, question  # the description picks out one object
            assert getattr(found[0], m[1]) == answer
            assert m[1] == "colour" and not any(c in m[2] for c in shapes.COLOURS) or m[1] == "shape"
        elif m := re.fullmatch(r"how many (\w+ )?(\w+) are there\?", question):
            if m[2] == "shapes" and m[1] is None:
                expected = len(objects)
            elif m[2] == "shapes":
                expected = sum(o.colour == m[1].strip() for o in objects)
            else:
                expected = sum(o.shape + "s" == m[2] for o in objects)
            assert answer == str(expected), question
        elif m := re.fullmatch(r"is there an? (\w+) (\w+)\?", question):
            present = any(o.colour == m[1] and o.shape == m[2] for o in objects)
            assert answer == ("yes" if present else "no"), question
        elif m := re.fullmatch(r"is the (.+) (left of|right of|above|below) the (.+)\?", question):
            a, b = _matching(m[1], objects), _matching(m[3], objects)
            assert len(a) == 1 and len(b) == 1, question
            opposite = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
            if answer == "yes":
                assert _holds(a[0], m[2], b[0], 64 * 0.04)
            else:  # asked only where the opposite clearly holds
                assert _holds(a[0], opposite[m[2]], b[0], 64 * 0.04)
        else:
            raise AssertionError(f"unexpected question {question!r}")
    assert set(kinds) == set(shapes.QUESTION_TYPES) and min(kinds.values()) > 40, kinds
    for kind in ("exist", "relation"):  # yes/no balanced within 35-65 %
        yes, no = answers[(kind, "yes")], answers[(kind, "no")]
        assert 0.35 < yes / (yes + no) < 0.65, (kind, yes, no)


def test_captions_describe_the_image():
    for objects, rng in _scenes(200, seed=1):
        full, pair, third = shapes.captions_for(objects, rng, 64)
        phrases = re.split(r", | and ", full)
        assert len(phrases) == len(objects)
        described = sorted(p.split(" ", 1)[1] for p in phrases)
        assert described == sorted(f"{o.size} {o.colour} {o.shape}" for o in objects)
        assert all(len(_matching(p.split(" ", 1)[1], objects)) >= 1 for p in re.split(r" and ", pair))
        if m := re.fullmatch(r"an? (\w+ \w+) (left of|right of|above|below) an? (\w+ \w+)", third):
            a, b = _matching(m[1], objects), _matching(m[3], objects)
            assert any(_holds(x, m[2], y, 64 * 0.04) for x in a for y in b), third


def test_generated_rows_have_all_three_tasks_and_keep_grounding_rows():
    rows = _rows(30, 7)
    assert all(len(r["captions"]) == 3 and r["question"].endswith("?") and r["answer"] for r in rows)
    rng = random.Random(7)
    for r in rows:  # the grounding columns are what make_example alone draws from the seed
        alone = shapes.make_example(rng, 64)
        assert r["text"] == alone["text"] and r["box"] == alone["box"]
