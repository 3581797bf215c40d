"""Metrics: CIDEr / BLEU-4 parity with pycocoevalcap on raw captions; VQA accuracy on hand-computed cases."""

import pytest
import torch
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from vlm.eval import bleu4, caption_scores, cider, normalize_vqa_answer, vqa_accuracy, vqa_question_accuracy
from vlm.eval.metrics import topk_correct

# Raw strings with capitals, punctuation, quotes and parentheses: tokenization matters for both metrics.
REFERENCES = {
    1: ["A man riding a wave on top of a surfboard.", "A surfer rides a large wave!", "man (surfing) in the ocean"],
    2: ["Two dogs play in the snow.", "A pair of dogs running, in snow", "Dogs playing outside in winter."],
    3: ["A plate of food with broccoli and rice.", "Broccoli, rice & chicken on a plate.", "A dinner plate."],
    "x": ['A "red" car parked on the street.', "A red car by the curb.", "A car parked on a city street."],
}
CANDIDATES = {
    1: "A man riding a wave on a surfboard.",
    2: "Two dogs running in the SNOW!",
    3: "a plate of broccoli , rice",
    "x": "A red car parked on the street",
}


def _coco_reference(candidates, references):
    """What pycocoevalcap's COCOEvalCap does: tokenize references then results, then the scorers."""
    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": c} for c in v] for k, v in references.items()})
    res = tok.tokenize({k: [{"caption": candidates[k]}] for k in references})
    c, _ = Cider().compute_score(gts, res)
    b, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return c, b[3]


def test_cider_and_bleu4_agree_with_pycocoevalcap_on_raw_strings():
    want_cider, want_bleu = _coco_reference(CANDIDATES, REFERENCES)
    got = caption_scores(CANDIDATES, REFERENCES)
    assert abs(got["cider"] - want_cider) < 1e-6
    assert abs(got["bleu4"] - want_bleu) < 1e-6
    assert got["cider"] > 0.5 and got["bleu4"] > 0.1  # a meaningful, non-degenerate case
    # The single-metric entry points give the same numbers.
    assert cider(CANDIDATES, REFERENCES) == pytest.approx(got["cider"], abs=1e-12)
    assert bleu4(CANDIDATES, REFERENCES) == pytest.approx(got["bleu4"], abs=1e-12)


def test_cider_idf_comes_from_the_whole_reference_set():
    # Scoring a subset alone changes the document frequencies, so per-image CIDEr is not additive:
    # the whole-set score must be computed in one call (what cider() does).
    whole = cider(CANDIDATES, REFERENCES)
    parts = [cider({k: CANDIDATES[k]}, {k: REFERENCES[k]}) for k in REFERENCES]
    assert abs(whole - sum(parts) / len(parts)) > 1e-3


def test_caption_metric_errors():
    with pytest.raises(ValueError, match="same ids"):
        cider({1: "a dog"}, {2: ["a dog"]})
    with pytest.raises(ValueError, match="non-empty list"):
        cider({1: "a dog"}, {1: "a dog"})


# ----------------------------------------------------------------------------- VQA


def test_vqa_accuracy_hand_computed():
    # min(#other humans agreeing / 3, 1), averaged over the ten leave-one-out subsets.
    assert vqa_question_accuracy("cat", ["cat"] * 3 + ["dog"] * 7) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)  # 0.9
    assert vqa_question_accuracy("red", ["red"] + ["blue"] * 9) == pytest.approx(9 * (1 / 3) / 10)  # 0.3
    assert vqa_question_accuracy("yes", ["yes"] * 2 + ["no"] * 8) == pytest.approx((2 * 1 / 3 + 8 * 2 / 3) / 10)  # 0.6
    assert vqa_question_accuracy("yes", ["yes"] * 4 + ["no"] * 6) == pytest.approx(1.0)
    assert vqa_question_accuracy("maybe", ["yes"] * 10) == 0.0


def test_vqa_answer_normalisation():
    assert normalize_vqa_answer("The Dog.") == "dog"  # case, article, final period
    assert normalize_vqa_answer("two") == "2"  # number words
    assert normalize_vqa_answer("isnt") == "isn't"  # contractions restored
    assert normalize_vqa_answer("hot-dog") == "hot dog"  # a mark not touching a space becomes a space
    assert normalize_vqa_answer("yes !") == "yes"  # a mark touching a space is deleted
    assert normalize_vqa_answer("1,000") == "1000"  # thousands comma
    assert normalize_vqa_answer("3.5") == "3.5"  # decimal point kept
    assert normalize_vqa_answer("an apple\tpie\n") == "apple pie"
    # Both sides are normalised, also when all humans agree (the official script skips that case).
    assert vqa_question_accuracy("Two.", ["2"] * 10) == 1.0
    assert vqa_question_accuracy("The dog", ["dog"] * 10) == 1.0


def test_vqa_accuracy_input_formats():
    answers = {1: ["cat"] * 3 + ["dog"] * 7, 2: ["2"] * 10}
    want = (0.9 + 1.0) / 2
    assert vqa_accuracy({1: "cat", 2: "two"}, answers) == pytest.approx(want)
    results = [{"question_id": 1, "answer": "cat"}, {"question_id": 2, "answer": "two"}]
    annotations = {
        "annotations": [
            {"question_id": q, "image_id": 0, "answers": [{"answer": a, "answer_id": i} for i, a in enumerate(v)]}
            for q, v in answers.items()
        ]
    }
    assert vqa_accuracy(results, annotations) == pytest.approx(want)
    with pytest.raises(ValueError, match="no annotation"):
        vqa_accuracy({3: "cat"}, answers)


def test_topk_correct():
    scores = torch.tensor([[0.1, 0.9, 0.5], [0.8, 0.1, 0.3]])
    labels = torch.tensor([2, 2])
    assert topk_correct(scores, labels, 1).tolist() == [False, False]
    assert topk_correct(scores, labels, 2).tolist() == [True, True]
