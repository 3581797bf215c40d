"""Loading an export is strict and portable: non-float or non-finite weights are refused by name, an export with
its own bases loads from wherever it is copied, an unreachable hub id fails fast naming the config file, and
vlm.eval gives no score to a model whose outputs are not finite."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from vlm_helpers import build_model, export_with_clip_config

from vlm import Flamingo

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = "flamingo_weights.safetensors"


def _saved(tmp_path: Path) -> tuple[Path, dict]:
    model, _, _ = build_model("llama")
    directory = export_with_clip_config(model, tmp_path / "export")
    return directory, load_file(str(directory / WEIGHTS))


def test_integer_and_bool_weights_are_refused_by_name(tmp_path):
    directory, tensors = _saved(tmp_path)
    name = "perceiver.latents"
    save_file({**tensors, name: tensors[name].to(torch.int32)}, str(directory / WEIGHTS))
    with pytest.raises(
        ValueError, match=r"must be floating point; 1 tensor\(s\) are not: perceiver.latents \(torch.int32\)"
    ):
        Flamingo.from_pretrained(directory)
    gate = next(n for n in tensors if n.endswith("attn_gate"))
    save_file({**tensors, gate: tensors[gate] > 0}, str(directory / WEIGHTS))
    with pytest.raises(ValueError, match=rf"{gate} \(torch.bool\)"):
        Flamingo.from_pretrained(directory)


def test_nan_and_inf_weights_are_refused_by_name(tmp_path):
    directory, tensors = _saved(tmp_path)
    latents = tensors["perceiver.latents"].clone()
    latents.view(-1)[:3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    save_file({**tensors, "perceiver.latents": latents}, str(directory / WEIGHTS))
    with pytest.raises(
        ValueError, match=r"non-finite values in 1 tensor\(s\): perceiver.latents \(3 of \d+ values NaN/Inf\)"
    ):
        Flamingo.from_pretrained(directory)


def test_vlm_eval_refuses_a_model_with_non_finite_outputs(tmp_path, monkeypatch):
    from vlm.eval.models import check_finite_outputs, load_model

    model, _, _ = build_model("llama")
    check_finite_outputs(model)  # a healthy model passes
    with torch.no_grad():  # finite weights whose outputs overflow: the guard is on the outputs, not the file
        model.lang_encoder.model.norm.weight.fill_(3e38)
    with pytest.raises(ValueError, match="logits are not finite .*refusing to evaluate"):
        check_finite_outputs(model)
    directory, tensors = _saved(tmp_path)
    model, identity = load_model(model_dir=directory)  # the load path runs the check
    assert identity["source"] == "export"


def _tiny_export(tmp_path: Path) -> Path:
    import vlm
    from training.config import TinyBasesConfig
    from training.modeling import export_pretrained
    from training.tiny_bases import ensure_tiny_bases

    bases = ensure_tiny_bases(TinyBasesConfig(), tmp_path / "cache")
    torch.manual_seed(0)
    model, _, _ = vlm.create_model_and_transforms(**bases.names(), cross_attn_every_n_layers=1)
    with torch.no_grad():
        for block in model.gated_cross_attn_layers:
            block.attn_gate.fill_(0.5)
    return export_pretrained(model, tmp_path / "original", bases), model


def test_an_export_with_its_own_bases_loads_from_wherever_it_is_copied(tmp_path):
    original, model = _tiny_export(tmp_path)
    config = json.loads((original / "flamingo_config.json").read_text())["config"]
    assert config["lang_encoder_path"] == "./bases/lm" and config["tokenizer_path"] == "./bases/tokenizer"
    ids = torch.tensor([[model.media_token_id, 5, 6, 7]])
    images = torch.randn(1, 1, 1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model.eval()(images, ids).logits
    copy = tmp_path / "elsewhere" / "copy"
    shutil.copytree(original, copy)
    shutil.rmtree(original)
    shutil.rmtree(tmp_path / "cache")  # nothing of the training run is left
    loaded = Flamingo.from_pretrained(copy).eval()
    with torch.no_grad():
        assert torch.equal(loaded(images, ids).logits, want)
    assert Path(loaded.tokenizer.name_or_path).resolve().is_relative_to(copy.resolve())


def test_an_older_export_with_absolute_paths_loads_its_own_copy(tmp_path):
    original, _ = _tiny_export(tmp_path)
    meta_path = original / "flamingo_config.json"
    meta = json.loads(meta_path.read_text())
    for key, sub in (("lang_encoder_path", "lm"), ("tokenizer_path", "tokenizer")):
        meta["config"][key] = str(original / "bases" / sub)  # what exports used to store
    meta_path.write_text(json.dumps(meta))
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)
    shutil.rmtree(original)
    loaded = Flamingo.from_pretrained(copy)
    assert Path(loaded.tokenizer.name_or_path).resolve().is_relative_to(copy.resolve())


def test_an_unreachable_hub_id_fails_fast_naming_the_config(tmp_path, monkeypatch):
    directory, _ = _saved(tmp_path)
    meta_path = directory / "flamingo_config.json"
    meta = json.loads(meta_path.read_text())
    meta["config"]["lang_encoder_path"] = meta["config"]["tokenizer_path"] = "no-such-org/no-such-model"
    meta_path.write_text(json.dumps(meta))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(OSError, match=r"flamingo_config.json names .*no-such-org/no-such-model"):
        Flamingo.from_pretrained(directory)
    assert time.monotonic() - start < 20


def test_hub_probe_says_offline_quickly(monkeypatch):
    from vlm import bases

    monkeypatch.setattr(bases, "_HUB_REACHABLE", {})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert bases.hub_reachable() is False
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    start = time.monotonic()
    assert bases.hub_reachable(timeout=1.0) is False
    assert time.monotonic() - start < 5


def test_generate_loads_an_export_with_its_bundled_vision_config(tmp_path):
    original, _ = _tiny_export(tmp_path)
    from PIL import Image

    query = tmp_path / "q.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(query)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "vlm.generate",
            "--model-dir",
            str(original),
            "--query",
            str(query),
            "--max-new-tokens",
            "3",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith(str(query))
