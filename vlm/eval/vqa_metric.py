"""The standard VQA accuracy (VQAv2 / OK-VQA) with the official answer normalisation.

Per question with ten human answers: for each of the ten leave-one-out subsets of nine answers,
``min(#answers in the subset equal to the prediction / 3, 1)``, averaged over the ten subsets.
Prediction and human answers are normalised the same way first (as the official ``vqaEval.py``):
newlines/tabs to spaces, punctuation removed or turned into spaces, periods dropped unless followed
by a digit, lower case, number words to digits, articles dropped, contractions restored.

Two departures from the official script, both where it is wrong: human answers are always
normalised (the official script skips them, and the prediction, when all ten are identical, so
``"Dog."`` scores 0 against ten ``"dog"``), and a contraction table whose capitalised keys
(``"Im"``) could never match lower-cased words is lower-cased.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, Union

_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "id've": "i'd've", "i'dve": "i'd've", "im": "i'm",
    "ive": "i've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebodyd": "somebody'd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}  # fmt: skip
_NUMBERS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = {"a", "an", "the"}
_PUNCTUATION = [
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
]
_PERIOD = re.compile(r"\.(?!\d)")  # a period not followed by a digit (decimal points survive)
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")


def _strip_punctuation(text: str) -> str:
    # A mark touching a space (or any text with a thousands comma) is deleted, otherwise it becomes a space.
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for p in _PUNCTUATION:
        if delete_all or (p + " ") in text or (" " + p) in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out)


def normalize_vqa_answer(answer: str) -> str:
    """The official VQA answer normalisation (see the module docstring)."""
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    text = _strip_punctuation(text)
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    words = [_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES]
    return " ".join(words)


def vqa_question_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Accuracy of one prediction against the human answers (usually ten), in [0, 1]."""
    if isinstance(answers, str) or not answers:
        raise ValueError(f"answers must be a non-empty list of strings, got {answers!r}")
    pred = normalize_vqa_answer(prediction)
    gts = [normalize_vqa_answer(a) for a in answers]
    matches = [g == pred for g in gts]
    total = sum(matches)
    # Leave each answer out in turn: the other answers that match, / 3, capped at 1.
    return sum(min(1.0, (total - m) / 3.0) for m in matches) / len(gts)


def _answers_by_question(annotations: Any) -> dict:
    if isinstance(annotations, Mapping) and "annotations" in annotations:
        annotations = annotations["annotations"]
    if isinstance(annotations, Mapping):
        return {qid: list(a) for qid, a in annotations.items()}
    out = {}
    for ann in annotations:
        out[ann["question_id"]] = [a["answer"] if isinstance(a, Mapping) else a for a in ann["answers"]]
    return out


def vqa_accuracy(
    predictions: Union[Mapping[Any, str], Sequence[Mapping[str, Any]]],
    annotations: Union[Mapping[Any, Sequence[str]], Sequence[Mapping[str, Any]], Mapping[str, Any]],
) -> float:
    """Mean VQA accuracy in [0, 1] (the official script reports 100x this, rounded).

    ``predictions``: question_id -> answer, or a list of ``{"question_id", "answer"}`` (the results
    file format). ``annotations``: question_id -> list of human answers, a VQA annotations JSON
    (``{"annotations": [...]}``) or its list. Every predicted question must be annotated.
    """
    if not isinstance(predictions, Mapping):
        predictions = {p["question_id"]: p["answer"] for p in predictions}
    if not predictions:
        raise ValueError("no predictions to score")
    answers = _answers_by_question(annotations)
    missing = [q for q in predictions if q not in answers]
    if missing:
        raise ValueError(f"{len(missing)} predicted question ids have no annotation, e.g. {missing[:5]}")
    return sum(vqa_question_accuracy(p, answers[q]) for q, p in predictions.items()) / len(predictions)
