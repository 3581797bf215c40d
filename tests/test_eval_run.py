"""End-to-end evaluation on tiny models and data: batching, class scoring, the ablated control, the
command line (results JSON, predictions, plot, table), VQA, classification and the OpenFlamingo route."""

import copy
import json
import subprocess
import sys
import tarfile

import pytest
import torch
from eval_helpers import tar_directory, write_flickr, write_image_folder, write_karpathy, write_vqa
from vlm_helpers import (
    build_model,
    export_with_clip_config,
    filter_state_dict_like_openflamingo,
    import_open_flamingo,
    set_gates,
    tiny_assets,
)

import vlm.eval as E
from vlm import FlamingoProcessor
from vlm.eval.__main__ import main
from vlm.eval.inference import prompt_items


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Width-32 models: intra-op threads only add synchronisation (and spin on a shared machine).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model():
    m, _, _ = build_model("llama")
    set_gates(m, 1.0)  # the images matter
    return m


@pytest.fixture(scope="module")
def flickr(tmp_path_factory):
    root = tmp_path_factory.mktemp("flickr")
    write_flickr(root, num_train=10, num_test=5, num_dev=1)
    return E.load_flickr(root, "test"), E.load_flickr(root, "train")


def _predictions(results, label=("random", False)):
    run = next(r for r in results["runs"] if (r["mode"], r["ablate_images"]) == label)
    return [p["prediction"] for p in run["trials"][0]["predictions"]]


def test_batched_generation_equals_one_query_at_a_time(model, flickr):
    test, train = flickr
    kw = dict(shots=[2], seeds=[0], cache_dir=False, progress=False, max_new_tokens=8)
    one = E.evaluate_captioning(model, test, train, batch_size=1, **kw)
    batched = E.evaluate_captioning(model, test, train, batch_size=4, **kw)  # left padded
    assert _predictions(one) == _predictions(batched)
    assert len(set(_predictions(one))) > 1  # the queries' images make a difference
    trial = batched["runs"][0]["trials"][0]
    assert trial["images_per_s"] > 0 and trial["num_samples"] == 5
    assert batched["protocol"]["num_beams"] == 3 and batched["protocol"]["max_new_tokens"] == 8


def test_ablated_control_ignores_the_images(model, flickr):
    test, train = flickr
    shuffled = E.EvalDataset(test.layout, test.split, test.root, [])
    images = test.image_paths()[::-1]  # the same samples, other images
    shuffled.samples = [E.CaptionSample(s.id, img, s.captions) for s, img in zip(test.samples, images)]
    kw = dict(shots=[2], seeds=[1], ablate_images=True, cache_dir=False, progress=False, batch_size=5, max_new_tokens=8)
    a = E.evaluate_captioning(model, test, train, **kw)
    b = E.evaluate_captioning(model, shuffled, train, **kw)
    assert _predictions(a, ("random", True)) == _predictions(b, ("random", True))
    assert _predictions(a, ("random", False)) != _predictions(b, ("random", False))
    assert [r["ablate_images"] for r in a["runs"]] == [False, True]


def test_class_scores_match_a_direct_forward(model, tmp_path):
    write_image_folder(tmp_path, {"train": 1, "test": 1})
    test = E.load_image_folder(tmp_path, "test")
    task = E.ClassificationTask(class_names=test.class_names + ["hot dog stand"])  # a multi-token name too
    prompts = [task.build_prompt([test[1]], test[0], 1), task.build_prompt([test[2]], test[1], 1)]
    processor = FlamingoProcessor(model.tokenizer, model.image_processor)
    from vlm.eval.inference import _PromptImages

    items = [_PromptImages(prompts, model.image_processor, None)[i] for i in range(2)]
    inputs = processor(items, padding_side="left")
    got = E.class_log_likelihoods(model, inputs, [p.text for p in prompts], task.class_names, model.tokenizer,
                                  normalize_length=False, rows_per_call=2)  # fmt: skip
    tok = model.tokenizer
    for q, p in enumerate(prompts):
        n_ctx = len(tok(p.text)["input_ids"])
        for c, name in enumerate(task.class_names):
            row = processor([items[q][:-1] + [items[q][-1] + name]])
            with torch.no_grad():
                logits = model(row.vision_x, row.input_ids, media_mask=row.media_mask).logits[0]
            ids = row.input_ids[0]
            logp = torch.log_softmax(logits.float(), -1)
            want = sum(logp[t - 1, ids[t]] for t in range(n_ctx, len(ids)))
            torch.testing.assert_close(got[q, c], want, atol=1e-4, rtol=1e-4)
    mean = E.class_log_likelihoods(model, inputs, [p.text for p in prompts], task.class_names, tok)
    n_tokens = torch.tensor([len(tok(prompts[0].text + n)["input_ids"]) - len(tok(prompts[0].text)["input_ids"])
                             for n in task.class_names])  # fmt: skip
    torch.testing.assert_close(mean[0], got[0] / n_tokens, atol=1e-4, rtol=1e-4)


