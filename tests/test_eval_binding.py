"""The binding evaluation (Frozen's open-ended fast binding): episodes, the exact prompt, both scorers, the
prototype reference, the vision cache, and ``python -m vlm.eval binding`` end to end on tiny bases."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from eval_helpers import write_image
from vlm_helpers import build_model, export_with_clip_config, set_gates

from vlm.eval.binding import (
    BindingEpisode,
    BindingTask,
    build_episodes,
    cached_vision_tokens,
    episode_prompt,
    evaluate_binding,
    prototype_correct,
    word_matches,
)
from vlm.eval.datasets import ClassificationSample, EvalDataset, load_class_tree
from vlm.eval.inference import class_log_likelihoods, prompt_loader
from vlm.processor import FlamingoProcessor

ROOT = Path(__file__).resolve().parent.parent
CLASSES = ("ant", "bee", "cow", "dog")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model():
    m, _, _ = build_model("llama")
    set_gates(m, 1.0)
    return m


def _dataset(per_class: int = 6) -> EvalDataset:
    samples = [
        ClassificationSample(f"{c}/{i}.jpg", f"/data/{c}/{i}.jpg", label)
        for label, c in enumerate(CLASSES)
        for i in range(per_class)
    ]
    return EvalDataset("imagefolder", "test", "/data", samples, class_names=list(CLASSES))


def _class_tree(root: Path, per_class: int = 6) -> Path:
    seed = 500
    for c in CLASSES:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            write_image(root / c / f"{i:03d}.jpg", seed)
            seed += 1
    return root


def test_exact_prompt_text():
    ep = BindingEpisode(0, 2, [0, 1], ["dax", "blicket"], 0, "q.jpg", [["a1", "a2"], ["b1", "b2"]],
                        [(1, 0), (0, 0), (0, 1), (1, 1)])  # fmt: skip
    task = BindingTask()
    p = episode_prompt(ep, 1, task)
    assert p.text == "<image>This is a blicket.<|endofchunk|><image>This is a dax.<|endofchunk|><image>This is a"
    assert p.images == ["b1", "a1", "q.jpg"]
    p = episode_prompt(ep, 2, task)
    assert p.images == ["b1", "a1", "a2", "b2", "q.jpg"] and p.text.count("<image>") == 5
    assert episode_prompt(ep, 0, task).text == "<image>This is a"  # zero-shot: the query alone
    induced = episode_prompt(ep, 1, BindingTask(task_induction=True, repeats=2))
    assert induced.text == (
        "Answer with dax or blicket."
        + "<image>This is a blicket.<|endofchunk|><image>This is a dax.<|endofchunk|>" * 2
        + "<image>This is a"
    )
    assert induced.images == ["b1", "a1", "b1", "a1", "q.jpg"]
    assert episode_prompt(ep, 1, task, ablated=True).images == [None, None, None]
    assert task.continuation("dax") == " dax."
    with pytest.raises(ValueError, match="repeats must be an int >= 1"):
        BindingTask(repeats=0)


def test_word_matching_reads_the_first_word():
    assert word_matches(" dax.", "dax") and word_matches("Dax, I think", "dax")
    assert not word_matches(" daxo.", "dax") and not word_matches(" a dax", "dax") and not word_matches("", "dax")
    assert word_matches(" red circle.", "red circle") and not word_matches(" red square", "red circle")


def test_episodes_are_nested_deterministic_and_never_show_the_query():
    data = _dataset()
    words = ["dax", "blicket", "wug", "zorp", "fep"]
    eps = build_episodes(data, [0, 1, 2, 3], ways=3, max_shots=3, num_episodes=40, seed=42, words=words)
    assert eps == build_episodes(data, [0, 1, 2, 3], 3, 3, 40, 42, words)
    assert eps != build_episodes(data, [0, 1, 2, 3], 3, 3, 40, 43, words)
    for ep in eps:
        assert len(set(ep.classes)) == 3 and len(set(ep.words)) == 3 and set(ep.words) <= set(words)
        assert 0 <= ep.query < 3 and f"/{CLASSES[ep.classes[ep.query]]}/" in ep.query_image
        for c, images in enumerate(ep.support):
            assert len(images) == 3 and all(f"/{CLASSES[ep.classes[c]]}/" in im for im in images)
        assert ep.query_image not in sum(ep.support, [])
        # k shots are the first k images of every class, in one showing order for every k
        full = ep.shown(3)
        for k in (1, 2, 3):
            shown = ep.shown(k)
            assert [x for x in full if x in shown] == shown  # the same showing order
            for c in range(3):
                assert {im for cc, im in shown if cc == c} == set(ep.support[c][:k])
    # the word-to-class assignment is new in every episode
    pairs = {(ep.classes[i], ep.words[i]) for ep in eps for i in range(3)}
    assert len(pairs) > 12
    real = build_episodes(data, [0, 1, 2, 3], 2, 1, 5, 0, words, names="real")
    assert all(ep.words == [CLASSES[c] for c in ep.classes] for ep in real)
    with pytest.raises(ValueError, match="fewer than 7 images"):
        build_episodes(data, [0, 1], 2, 6, 1, 0, words)


def test_prototype_reference_on_a_hand_made_case():
    f = {"a1": [1.0, 0.0], "a2": [0.6, 0.8], "b1": [0.0, 1.0], "b2": [0.0, 1.0], "q": [0.8, 0.6]}
    features = {k: torch.nn.functional.normalize(torch.tensor(v), dim=0) for k, v in f.items()}
    ep = BindingEpisode(0, 2, [0, 1], ["dax", "wug"], 0, "q", [["a1", "a2"], ["b1", "b2"]], [(0, 0), (1, 0)])
    # 1 shot: q is closer to a1 (cos 0.8) than to b1 (0.6) -> class 0, right
    assert prototype_correct(ep, 1, features) is True
    # query of class 1 with the same features: wrong
    ep.query = 1
    assert prototype_correct(ep, 1, features) is False
    # 2 shots: prototype of class 0 is mean(a1, a2) = (0.8, 0.4) -> cos with q 0.894 vs 0.6
    ep.query = 0
    assert prototype_correct(ep, 2, features) is True
    assert prototype_correct(ep, 0, features) is None


def test_vision_cache_gives_the_same_outputs_and_encodes_each_image_once(model):
    calls = []
    encoder = model.vision_encoder
    images = torch.randn(3, *model.image_shape)
    batch = torch.stack([images[0], images[1], images[0], images[2], images[1]])
    plain = encoder(batch)
    original = type(encoder).forward

    def counting(self, pixels):
        calls.append(pixels.shape[0])
        return original(self, pixels)

    type(encoder).forward = counting
    try:
        with cached_vision_tokens(model):
            first = encoder(batch)
            again = encoder(batch[:2])
    finally:
        type(encoder).forward = original
    assert torch.allclose(first, plain, atol=1e-5) and torch.allclose(again, plain[:2], atol=1e-5)
    assert calls == [3]  # three distinct images, computed once; the second call was all cached
    assert "forward" not in encoder.__dict__  # the cache is gone after the block


def test_closed_form_with_per_prompt_candidates(model, tmp_path):
    processor = FlamingoProcessor(model.tokenizer, model.image_processor)
    paths = [str(write_image(tmp_path / f"{i}.jpg", i)) for i in range(4)]
    from vlm.eval.tasks import Prompt

    prompts = [Prompt("<image>This is a dax.<|endofchunk|><image>This is a", paths[:2]),
               Prompt("<image>This is a wug.<|endofchunk|><image>This is a", paths[2:])]  # fmt: skip
    names = [[" dax.", " fep."], [" wug.", " blick."]]
    inputs = next(iter(prompt_loader(prompts, processor, 2)))
    both = class_log_likelihoods(model, inputs, [p.text for p in prompts], names, model.tokenizer, False)
    for i, prompt in enumerate(prompts):
        one = next(iter(prompt_loader([prompt], processor, 1)))
        alone = class_log_likelihoods(model, one, [prompt.text], names[i], model.tokenizer, False)
        assert torch.allclose(both[i], alone[0], atol=1e-4)
    with pytest.raises(ValueError, match="all of one length"):
        class_log_likelihoods(model, inputs, [p.text for p in prompts], [[" a."], [" b.", " c."]], model.tokenizer)


def test_evaluate_binding_counts_and_controls(model, tmp_path):
    data = load_class_tree(_class_tree(tmp_path / "tree"))
    assert data.class_names == list(CLASSES) and data.split == "all"
    res = evaluate_binding(model, data, classes=["ant", "bee", "cow"], ways=[2, 3], shots=[0, 1, 2], episodes=6,
                           words=["dax", "wug", "fep", "zorp"], batch_size=4, progress=False)  # fmt: skip
    kinds = [(r["ways"], r["ablate_images"], r["shots"]) for r in res["runs"]]
    assert kinds == [(w, a, k) for w in (2, 3) for a in (False, True) for k in (0, 1, 2)]
    for run in res["runs"]:
        trial = run["trials"][0]
        assert trial["num_samples"] == 6 and len(trial["predictions"]) == 6
        rec = trial["predictions"][0]
        assert rec["answer"] in rec["words"] and rec["query_class"] in rec["classes"]
        assert (
            rec["prompt"].endswith("<image>This is a")
            and rec["prompt"].count("<image>") == 1 + run["ways"] * run["shots"]
        )
        assert len(rec["closed_scores"]) == run["ways"]
        acc = 100 * sum(p["correct"] for p in trial["predictions"]) / 6
        assert run["mean"]["accuracy"] == pytest.approx(acc)
        closed = 100 * sum(p["closed_correct"] for p in trial["predictions"]) / 6
        assert run["mean"]["closed_accuracy"] == pytest.approx(closed)
        if run["ablate_images"]:
            assert all(im is None for im in rec["images"])
    assert set(res["zero_shot"]) == {"2-way", "3-way"} and set(res["ablated"]["3-way"]) == {"0", "1", "2"}
    assert set(res["prototype"]["2-way"]) == {"1", "2"} and res["chance"] == {
        "2-way": 50.0,
        "3-way": pytest.approx(100 / 3),
    }
    # the same episodes at every shot count: paired by episode
    diffs = {(d["a"], d["b"]) for d in res["paired_differences"]}
    assert ("2-way 2-shot", "2-way 0-shot") in diffs and ("3-way 1-shot", "3-way-ablated 1-shot") in diffs
    with pytest.raises(ValueError, match="ways must be between 2 and the 3 classes"):
        evaluate_binding(model, data, classes=["ant", "bee", "cow"], ways=[4], shots=[1], episodes=1, words=["a"])
    with pytest.raises(ValueError, match="class 'emu' is not in the data"):
        evaluate_binding(model, data, classes=["emu"], ways=[2], shots=[1], episodes=1, words=["a", "b"])


def _export(model, directory):
    return export_with_clip_config(model, directory)


@pytest.mark.slow
def test_command_line_binding_end_to_end(model, tmp_path):
    _class_tree(tmp_path / "tree" / "test", per_class=5)
    export = _export(model, tmp_path / "export")
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "vlm.eval", "binding", "--data", str(tmp_path / "tree"), "--model-dir", str(export),
            "--ways", "2", "3", "--shots", "0", "1", "2", "--episodes", "5", "--trials", "2", "--word-max-tokens", "0",
            "--word-pool-size", "200", "--batch-size", "4", "--out", str(out), "--quiet"]  # fmt: skip
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| 3 | 2 |" in proc.stdout and "paired differences" in proc.stdout
    res = json.loads((out / "results.json").read_text())
    assert res["task"] == "binding" and res["protocol"]["trial_seeds"] == [42, 43]
    assert res["protocol"]["words"]["pool"] == "eval"
    assert {"zero_shot", "ablated", "prototype", "chance", "paired_differences"} <= set(res)
    from data_pipelines.binding import pool_of

    for run in res["runs"]:
        assert len(run["trials"]) == 2
        for trial in run["trials"]:
            lines = (out / trial["predictions"]).read_text().splitlines()
            assert len(lines) == 5
            rec = json.loads(lines[0])
            assert all(pool_of(w) == "eval" for w in rec["words"])  # evaluation words only
            assert {"prompt", "prediction", "answer", "correct", "closed_scores", "images"} <= set(rec)
    assert (out / "binding_shots.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a rerun reads the finished trials back
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "24 trial(s) read back" in proc.stdout
    # bad input fails before the model loads, naming the value
    bad = subprocess.run([*argv[:5], str(tmp_path / "tree"), "--model-dir", str(export), "--ways", "5"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert bad.returncode == 2 and "--ways 5 needs as many classes; 4 are evaluated" in bad.stderr


@pytest.mark.slow
def test_command_line_binding_on_generated_scenes(model, tmp_path):
    export = _export(model, tmp_path / "export")
    argv = ["binding", "--data", "synthetic", "--synthetic-per-class", "4", "--model-dir", str(export),
            "--classes", "red circle", "blue_square", "--ways", "2", "--shots", "0", "1", "--episodes", "3",
            "--word-max-tokens", "0", "--word-pool-size", "100", "--cache-dir", str(tmp_path / "cache"),
            "--out", str(tmp_path / "out"), "--quiet", "--no-closed-form"]  # fmt: skip
    from vlm.eval.__main__ import main

    assert main(argv) == 0
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert res["data"]["classes"] == ["red circle", "blue square"]
    lines = (tmp_path / "out" / res["runs"][1]["trials"][0]["predictions"]).read_text().splitlines()
    rec = json.loads(lines[0])
    assert "closed_scores" not in rec and "scene_classes-4/test/" in rec["query_image"]
    assert len(list((tmp_path / "cache" / "scene_classes-4" / "test").iterdir())) == 15
