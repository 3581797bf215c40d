"""The main job on its default, pretrained frozen bases, end to end for a few steps: only the added parts train,
precision follows the machine, and the final few-shot report carries the image-ablated control."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from train_helpers import ROOT

from training.config import load_config
from training.distributed import cpu_bf16_features, resolve_precision

pytestmark = pytest.mark.slow


def test_default_job_on_pretrained_bases(tmp_path):
    out = tmp_path / "run"
    args = [
        f"run.output_dir={out}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "run.max_steps=3",
        "optim.warmup_steps=0",
        "data.synthetic.num_pairs=240",  # enough one-group scenes of the three episode classes
        "data.synthetic.num_docs=8",
        "data.synthetic.num_val_pairs=8",
        "data.pairs.batch_size=4",
        "data.documents.batch_size=1",
        "data.val.batch_size=4",
        "eval.every_steps=0",
        "eval.final_queries=4",
        "eval.max_new_tokens=6",
        "eval.binding_episodes=4",
        "eval.binding_ways=[2, 3]",
        "eval.binding_shots=[0, 1]",
        "data.episodes={sources: [{shards: 'synthetic:pairs'}], batch_size: 1, max_length: 64, max_images: 4, "
        "min_images: 3, episodes: {ways: [2, 2], shots: [1, 1], queries: [1, 1], loss_on: answers, "
        "classes: ['red circle', 'green square', 'blue triangle']}}",
        "checkpoint.every_steps=0",
        "logging.progress_bar=false",
        "logging.tensorboard=false",
    ]
    proc = subprocess.run(
        [sys.executable, "training/train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    expected, _ = resolve_precision(load_config(None).run, "cpu")
    assert f"precision: {expected}" in proc.stdout
    assert ("bf16" if cpu_bf16_features() else "fp32") == expected
    assert "images ablated:" in proc.stdout
    report = json.loads((out / "few_shot.json").read_text())
    assert report["num_queries"] == 4 and len(report["ablated_samples"]) == 4
    assert set(report["images"]) == set(report["ablated"]) == {
        "exact_match", "well_formed", "attribute_accuracy", "position_accuracy", "shape_accuracy", "colour_accuracy",
        "count_accuracy",
    }  # fmt: skip
    # the binding table: every (ways, shots) with its controls, split by the training episodes' classes
    assert "binding: held-out scenes named with made-up words" in proc.stdout
    rows = report["binding"]["table"]
    assert [(r["ways"], r["shots"]) for r in rows] == [(2, 0), (2, 1), (3, 0), (3, 1)]
    assert report["binding"]["trained_classes"] == ["blue triangle", "green square", "red circle"]
    assert len(report["binding"]["held_out_classes"]) == 12
    for r in rows:
        assert r["trained_episodes"] + r["held_out_episodes"] == 4
        assert (r["prototype"] is None) == (r["shots"] == 0) and r["ablated"] is not None
    assert (out / "binding.json").is_file()
    # the export holds the added parts only: the frozen bases are rebuilt from their names
    from safetensors import safe_open

    with safe_open(str(out / "export" / "flamingo_weights.safetensors"), "pt") as f:
        names = list(f.keys())
    assert names and not any(n.startswith("vision_encoder.") for n in names)
    assert not any(".decoder_layer." in n for n in names)
    meta = json.loads((out / "export" / "flamingo_config.json").read_text())["config"]
    assert (meta["clip_vision_encoder_path"], meta["lang_encoder_path"]) == ("efficientnet-lite0", "smollm2-135m")