def _export(model, directory):
    return export_with_clip_config(model, directory)


@pytest.mark.slow
def test_command_line_captioning_writes_results(model, tmp_path, capsys):
    base = write_flickr(tmp_path / "src", num_train=10, num_test=6, num_dev=1)
    tar = tar_directory(base, tmp_path / "flickr8k.tar")
    export = _export(model, tmp_path / "export")
    out, cache = tmp_path / "out", tmp_path / "cache"
    argv = ["captioning", "--dataset", "flickr", "--data", str(tar), "--model-dir", str(export), "--shots", "0", "2",
            "--trials", "2", "--modes", "random", "rices", "--ablate-images", "--num-samples", "4", "--batch-size", "4",
            "--query-set-size", "8", "--max-new-tokens", "6", "--out", str(out), "--cache-dir", str(cache), "--quiet"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| rices-ablated | 2 |" in printed and "images/s" in printed
    res = json.loads((out / "results.json").read_text())
    assert res["task"] == "captioning" and res["metric"] == "cider"
    assert res["model"]["source"] == "export" and res["model"]["weights_digest"]
    assert res["data"]["test"]["layout"] == "flickr" and res["data"]["test"]["num_samples"] == 6
    assert res["protocol"]["trial_seeds"] == [42, 43] and res["protocol"]["query_set_size"] == 8
    kinds = [(r["mode"], r["ablate_images"], r["shots"]) for r in res["runs"]]
    assert kinds == [(m, a, k) for m, a in (("random", 0), ("rices", 0), ("random", 1), ("rices", 1)) for k in (0, 2)]
    for run in res["runs"]:
        assert run["num_samples"] == 4 and run["seeds"] == [42, 43] and len(run["trials"]) == 2
        cider = [t["metrics"]["cider"] for t in run["trials"]]
        assert run["mean"]["cider"] == pytest.approx(sum(cider) / 2)
        assert run["std"]["cider"] == pytest.approx(abs(cider[0] - cider[1]) / 2)
        for trial in run["trials"]:
            lines = (out / trial["predictions"]).read_text().splitlines()
            assert len(lines) == 4
            rec = json.loads(lines[0])
            assert {"id", "image", "prediction", "raw", "references", "demonstrations"} <= set(rec)
            assert len(rec["demonstrations"]) == 2 and rec["id"] not in rec["demonstrations"]
    assert (out / "captioning_shots.png").stat().st_size > 1000
    assert len(list((cache / "rices").glob("*.pt"))) == 2  # train and test features, cached
    # paired comparisons: 2-shot vs 0-shot per mode (real and ablated) and each real setting vs its control; the
    # per-image CIDEr of each record averages to its trial's CIDEr, so the paired mean is the difference of means
    means = {(r["mode"], r["ablate_images"], r["shots"]): r["mean"]["cider"] for r in res["runs"]}
    name = lambda m, ab, k: f"{m}{'-ablated' if ab else ''} {k}-shot"  # noqa: E731
    pairs = [((m, ab, 2), (m, ab, 0)) for m in ("random", "rices") for ab in (False, True)]
    pairs += [((m, False, k), (m, True, k)) for m in ("random", "rices") for k in (0, 2)]
    diffs = {(d["a"], d["b"]): d for d in res["paired_differences"]}
    assert set(diffs) == {(name(*a), name(*b)) for a, b in pairs}
    for a, b in pairs:
        d = diffs[(name(*a), name(*b))]
        assert d["difference"] == pytest.approx(means[a] - means[b], abs=1e-6)
        assert d["pairs"] == 8 and d["ci95"][0] <= d["difference"] <= d["ci95"][1]
    assert "paired differences" in printed and "| rices 2-shot - rices 0-shot | cider |" in printed
    # each finished trial is kept in OUT/trials: a rerun of the command (after a kill) reads them back
    assert len(list((out / "trials").glob("*.json"))) == 16 and "read back" not in printed
    assert main(argv) == 0
    assert "16 trial(s) read back from" in capsys.readouterr().out
    again = json.loads((out / "results.json").read_text())
    assert [r["mean"] for r in again["runs"]] == [r["mean"] for r in res["runs"]]


@pytest.mark.slow
def test_vqa_evaluation(model, tmp_path):
    train_paths = write_vqa(tmp_path / "train", "train2014", num_images=6, seed0=400)
    test_paths = write_vqa(tmp_path / "val", "val2014", num_images=2, seed0=500)
    train = E.load_vqa(train_paths["questions"], train_paths["annotations"], train_paths["images"])
    test = E.load_vqa(test_paths["questions"], test_paths["annotations"], test_paths["images"])
    res = E.evaluate_vqa(model, test, train, shots=[0, 2], seeds=[0], mode="rices", cache_dir=False, progress=False)
    for run in res["runs"]:
        preds = run["trials"][0]["predictions"]
        assert len(preds) == 4
        want = 100 * sum(E.vqa_question_accuracy(p["prediction"], p["answers"]) for p in preds) / 4
        assert run["mean"]["accuracy"] == pytest.approx(want)
        assert all(len(p["raw"]) >= len(p["prediction"]) for p in preds)
    assert res["protocol"]["max_new_tokens"] == 5


@pytest.mark.slow
def test_command_line_vqa(model, tmp_path, capsys):
    train = write_vqa(tmp_path / "train", "train2014", num_images=4, seed0=400)
    test = write_vqa(tmp_path / "val", "val2014", num_images=2, seed0=500)
    export = _export(model, tmp_path / "export")
    out = tmp_path / "out"
    argv = ["vqa", "--train-questions", str(train["questions"]), "--train-annotations", str(train["annotations"]),
            "--train-images", str(train["images"]), "--test-questions", str(test["questions"]),
            "--test-annotations", str(test["annotations"]), "--test-images", str(test["images"]),
            "--model-dir", str(export), "--shots", "0", "2", "--trials", "1", "--modes", "random",
            "--num-beams", "1", "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--quiet"]  # fmt: skip
    assert main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["task"] == "vqa" and res["metric"] == "accuracy"
    assert [r["shots"] for r in res["runs"]] == [0, 2] and res["protocol"]["max_new_tokens"] == 5
    for run in res["runs"]:
        preds = [json.loads(x) for x in (out / run["trials"][0]["predictions"]).read_text().splitlines()]
        assert len(preds) == 4  # 2 images x 2 questions
        want = 100 * sum(E.vqa_question_accuracy(p["prediction"], p["answers"]) for p in preds) / 4
        assert run["mean"]["accuracy"] == pytest.approx(want)
    assert "| random | 2 |" in capsys.readouterr().out


@pytest.mark.slow
def test_command_line_karpathy_captioning(model, tmp_path):
    data, images = write_karpathy(tmp_path / "coco", num_train=4, num_restval=2, num_test=3)
    export = _export(model, tmp_path / "export")
    out = tmp_path / "out"
    argv = ["captioning", "--dataset", "karpathy", "--data", str(data), "--images", str(images),
            "--model-dir", str(export), "--shots", "2", "--trials", "1", "--num-beams", "1",
            "--max-new-tokens", "4", "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--quiet"]  # fmt: skip
    assert main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["data"]["test"]["layout"] == "karpathy" and res["data"]["test"]["num_samples"] == 3
    run = res["runs"][0]
    preds = [json.loads(x) for x in (out / run["trials"][0]["predictions"]).read_text().splitlines()]
    assert len(preds) == 3 and all(len(p["references"]) == 5 for p in preds)
    assert all(len(p["demonstrations"]) == 2 for p in preds)


def test_python_dash_m_vlm_eval():
    """The module runs as a program: help lists the three tasks, and a bad call exits with an error, not a trace."""
    ok = subprocess.run([sys.executable, "-m", "vlm.eval", "--help"], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0
    assert all(task in ok.stdout for task in ("captioning", "vqa", "classification"))
    bad = subprocess.run([sys.executable, "-m", "vlm.eval", "captioning", "--data", "x"], capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


@pytest.mark.slow
def test_command_line_classification_on_an_archive(model, tmp_path, capsys):
    write_image_folder(tmp_path / "cifar", {"train": 3, "test": 2})
    archive = tmp_path / "cifar.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for split in ("train", "test"):
            tar.add(tmp_path / "cifar" / split, arcname=split)
    export = _export(model, tmp_path / "export")
    out = tmp_path / "out"
    argv = ["classification", "--data", str(archive), "--model-dir", str(export), "--shots", "2", "--trials", "1",
            "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--quiet"]  # fmt: skip
    assert main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    run = res["runs"][0]
    assert set(run["mean"]) == {"top1", "top5"} and run["mean"]["top5"] == 100.0  # 3 classes
    lines = [json.loads(x) for x in (out / run["trials"][0]["predictions"]).read_text().splitlines()]
    assert len(lines) == 6
    assert run["mean"]["top1"] == pytest.approx(100 * sum(x["correct"] for x in lines) / 6)
    assert all(x["prediction"] == x["top5"][0] for x in lines)
    assert not (out / "classification_shots.png").exists()  # one shot count: no plot


@pytest.mark.slow
def test_openflamingo_checkpoint_route(tmp_path):
    of = import_open_flamingo()
    a = tiny_assets()
    torch.manual_seed(1)
    ref, _, _ = of.create_model_and_transforms(a["clip"], a["clip_ckpt"], a["llama"], a["tokenizer"])
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith(("attn_gate", "ff_gate")):
                p.uniform_(0.5, 1.5)
    path = tmp_path / "checkpoint.pt"
    torch.save(filter_state_dict_like_openflamingo(ref, ref.state_dict()), path)
    model, identity = E.load_model(openflamingo_checkpoint=path, clip_vision_encoder_path=a["clip"],
                                   clip_vision_encoder_pretrained=a["clip_ckpt"], lang_encoder_path=a["llama"],
                                   tokenizer_path=a["tokenizer"], allow_missing_output_rows=True)  # fmt: skip
    assert identity["source"] == "openflamingo" and identity["checkpoint_digest"]
    gates = sorted(b.attn_gate.item() for b in model.gated_cross_attn_layers)
    want = sorted(p.item() for n, p in ref.named_parameters() if n.endswith(".attn_gate"))
    assert gates == pytest.approx(want)
    with pytest.raises(ValueError, match="also needs"):
        E.load_model(openflamingo_checkpoint=path)
    with pytest.raises(SystemExit):
        main(["captioning", "--data", "x"])  # no model given


def test_prompt_items_are_what_the_processor_takes(model):
    items = prompt_items("Output:x<|endofchunk|><image>Output:", [torch.zeros(3, 32, 32)])
    inputs = FlamingoProcessor(model.tokenizer)([items])
    assert inputs.vision_x.shape[:2] == (1, 1)


def test_a_rerun_reuses_finished_trials_and_reruns_what_changed(model, flickr, tmp_path, monkeypatch):
    """A killed evaluation resumes: finished trials are read back (same predictions and scores, no inference);
    a missing, corrupt or stale trial (other generation settings, other model weights) runs again."""
    import vlm.eval.runner as R

    test, train = flickr
    real, calls = R._run_prompts, []

    def counting(task, model, processor, prompts, *args):
        calls.append(args[-1])  # the trial's label
        return real(task, model, processor, prompts, *args)

    monkeypatch.setattr(R, "_run_prompts", counting)
    trials = tmp_path / "trials"
    kw = dict(shots=[0, 2], seeds=[0, 1], cache_dir=False, progress=False, max_new_tokens=6, trials_dir=trials)
    first = E.evaluate_captioning(model, test, train, **kw)
    assert len(calls) == 4 and first["resumed_trials"] == [] and len(list(trials.glob("*.json"))) == 4

    calls.clear()
    again = E.evaluate_captioning(model, test, train, **kw)
    assert calls == [] and len(again["resumed_trials"]) == 4
    for a, b in zip(first["runs"], again["runs"]):
        assert a["mean"] == b["mean"]
        assert [t["predictions"] for t in a["trials"]] == [t["predictions"] for t in b["trials"]]
        assert [t["seconds"] for t in a["trials"]] == [t["seconds"] for t in b["trials"]]

    # the kill happened during the second trial: its file is missing; another file was cut short
    files = sorted(trials.glob("*.json"))
    files[1].unlink()
    files[2].write_text(files[2].read_text()[:20])
    calls.clear()
    resumed = E.evaluate_captioning(model, test, train, **kw)
    assert len(calls) == 2 and len(resumed["resumed_trials"]) == 2
    assert [r["mean"] for r in resumed["runs"]] == [r["mean"] for r in first["runs"]]

    calls.clear()
    E.evaluate_captioning(model, test, train, **{**kw, "max_new_tokens": 5})  # other generation settings
    assert len(calls) == 4
    calls.clear()
    E.evaluate_captioning(model, test, train, **{**kw, "max_new_tokens": 5}, reuse_trials=False)  # same settings
    assert len(calls) == 4
    calls.clear()
    E.evaluate_captioning(model, test, train, **{**kw, "max_new_tokens": 5}, model_info={"weights_digest": "other"})
    assert len(calls) == 4
    calls.clear()
    E.evaluate_captioning(model, test, train, **{**kw, "max_new_tokens": 5}, num_samples=3)  # other samples
    assert len(calls) == 4
    calls.clear()
    other = copy.deepcopy(model)
    with torch.no_grad():
        next(p for p in other.parameters() if p.requires_grad).add_(1e-3)  # other weights, same config
    E.evaluate_captioning(other, test, train, **{**kw, "max_new_tokens": 5}, num_samples=3)
    assert len(calls) == 4
