"""Prompts exactly as specified (few-shot, zero-shot, ablated) and OpenFlamingo's output post-processing."""

import pytest

from vlm.eval import CaptioningTask, CaptionSample, ClassificationTask, VQASample, VQATask
from vlm.eval.datasets import ClassificationSample
from vlm.eval.inference import prompt_items
from vlm.eval.runner import aggregate_trials

DEMOS = [CaptionSample("a", "a.jpg", [" A cat. ", "other"]), CaptionSample("b", "b.jpg", ["Two dogs"])]
QUERY = CaptionSample("q", "q.jpg", ["unused"])


def test_captioning_prompts():
    task = CaptioningTask()
    p = task.build_prompt(DEMOS, QUERY, shots=2)
    assert p.text == "<image>Output:A cat.<|endofchunk|><image>Output:Two dogs<|endofchunk|><image>Output:"
    assert p.images == ["a.jpg", "b.jpg", "q.jpg"]
    # Zero-shot: two demonstrations' text with their images removed, then the query with its image.
    z = task.build_prompt(DEMOS, QUERY, shots=0)
    assert z.text == "Output:A cat.<|endofchunk|>Output:Two dogs<|endofchunk|><image>Output:"
    assert z.images == ["q.jpg"]
    # Ablated: the same text, every image the constant one (None).
    a = task.build_prompt(DEMOS, QUERY, shots=2, ablate_images=True)
    assert a.text == p.text and a.images == [None, None, None]
    az = task.build_prompt(DEMOS, QUERY, shots=0, ablate_images=True)
    assert az.text == z.text and az.images == [None]
    with pytest.raises(ValueError, match="2 demonstrations"):
        task.build_prompt(DEMOS, QUERY, shots=4)


def test_vqa_and_classification_prompts():
    demo = VQASample(1, "d.jpg", 10, "What color?", ["red"] * 10, "red")
    query = VQASample(2, "q.jpg", 11, "How many?", [], "")
    p = VQATask().build_prompt([demo], query, shots=1)
    assert p.text == "<image>Question:What color? Short answer:red<|endofchunk|><image>Question:How many? Short answer:"
    task = ClassificationTask(class_names=["airplane", "cat"])
    c = task.build_prompt([ClassificationSample("x", "x.jpg", 1)], ClassificationSample("y", "y.jpg", 0), shots=1)
    assert c.text == "<image>Output:cat<|endofchunk|><image>Output:"
    sep = CaptioningTask(demo_separator="\n").build_prompt(DEMOS[:1], QUERY, shots=1)
    assert sep.text == "<image>Output:A cat.<|endofchunk|>\n<image>Output:"


def test_templates_are_options_and_checked():
    task = CaptioningTask(template="<image>A picture of {caption}.<|endofchunk|>")
    assert (
        task.build_prompt(DEMOS[:1], QUERY, 1).text == "<image>A picture of A cat..<|endofchunk|><image>A picture of "
    )
    with pytest.raises(ValueError, match="no {caption} field"):
        CaptioningTask(template="<image>Output:{text}")
    with pytest.raises(ValueError, match="exactly one <image>"):
        CaptioningTask(template="Output:{caption}")


def test_openflamingo_generation_defaults():
    cap, vqa = CaptioningTask(), VQATask()
    assert (cap.num_beams, cap.max_new_tokens, vqa.num_beams, vqa.max_new_tokens) == (3, 20, 3, 5)
    assert cap.generation_kwargs() == {"max_new_tokens": 20, "num_beams": 3, "do_sample": False, "length_penalty": 0.0}
    assert "length_penalty" not in CaptioningTask(num_beams=1).generation_kwargs()


def test_postprocessing_cuts_where_the_model_starts_again():
    cap = CaptioningTask()
    assert cap.postprocess(' a "red" car.Output:a dog') == "a red car."
    assert cap.postprocess("a dog Question: what") == "a dog"
    vqa = VQATask()
    assert vqa.postprocess("yes, it is Question:") == "yes"
    assert vqa.postprocess(" two Short answer: 3") == "two"
    assert vqa.postprocess("red Answer: blue") == "red"


def test_prompt_items_interleave_images():
    assert prompt_items("a<image>b<image>", [1, 2]) == ["a", 1, "b", 2]
    assert prompt_items("<image>Output:", ["img"]) == ["img", "Output:"]
    with pytest.raises(ValueError, match="2 <image> markers but 1 images"):
        prompt_items("<image><image>", [1])


def test_trials_are_aggregated_as_mean_and_population_std():
    mean, std = aggregate_trials(
        [{"cider": 10.0, "bleu4": 1.0}, {"cider": 20.0, "bleu4": 1.0}, {"cider": 30.0, "bleu4": 4.0}]
    )
    assert mean == pytest.approx({"cider": 20.0, "bleu4": 2.0})
    assert std == pytest.approx({"cider": (200 / 3) ** 0.5, "bleu4": 2**0.5})
