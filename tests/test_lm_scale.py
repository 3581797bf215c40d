"""Cross-attention outputs sized to the frozen LM (model.match_lm_scale) and the resampler latents' init scale."""

from __future__ import annotations

import pytest
import torch

from training.config import ConfigError, OptimConfig, load_config
from training.modeling import build_model, lm_hidden_scales, output_projections, resolve_bases
from training.optim import build_optimizer

TINY = "configs/tiny-random.yaml"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("lm-scale-cache"))


def tiny_model(cache, *overrides, seed=0):
    cfg = load_config(TINY, list(overrides)).model
    bases, _ = resolve_bases(cfg, cache)
    return build_model(cfg, bases, seed=seed)


def batch(model, tokenizer, seed=0):
    from data_pipelines.tokenization import FlamingoTokens, tokenize_pairs

    g = torch.Generator().manual_seed(seed)
    c, h, w = model.image_shape
    vision_x = torch.rand(2, 1, 1, c, h, w, generator=g) * 2 - 1
    text = tokenize_pairs(
        tokenizer, ["a red circle on the left.", "two blue squares."], FlamingoTokens.from_tokenizer(tokenizer), 32
    )
    return vision_x, text


def test_scales_are_the_median_token_rms_entering_each_block(cache):
    model, _, tok = tiny_model(cache, "model.gate_init=null")  # gates at 0: the LM computes what it did alone
    text = "a red circle on the left and two blue squares at the top."
    ids = tok(text, return_tensors="pt")["input_ids"]
    layers = [m for m in model.lang_encoder.modules() if type(m).__name__ == "FlamingoLayer"]
    entering = []
    hooks = [
        layer.decoder_layer.register_forward_pre_hook(
            lambda m, args, kwargs: entering.append((args[0] if args else kwargs["hidden_states"]).detach()),
            with_kwargs=True,
        )
        for layer in layers
        if layer.gated_cross_attn_layer is not None
    ]
    with torch.no_grad():
        model(vision_x=None, lang_x=ids)
    for h in hooks:
        h.remove()
    expected = [float(x[0, 1:].pow(2).mean(-1).sqrt().median()) for x in entering]
    assert len(expected) == len(model.gated_cross_attn_layers) >= 2
    assert lm_hidden_scales(model, tok, text) == pytest.approx(expected, rel=1e-5)
    assert model.training  # the calibration pass restores the mode


def test_scaled_init_and_learning_rate_train_like_a_multiplier_on_the_outputs(cache):
    """With Adam, s * W trained at s * lr (weight decay / s) is W trained behind a fixed output multiplier s."""
    scaled, _, tok = tiny_model(cache, "model.match_lm_scale=true")
    plain, _, _ = tiny_model(cache, "model.match_lm_scale=false")
    scales = lm_hidden_scales(plain, tok)
    assert all(s > 0 for s in scales) and max(scales) / min(scales) > 1.01  # distinct per layer
    for block_s, block_p, s in zip(scaled.gated_cross_attn_layers, plain.gated_cross_attn_layers, scales):
        for ws, wp in zip(output_projections(block_s), output_projections(block_p)):
            torch.testing.assert_close(ws, wp * s)  # the same draw, s times larger
        for mod in (block_p.attention, block_p.mlp):  # the reference: plain weights, outputs multiplied by s
            mod.register_forward_hook(
                lambda m, a, out, s=s: (out[0] * s, *out[1:]) if isinstance(out, tuple) else out * s
            )
    cfg = OptimConfig(lr=3e-3, weight_decay=0.1, warmup_steps=0, eps=1e-16)  # eps is not scale-invariant
    opt_s, opt_p = build_optimizer(scaled, cfg), build_optimizer(plain, cfg)
    assert len(opt_s.param_groups) > len(opt_p.param_groups)
    vision_x, text = batch(plain, tok)
    for _ in range(4):
        losses = []
        for model, opt in ((scaled, opt_s), (plain, opt_p)):
            loss = model(vision_x, text["input_ids"], attention_mask=text["attention_mask"], labels=text["labels"]).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        assert losses[0] == pytest.approx(losses[1], rel=1e-4, abs=1e-5)
    for block_s, block_p, s in zip(scaled.gated_cross_attn_layers, plain.gated_cross_attn_layers, scales):
        for ws, wp in zip(output_projections(block_s), output_projections(block_p)):
            torch.testing.assert_close(ws, wp * s, rtol=1e-4, atol=1e-5 * float(ws.detach().abs().max()))


def test_latents_init_std(cache):
    small, _, _ = tiny_model(cache, "model.latents_init_std=0.1")
    default, _, _ = tiny_model(cache)  # tiny-random keeps the model's unit-variance latents
    assert float(small.perceiver.latents.std()) == pytest.approx(0.1, rel=0.25)
    assert float(default.perceiver.latents.std()) == pytest.approx(1.0, rel=0.25)
    for bad in ("0", "-0.5", "nan"):
        with pytest.raises(ConfigError, match=r"model\.latents_init_std"):
            load_config(TINY, [f"model.latents_init_std={bad}"])


def test_the_default_and_flickr8k_use_both_and_the_other_configs_neither():
    for preset in (None, "configs/flickr8k.yaml"):
        model = load_config(preset).model
        assert model.match_lm_scale and model.latents_init_std == 0.1
    for preset in ("configs/openflamingo-3b.yaml", TINY):  # OpenFlamingo's recipe, smoke runs
        cfg = load_config(preset).model
        assert not cfg.match_lm_scale and cfg.latents_init_std is None
