"""Wrong inputs are errors naming the value and what was expected; exported weights load only when complete;
the tanh of the attention gate."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from vlm_helpers import IMAGE_SIZE, build_model, random_images, set_gates

import vlm
from vlm import Flamingo, FlamingoProcessor
from vlm.cross_attention import media_attention_mask

PROMPT = "<image>a photo of a cat<|endofchunk|>"


@pytest.fixture(scope="module")
def llama():
    model, image_processor, tok = build_model("llama")
    set_gates(model, 0.5)
    return model, FlamingoProcessor(tok, image_processor), tok


def _ids(tok, text=PROMPT):
    return tok([text], return_tensors="pt").input_ids


# ------------------------------------------------------------------------------------------------ vision_x


@pytest.mark.parametrize(
    "make, fragment",
    [
        (
            lambda: torch.randn(1, 1, 1, 3, 16, 16),
            r"\(C, H, W\)=\(3, 16, 16\), but the vision tower takes \(3, 32, 32\)",
        ),
        (
            lambda: torch.randn(1, 1, 1, 1, 32, 32),
            r"\(C, H, W\)=\(1, 32, 32\), but the vision tower takes \(3, 32, 32\)",
        ),
        (lambda: torch.randint(0, 255, (1, 1, 1, 3, 32, 32), dtype=torch.uint8), r"dtype torch\.uint8; expected"),
        (
            lambda: random_images(1, 1, 1).double(),
            r"dtype torch\.float64, but the vision tower's weights are torch\.float32",
        ),
    ],
    ids=["height-width", "channels", "uint8", "float64"],
)
def test_bad_pixels_name_the_value_and_the_expectation(llama, make, fragment):
    model, _, tok = llama
    with pytest.raises(ValueError, match=fragment):
        model(make(), _ids(tok))
    with pytest.raises(ValueError, match=fragment):
        model.generate(make(), _ids(tok), max_new_tokens=2)


def test_model_reports_its_image_shape_and_positions(llama):
    model, proc, _ = llama
    from PIL import Image

    assert model.image_shape == (3, IMAGE_SIZE, IMAGE_SIZE)
    assert tuple(proc.image_processor(Image.new("RGB", (40, 30))).shape) == model.image_shape
    assert model.max_positions == 128  # the tiny Llama's max_position_embeddings


# ------------------------------------------------------------------------------------------------ lang_x


def test_empty_prompt(llama):
    model, _, _ = llama
    empty = torch.zeros(1, 0, dtype=torch.long)
    with pytest.raises(ValueError, match=r"lang_x is empty \(shape \(1, 0\)\)"):
        model(None, empty)
    with pytest.raises(ValueError, match=r"lang_x is empty"):
        model.generate(None, empty, max_new_tokens=2)


def test_prompt_longer_than_the_lm_positions(llama):
    model, _, tok = llama
    long = _ids(tok).repeat(1, 40)[:, :129]  # 129 tokens, the LM has 128 positions
    images = random_images(1, int((long == model.media_token_id).sum()), 1)
    with pytest.raises(ValueError, match=r"lang_x has 129 tokens per row, more than the language model's 128"):
        model(images, long)
    prompt = long[:, :100]
    images = random_images(1, int((prompt == model.media_token_id).sum()), 1)
    with pytest.raises(ValueError, match=r"prompt of 100 tokens plus max_new_tokens=40 exceeds .* 128 positions"):
        model.generate(images, prompt, max_new_tokens=40)
    assert model.generate(images, prompt, max_new_tokens=28).shape[1] <= 128  # within the limit: runs


def test_float_token_ids(llama):
    model, _, tok = llama
    with pytest.raises(ValueError, match="integer token ids, got dtype torch.float32"):
        model(None, _ids(tok, "a cat").float())


# ------------------------------------------------------------------------------------------------ processor


def test_processor_rejects_empty_inputs(llama):
    _, proc, _ = llama
    with pytest.raises(ValueError, match="batch is empty"):
        proc([])
    with pytest.raises(ValueError, match=r"example\(s\) \[0\] give no tokens"):
        proc([[""]])
    with pytest.raises(ValueError, match=r"example\(s\) \[1\] give no tokens"):
        proc([["a cat"], []])


def test_processor_rejects_nonfinite_and_integer_images(llama):
    _, proc, _ = llama
    image = random_images(1)[0]
    image[0, 3, 4] = float("nan")
    with pytest.raises(ValueError, match=r"example 1, image 0: image tensor holds 1 NaN/Inf value"):
        proc([["a cat"], [image, "a cat"]])
    image[0, 3, 4] = float("inf")
    with pytest.raises(ValueError, match="NaN/Inf"):
        proc([[image, "x"]])
    with pytest.raises(ValueError, match=r"image tensor has dtype torch\.uint8; expected preprocessed floating"):
        proc([[torch.zeros(3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8), "x"]])

    def poisoned(pil):
        return torch.full((3, IMAGE_SIZE, IMAGE_SIZE), float("nan"))

    from PIL import Image

    with pytest.raises(ValueError, match="image_processor output holds"):
        FlamingoProcessor(proc.tokenizer, poisoned)([[Image.new("RGB", (8, 8)), "x"]])


# ------------------------------------------------------------------------------------------------ from_pretrained


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A model with a random vision tower (saved with its weights) and one overridden base parameter."""
    model, _, _ = build_model("gpt2", pretrained=None)
    set_gates(model, 0.3)
    base_name = "lang_encoder.transformer.h.0.decoder_layer.mlp.c_fc.weight"
    with torch.no_grad():
        dict(model.named_parameters())[base_name].add_(0.5)
    model.overridden_base_parameters = {base_name}
    directory = tmp_path_factory.mktemp("saved")
    model.save_pretrained(directory)
    return model, directory, base_name


