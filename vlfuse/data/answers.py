"""Answers of VQA-style datasets: normalization, the answer vocabulary and VQA's soft scores.

They live in the data layer because both the dataset (which maps each question's answers onto the
vocabulary) and the classification task (which builds the vocabulary and reads the scores) need them.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import torch

UNKNOWN = "unknown"

# The official VQA evaluation's normalization (vqaEval.py of the VQA challenge, Antol et al. 2015): its
# punctuation list, number words, articles and contractions, kept as the script has them (the curly
# apostrophes of most contractions included).
_PUNCTUATION = (
    ";",
    ":",
    "/",
    "'",
    "[",
    "]",
    '"',
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
)
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # a period not followed by a digit ("2.5" keeps its own)
_COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")
_NUMBERS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = ("a", "an", "the")
_CONTRACTIONS = dict(
    pair.split("=")
    for pair in """aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't
    couldn'tve=couldn’t’ve couldnt’ve=couldn’t’ve didnt=didn’t doesnt=doesn’t dont=don’t hadnt=hadn’t
    hadnt’ve=hadn’t’ve hadn'tve=hadn’t’ve hasnt=hasn’t havent=haven’t hed=he’d hed’ve=he’d’ve
    he’dve=he’d’ve hes=he’s howd=how’d howll=how’ll hows=how’s Id’ve=I’d’ve I’dve=I’d’ve Im=I’m
    Ive=I’ve isnt=isn’t itd=it’d itd’ve=it’d’ve it’dve=it’d’ve itll=it’ll let’s=let’s maam=ma’am
    mightnt=mightn’t mightnt’ve=mightn’t’ve mightn’tve=mightn’t’ve mightve=might’ve mustnt=mustn’t
    mustve=must’ve neednt=needn’t notve=not’ve oclock=o’clock oughtnt=oughtn’t ow’s’at=’ow’s’at
    ’ows’at=’ow’s’at ’ow’sat=’ow’s’at shant=shan’t shed’ve=she’d’ve she’dve=she’d’ve she’s=she’s
    shouldve=should’ve shouldnt=shouldn’t shouldnt’ve=shouldn’t’ve shouldn’tve=shouldn’t’ve
    somebody’d=somebodyd somebodyd’ve=somebody’d’ve somebody’dve=somebody’d’ve somebodyll=somebody’ll
    somebodys=somebody’s someoned=someone’d someoned’ve=someone’d’ve someone’dve=someone’d’ve
    someonell=someone’ll someones=someone’s somethingd=something’d somethingd’ve=something’d’ve
    something’dve=something’d’ve somethingll=something’ll thats=that’s thered=there’d
    thered’ve=there’d’ve there’dve=there’d’ve therere=there’re theres=there’s theyd=they’d
    theyd’ve=they’d’ve they’dve=they’d’ve theyll=they’ll theyre=they’re theyve=they’ve twas=’twas
    wasnt=wasn’t wed’ve=we’d’ve we’dve=we’d’ve weve=we've werent=weren’t whatll=what’ll whatre=what’re
    whats=what’s whatve=what’ve whens=when’s whered=where’d wheres=where's whereve=where’ve whod=who’d
    whod’ve=who’d’ve who’dve=who’d’ve wholl=who’ll whos=who’s whove=who've whyll=why’ll whyre=why’re
    whys=why’s wont=won’t wouldve=would’ve wouldnt=wouldn’t wouldnt’ve=wouldn’t’ve
    wouldn’tve=wouldn’t’ve yall=y’all yall’ll=y’all’ll y’allll=y’all’ll yall’d’ve=y’all’d’ve
    y’alld’ve=y’all’d’ve y’all’dve=y’all’d’ve youd=you’d youd’ve=you’d’ve you’dve=you’d’ve
    youll=you’ll youre=you’re youve=you’ve""".split()
)


def _punctuation(text: str) -> str:
    """The official ``processPunctuation``: each mark is deleted where it touches a space (or the text has
    a comma inside a number), else replaced by a space; then periods not before a digit are dropped."""
    out = text
    number_comma = _COMMA_IN_NUMBER.search(text) is not None
    for mark in _PUNCTUATION:
        if mark + " " in text or " " + mark in text or number_comma:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    # The script passes re.UNICODE (32) as sub's count: at most 32 periods go.
    return _PERIOD.sub("", out, count=32)


def _digits_articles(text: str) -> str:
    """The official ``processDigitArticle``: lowercase words, number words -> digits, articles dropped,
    contractions fixed."""
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def clean_answer(answer: str) -> str:
    """An answer as the official evaluation first reads it: newlines and tabs to spaces, stripped."""
    return answer.replace("\n", " ").replace("\t", " ").strip()


def normalize_answer(answer: str) -> str:
    """The official VQA normalization: ``" Two dogs."`` -> ``"2 dogs"``, ``"the red"`` -> ``"red"``,
    ``"dont"`` -> ``"don’t"``, ``"1,000"`` -> ``"1000"``."""
    return _digits_articles(_punctuation(clean_answer(answer)))


def answers_of(value: Any) -> list[str]:
    """A dataset's answer cell as the annotators wrote it (cleaned, not normalized): a string, a list of
    strings, or a list of ``{"answer": ...}`` dicts (VQAv2's ``answers``). Empty answers are dropped."""
    if value is None:
        return []
    items = value if isinstance(value, list | tuple) else [value]
    out = []
    for item in items:
        if isinstance(item, dict):
            item = item.get("answer")
        if isinstance(item, str) and normalize_answer(item):
            out.append(clean_answer(item))
    return out


def build_vocabulary(answer_cells: Iterable[Any], size: int) -> tuple[list[str], dict[str, int]]:
    """The ``size`` most frequent answers over all given answers (ties broken alphabetically), and
    counts: ``questions``, ``questions_without_answer``, ``questions_unknown`` (no answer in the
    vocabulary), ``answers_total``, ``answers_distinct``."""
    freq: Counter[str] = Counter()
    cells = [[normalize_answer(a) for a in answers_of(cell)] for cell in answer_cells]
    for answers in cells:
        freq.update(answers)
    vocab = [a for a, _ in sorted(freq.items(), key=lambda kv: (-kv[1], kv[0]))[:size]]
    known = set(vocab)
    stats = {
        "questions": len(cells),
        "questions_without_answer": sum(not a for a in cells),
        "questions_unknown": sum(bool(a) and not (set(a) & known) for a in cells),
        "answers_total": sum(freq.values()),
        "answers_distinct": len(freq),
    }
    return vocab, stats


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """The official VQA accuracy of one predicted answer: the mean, over the annotators, of
    ``min(1, matches among the other annotators / 3)``; the prediction is normalized, and the annotators'
    answers too when they are not all the same. With one answer: 1 if it matches, else 0.

    Args:
        prediction: the predicted answer.
        answers: the annotators' answers as written (``answers_of``).
    """
    if not answers:
        return 0.0
    predicted = normalize_answer(prediction)
    if len(answers) == 1:  # one answer (e.g. multiple_choice_answer): plain accuracy
        return float(normalize_answer(answers[0]) == predicted)
    given = list(answers) if len(set(answers)) == 1 else [normalize_answer(a) for a in answers]
    matches = sum(a == predicted for a in given)
    # leaving out an annotator who gave it leaves matches - 1; leaving out any other leaves matches
    total = matches * min(1.0, (matches - 1) / 3) + (len(given) - matches) * min(1.0, matches / 3)
    return total / len(given)


def answer_scores(answers: Sequence[str], index: dict[str, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per class (vocabulary + ``unknown`` last): the official VQA accuracy of predicting it
    (``vqa_accuracy``), and the training target.

    The target stays VQA's soft score of each normalized answer, ``min(1, count / 3)`` (one answer: 1),
    normalized into a distribution: the score without the leave-one-out average (3 of 10 annotators:
    1.0 vs 0.9), which grows with the count as the accuracy does. Out-of-vocabulary answers add their
    score to ``unknown`` in the target only (``unknown`` is never scored as correct).

    Args:
        answers: the annotators' answers as written (``answers_of``).
        index: normalized answer -> class.

    Returns:
        (scores ``[K + 1]`` with ``scores[K] = 0``, target ``[K + 1]`` summing to 1)
    """
    k = len(index)
    scores = torch.zeros(k + 1)
    target = torch.zeros(k + 1)
    normalized = [normalize_answer(a) for a in answers]
    for answer, n in Counter(normalized).items():
        slot = index.get(answer)
        if slot is not None:
            scores[slot] = vqa_accuracy(answer, answers)
        soft = 1.0 if len(normalized) == 1 else min(1.0, n / 3.0)
        target[k if slot is None else slot] += soft
    return scores, target / target.sum().clamp(min=1e-12)
