"""save_pretrained / from_pretrained, few-shot API and the command line."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from vlm_helpers import build_model, random_images, set_gates, tiny_assets

import vlm
from vlm import Flamingo, FlamingoConfig, few_shot
from vlm.generate import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
TEXT = ["<image>a photo of a cat<|endofchunk|><image>a dog"]


def _perturb_added(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    set_gates(model, 0.7)
    with torch.no_grad():
        for name in model.added_parameter_names():
            p = dict(model.named_parameters())[name]
            p.add_(0.1 * torch.randn(p.shape, generator=g))


def _logits(model, tok):
    enc = tok(TEXT, return_tensors="pt")
    with torch.no_grad():
        return model(random_images(1, 2, 1), enc.input_ids, attention_mask=enc.attention_mask).logits


@pytest.mark.parametrize("pretrained", [None, "ckpt"])
def test_round_trip(tmp_path, pretrained):
    model, _, tok = build_model("gpt2", pretrained=pretrained)
    _perturb_added(model)
    model.save_pretrained(tmp_path)
    meta = json.loads((tmp_path / "flamingo_config.json").read_text())
    assert meta["config"]["lang_encoder_path"] == tiny_assets()["gpt2"]
    assert meta["config"]["clip_vision_encoder_path"] == tiny_assets()["clip"]
    saved = set(load_file(str(tmp_path / "flamingo_weights.safetensors")))
    vision = {n for n in saved if n.startswith("vision_encoder.")}
    assert saved - vision == set(model.added_parameter_names())
    # a random vision tower cannot be rebuilt from its name, so it is saved; a checkpoint file can
    assert bool(vision) == (pretrained is None)
    again = Flamingo.from_pretrained(tmp_path).eval()
    assert torch.equal(_logits(again, tok), _logits(model, tok))


def test_round_trip_with_a_narrower_resampler(tmp_path):
    """resampler_channels: the tower's features are projected down; media, cross-attention and export follow."""
    model, _, tok = build_model("llama", resampler_channels=12)
    assert model.perceiver.num_channels == 12 and model.perceiver.input_projection.in_features == 32
    assert all(block.attention.k_proj.in_features == 12 for block in model.gated_cross_attn_layers)
    _perturb_added(model)
    model.save_pretrained(tmp_path)
    assert "perceiver.input_projection.weight" in set(load_file(str(tmp_path / "flamingo_weights.safetensors")))
    again = Flamingo.from_pretrained(tmp_path).eval()
    assert again.config.resampler_channels == 12
    assert torch.equal(_logits(again, tok), _logits(model, tok))


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="flamingo_config.json"):
        Flamingo.from_pretrained(tmp_path)
    model, _, _ = build_model("gpt2")
    model.save_pretrained(tmp_path)
    weights = tmp_path / "flamingo_weights.safetensors"
    tensors = load_file(str(weights))
    save_file({**tensors, "perceiver.bogus": torch.zeros(1)}, str(weights))
    with pytest.raises(ValueError, match=r"unknown \['perceiver\.bogus'\]"):
        Flamingo.from_pretrained(tmp_path)
    save_file({k: v for k, v in tensors.items() if k != "perceiver.latents"}, str(weights))
    with pytest.raises(ValueError, match=r"missing \['perceiver\.latents'\]"):
        Flamingo.from_pretrained(tmp_path)


def test_config_validation():
    with pytest.raises(ValueError, match="FlamingoConfig.cross_attn_every_n_layers must be a positive int, got 0"):
        FlamingoConfig("m", None, "lm", "tok", cross_attn_every_n_layers=0)
    with pytest.raises(ValueError, match="unknown FlamingoConfig keys \\['nope'\\]"):
        FlamingoConfig.from_dict(
            {
                "clip_vision_encoder_path": "m",
                "clip_vision_encoder_pretrained": None,
                "lang_encoder_path": "lm",
                "tokenizer_path": "tok",
                "nope": 1,
            }
        )


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("fewshot")
    model, _, _ = build_model("llama")
    _perturb_added(model, seed=1)
    model.save_pretrained(d / "model")
    paths = []
    for i, color in enumerate([(250, 0, 0), (0, 250, 0), (0, 0, 250), (200, 200, 0)]):
        path = d / f"img{i}.png"
        Image.new("RGB", (40, 36), color=color).save(path)
        paths.append(str(path))
    return model, d / "model", paths


def test_few_shot_matches_generate_and_batches(saved_model):
    model, _, paths = saved_model
    images = [Image.open(p).convert("RGB") for p in paths]
    demos = [(images[0], "red"), (images[1], "green")]
    out = few_shot(model, demos, images[2:], prompt_prefix="Output:", max_new_tokens=5)
    assert len(out) == 2 and all(isinstance(s, str) for s in out)
    # one query at a time gives the same completions as the left-padded batch
    assert [few_shot(model, demos, [q], prompt_prefix="Output:", max_new_tokens=5)[0] for q in images[2:]] == out
    # and they are the decoded new tokens of model.generate on the processor's inputs
    proc = vlm.FlamingoProcessor(model.tokenizer, model.image_processor)
    inputs = proc([vlm.build_few_shot_prompt(demos, images[2], "Output:")])
    gen = model.generate(inputs.vision_x, inputs.input_ids, attention_mask=inputs.attention_mask, max_new_tokens=5)
    new = gen[0, inputs.input_ids.shape[1] :].tolist()
    new = new[: new.index(model.eoc_token_id)] if model.eoc_token_id in new else new
    assert out[0] == model.tokenizer.decode(new, skip_special_tokens=True)


def test_command_line(saved_model, capsys):
    model, model_dir, paths = saved_model
    args = ["--model-dir", str(model_dir), "--clip-config", tiny_assets()["clip_dir"],
            "--demo", paths[0], "red", "--demo", paths[1], "green",
            "--query", paths[2], "--query", paths[3], "--prefix", "Output:", "--max-new-tokens", "5"]  # fmt: skip
    assert cli_main(args) == 0
    lines = capsys.readouterr().out.strip("\n").split("\n")
    images = [Image.open(p).convert("RGB") for p in paths]
    expected = few_shot(model, [(images[0], "red"), (images[1], "green")], images[2:], "Output:", max_new_tokens=5)
    assert lines == [f"{paths[2]}\t{expected[0]}", f"{paths[3]}\t{expected[1]}"]


def test_command_line_entry_point():
    res = subprocess.run([sys.executable, "-m", "vlm.generate", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "--model-dir" in res.stdout and "--demo IMAGE TEXT" in res.stdout and "--query IMAGE" in res.stdout