def _rewrite(directory, tmp_path, edit):
    """A copy of the saved model whose weight file is ``edit(tensors)``."""
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(directory, out)
    weights = out / "flamingo_weights.safetensors"
    save_file(edit(load_file(str(weights))), str(weights))
    return out, weights


def test_saved_model_round_trips_with_its_overrides(saved):
    model, directory, base_name = saved
    meta = json.loads((directory / "flamingo_config.json").read_text())
    assert meta["overridden_base_parameters"] == [base_name]
    again = Flamingo.from_pretrained(directory)
    assert torch.equal(dict(again.named_parameters())[base_name], dict(model.named_parameters())[base_name])
    assert again.overridden_base_parameters == {base_name}


def test_weights_without_the_vision_tower_are_refused(saved, tmp_path):
    _, directory, _ = saved
    out, weights = _rewrite(directory, tmp_path, lambda t: {k: v for k, v in t.items() if "vision_encoder." not in k})
    n = sum(1 for k in load_file(str(directory / "flamingo_weights.safetensors")) if k.startswith("vision_encoder."))
    assert n > 10
    with pytest.raises(ValueError) as err:
        Flamingo.from_pretrained(out)
    message = str(err.value)
    assert str(weights) in message and f"({n} tensors)" in message and "missing ['vision_encoder." in message


def test_weights_without_cross_attention_are_refused(saved, tmp_path):
    _, directory, _ = saved
    out, weights = _rewrite(directory, tmp_path, lambda t: {k: v for k, v in t.items() if "gated_cross_attn" not in k})
    with pytest.raises(ValueError, match=r"missing \['lang_encoder\.transformer\.h\.0\.gated_cross_attn_layer\."):
        Flamingo.from_pretrained(out)


def test_a_listed_override_must_be_in_the_file(saved, tmp_path):
    _, directory, base_name = saved
    out, _ = _rewrite(directory, tmp_path, lambda t: {k: v for k, v in t.items() if k != base_name})
    with pytest.raises(ValueError, match=rf"missing \['{base_name}'\] \(1 tensor\)"):
        Flamingo.from_pretrained(out)


def test_an_unlisted_base_tensor_is_unexpected(saved, tmp_path):
    model, directory, _ = saved
    other = "lang_encoder.transformer.h.1.decoder_layer.mlp.c_fc.weight"
    value = dict(model.named_parameters())[other].detach().clone()
    out, _ = _rewrite(directory, tmp_path, lambda t: {**t, other: value})
    with pytest.raises(ValueError, match=rf"unexpected \['{other}'\] \(1 tensor\)"):
        Flamingo.from_pretrained(out)


def test_a_wrong_shape_is_named(saved, tmp_path):
    _, directory, _ = saved
    out, weights = _rewrite(directory, tmp_path, lambda t: {**t, "perceiver.latents": t["perceiver.latents"][:1]})
    with pytest.raises(ValueError, match=r"perceiver\.latents: saved \(1, \d+\), model \(4, \d+\)"):
        Flamingo.from_pretrained(out)


# ------------------------------------------------------------------------------------------------ gates


def test_attention_and_mlp_gates_are_tanh_squashed():
    """x + tanh(a) * attn(LN(x)) then + tanh(f) * MLP(LN(.)): with a = 2 the attention is scaled by tanh(2)=0.96,
    not 2 (and a = -3 by -0.995)."""
    torch.manual_seed(0)
    block = vlm.GatedCrossAttentionBlock(16, 8, num_heads=2, head_channels=4, widening_factor=2).eval()
    x, media = torch.randn(2, 5, 16), torch.randn(2, 6, 8)
    text_time = torch.tensor([[1, 1, 1, 2, 2], [1, 1, 2, 2, 2]])
    mask = media_attention_mask(text_time, torch.ones(2, 2, dtype=torch.bool), num_latents=3)
    attended = block.attention(block.norm(x), media, attn_mask=mask)
    assert attended.abs().min() > 0  # every token sees an image here
    for a, f in ((2.0, 0.0), (-3.0, 0.0), (0.0, 1.5)):
        with torch.no_grad():
            block.attn_gate.fill_(a)
            block.mlp_gate.fill_(f)
            out, _ = block(x, media, mask)
        h = x + torch.tanh(torch.tensor(a)) * attended
        expected = h + torch.tanh(torch.tensor(f)) * block.mlp(block.mlp_norm(h))
        torch.testing.assert_close(out, expected)
