"""recipes/flickr8k_flamingo.py: its training documents read as vlm.eval's few-shot prompts token for token, and the
whole recipe -- shards, DeepSpeed training, vlm.eval, results -- runs on a tiny Flickr-layout data set made here."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from data_helpers import make_tokenizer
from eval_helpers import tar_directory, write_flickr
from train_helpers import ROOT

from data_pipelines.tokenization import document_text, encode, pair_text
from recipes.flickr8k_flamingo import build_documents, caption_prompt_prefix
from vlm.eval import CaptioningTask, load_flickr


def test_documents_are_few_shot_prompts_token_for_token(tmp_path):
    write_flickr(tmp_path, num_train=8, num_test=1, num_dev=1)
    train = load_flickr(tmp_path, "train")
    prefix = caption_prompt_prefix()
    assert prefix == "Output:"
    docs = build_documents(train, num_docs=20, images_per_doc=(2, 5), seed=0, prefix=prefix)
    assert {len(d["image_info"]) for d in docs} == {2, 3, 4, 5}
    by_name = {s.image.split("/")[-1]: s for s in train}
    task = CaptioningTask()
    tokenizer = make_tokenizer(words=tuple(" ".join(s for t in train for s in t.captions).replace(",", " ").split()))
    for doc in docs:
        samples = [by_name[info["image_name"]] for info in doc["image_info"]]
        assert [info["matched_text_index"] for info in doc["image_info"]] == list(range(len(samples)))
        for sentence, sample in zip(doc["text_list"], samples):
            assert sentence[len(prefix) :] in sample.captions
        # how the loader renders the document == the (k-1)-shot prompt + the last caption
        text = document_text(doc["text_list"], [i["matched_text_index"] for i in doc["image_info"]], "</s>")
        demos = [type(s)(s.id, s.image, [c[len(prefix) :]]) for s, c in zip(samples, doc["text_list"])]
        prompt = task.prompt(demos[:-1], demos[-1], zero_shot=False)
        assert text == prompt + doc["text_list"][-1][len(prefix) :] + "<|endofchunk|></s>"
        doc_ids, prompt_ids = encode(tokenizer, [text, prompt], max_length=512)
        assert doc_ids[: len(prompt_ids)] == prompt_ids
    # a pair is the zero-shot prompt's query with its caption
    query = task.prompt([], train[0], zero_shot=True)
    assert pair_text(train[0].captions[0], "</s>", prefix) == query + train[0].captions[0] + "<|endofchunk|></s>"


@pytest.mark.slow
def test_recipe_end_to_end_on_tiny_flickr(tmp_path):
    base = write_flickr(tmp_path / "src", num_train=24, num_test=6, num_dev=6)
    data = tar_directory(base, tmp_path / "flickr8k.tar")
    out = tmp_path / "out"
    sets = [
        f"data.cache_dir={tmp_path / 'cache'}",  # the tiny random bases are built there
        "run.max_steps=4",
        "optim.warmup_steps=1",  # the warmup ends before run.max_steps
        "run.num_threads=1",
        "data.pairs.batch_size=4",
        "data.pairs.group_by_length=2",  # windows of 8 pairs sorted by length
        "data.pairs.max_length=64",
        "data.documents.batch_size=2",
        "data.documents.max_length=256",
        "data.val.batch_size=3",
        "eval.every_steps=2",
        "eval.batches=1",
        "eval.num_generations=1",
        "eval.max_new_tokens=4",
        "checkpoint.every_steps=0",
        "logging.tensorboard=false",
    ]
    args = [
        "--data", str(data), "--out", str(out), "--config", "configs/tiny-random.yaml",
        *[x for s in sets for x in ("--set", s)],
        "--num-docs", "12", "--doc-images", "2", "3", "--shots", "0", "4", "--trials", "1", "--num-samples", "4",
        "--eval-batch-size", "4", "--cache-dir", str(tmp_path / "eval-cache"), "--no-progress",
    ]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "recipes/flickr8k_flamingo.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    results = json.loads((out / "results.json").read_text())
    assert results["splits"] == {"train": 24, "dev": 6, "test": 6}
    assert results["shards"]["train_pairs"]["samples"] == 24 and results["shards"]["dev_pairs"]["samples"] == 6
    assert results["shards"]["train_docs"]["samples"] == 12 and results["shards"]["train_docs"]["images"] >= 24
    train = results["training"]
    assert train["steps"] == train["max_steps"] == 4 and not train["stopped_by_time_limit"]
    assert train["samples_seen"] == 4 * (4 + 2)
    assert 0 <= train["padding_fraction"] < 1 and train["tokens_seen"] > 0
    assert train["group_by_length"] == {"pairs": 2, "documents": 1}
    assert all(math.isfinite(train[k]) and train[k] > 0 for k in ("final_train_loss", "final_val_loss"))
    assert set(train["final_train_loss_per_stream"]) == {"pairs", "documents"}
    assert [v["step"] for v in train["val_losses"]] == [2, 4]
    assert all(math.isfinite(v[k]) for v in train["val_losses"] for k in ("loss", "ablated_loss", "shuffled_loss"))
    assert train["precision"] in ("fp32", "bf16") and train["launcher"] in ("deepspeed", "python")
    assert train["wall_seconds"] > 0 and train["cpu_seconds"] > 0
    launcher = {"deepspeed": "deepspeed", "python": sys.executable}[train["launcher"]]
    assert results["commands"]["train"][0] == launcher
    assert "--config" in results["commands"]["train"] and "training/train.py" in results["commands"]["train"]

    ev = results["evaluation"]
    assert (ev["test_images"], ev["images_per_trial"], ev["subset"]) == (6, 4, True)
    settings = {(s["mode"], s["ablate_images"], s["shots"]) for s in ev["settings"]}
    assert settings == {(m, a, k) for m in ("random", "rices") for a in (False, True) for k in (0, 4)}
    for s in ev["settings"]:
        assert len(s["trials"]) == 1 and s["num_samples"] == 4
        for metric in ("cider", "bleu4"):
            assert math.isfinite(s[metric]["mean"]) and s[metric]["mean"] >= 0 and s[metric]["std"] == 0
    targets = ev["targets"]
    assert set(targets["four_shot_not_worse_than_zero_shot"]) == {"random", "rices"}
    assert set(targets["cider_over_ablated"]) == {f"{m} {k}-shot" for m in ("random", "rices") for k in (0, 4)}
    by_key = {(s["mode"], s["ablate_images"], s["shots"]): s["cider"]["mean"] for s in ev["settings"]}
    for mode, d in targets["four_minus_zero_shot_cider"].items():  # the paired comparison of the same setting means
        assert d["difference"] == pytest.approx(by_key[(mode, False, 4)] - by_key[(mode, False, 0)], abs=1e-6)
        assert d["ci95"][0] <= d["difference"] <= d["ci95"][1] and d["pairs"] == 4
    assert set(targets["four_minus_zero_shot_cider"]) == {"random", "rices"}
    assert "4-shot minus 0-shot CIDEr, rices" in proc.stdout
    for name in ("samples.png", "loss_curve.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # a second run reuses the shards and the finished training, and evaluates again
    proc = subprocess.run(
        [sys.executable, "recipes/flickr8k_flamingo.py", *args, "--no-ablation", "--modes", "random"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "reusing" in proc.stdout and "[training" not in proc.stdout.replace("[training] reusing", "")
    again = json.loads((out / "results.json").read_text())
    assert again["training"]["steps"] == 4 and len(again["evaluation"]["settings"]) == 2


def _binding_results(acc: dict, ablated: dict, proto: dict) -> dict:
    runs = []
    for (w, k), a in acc.items():
        runs.append({"ways": w, "shots": k, "ablate_images": False, "num_samples": 10, "trials": [{}],
                     "mean": {"accuracy": a}, "std": {"accuracy": 0.0}})  # fmt: skip
        runs.append({"ways": w, "shots": k, "ablate_images": True, "num_samples": 10, "trials": [{}],
                     "mean": {"accuracy": ablated[(w, k)]}, "std": {"accuracy": 0.0}})  # fmt: skip
    prototype = {f"{w}-way": {str(k): {"mean": v} for (ww, k), v in proto.items() if ww == w} for w, _ in acc}
    return {"runs": runs, "prototype": prototype, "data": {"classes": ["cat", "deer"]}}


def test_binding_summary_and_targets():
    from recipes.flickr8k_flamingo import binding_targets, summarize_binding

    acc = {(2, 0): 0.0, (2, 1): 90.0, (2, 3): 95.0, (4, 0): 1.0, (4, 1): 60.0, (4, 3): 70.0}
    ablated = {(2, 0): 0.0, (2, 1): 52.0, (2, 3): 49.0, (4, 0): 0.0, (4, 1): 31.0, (4, 3): 24.0}
    proto = {(2, 1): 80.0, (2, 3): 90.0, (4, 1): 64.0, (4, 3): 77.0}
    unseen = summarize_binding(_binding_results(acc, ablated, proto))
    row = next(s for s in unseen["settings"] if (s["ways"], s["shots"]) == (4, 1))
    assert row["open_ended"] == 60.0 and row["ablated_open_ended"] == 31.0 and row["prototype"] == 64.0
    assert row["chance"] == 25.0 and row["closed"] is None
    seen = summarize_binding(_binding_results({k: v + 1 for k, v in acc.items()}, ablated, proto))
    t = binding_targets(unseen, seen)
    assert t["2-way 1-shot >= 85"] == {"value": 90.0, "met": True}
    assert t["4-way 1-shot >= 65"] == {"value": 60.0, "met": False}
    assert t["2-way 3-shot > 1-shot"]["met"] and t["4-way 3-shot > 1-shot"]["met"]
    assert t["at_least_prototype_every_setting"]["2-way 1-shot"]["met"]
    assert not t["at_least_prototype_every_setting"]["4-way 1-shot"]["met"]
    assert (
        t["ablated_within_5_of_chance"]["2-way 1-shot"]["met"]
        and not t["ablated_within_5_of_chance"]["4-way 1-shot"]["met"]
    )
    assert t["zero_shot_open_ended"] == {"2-way": 0.0, "4-way": 1.0}
    assert all(v["met"] for v in t["seen_at_least_unseen"].values())
