"""Flamingo model: gates at zero = bare LM, media masking rules, freezing, loss, LM families."""

import pytest
import torch
from vlm_helpers import FAMILIES, build_model, random_images, set_gates, tiny_assets

import vlm
from vlm.cross_attention import media_attention_mask

PROMPT = "a photo<image>of a cat<|endofchunk|><image>a dog in the park<|endofchunk|><image>two birds"


@pytest.fixture(scope="module")
def llama():
    return build_model("llama")


def _encode(tokenizer, texts):
    return tokenizer(texts, return_tensors="pt", padding="longest")


def _bare_lm(family):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_assets()[family]).eval()


def _segments(ids, media_token_id):
    """Per token: the index (1-based) of the latest <image> at or before it, 0 before the first."""
    return (ids == media_token_id).long().cumsum(-1)


@pytest.mark.parametrize("family", FAMILIES)
def test_gates_zero_logits_equal_bare_lm(family):
    model, _, tok = build_model(family)
    assert type(model.lang_encoder) is type(_bare_lm(family))  # composition, no class swapping
    enc = _encode(tok, [PROMPT])
    vx = random_images(1, 3, 1)
    bare = _bare_lm(family)
    captured = []
    bare.get_output_embeddings().register_forward_hook(lambda m, args, out: captured.append(args[0]))
    with torch.no_grad():
        logits = model(vx, enc.input_ids, attention_mask=enc.attention_mask).logits
        embeds = model.lang_embedding(enc.input_ids)  # the added rows for <image>/<|endofchunk|>
        position_ids = torch.arange(enc.input_ids.shape[1])[None]
        ref = bare(inputs_embeds=embeds, attention_mask=enc.attention_mask, position_ids=position_ids).logits
    nb = model.num_base_tokens
    assert logits.shape[-1] == nb + model.num_new_tokens == len(tok)
    assert torch.equal(logits[..., :nb], ref[..., :nb])  # exactly the bare LM
    # The added tokens' columns: the bare LM's final hidden states times the trainable rows.
    torch.testing.assert_close(logits[..., nb:], captured[0] @ model.lang_head.extra.T)


@pytest.mark.parametrize("family", FAMILIES)
def test_open_gates_condition_only_tokens_after_the_first_image(family):
    model, _, tok = build_model(family)
    set_gates(model)
    enc = _encode(tok, [PROMPT])
    first = int((enc.input_ids[0] == model.media_token_id).nonzero()[0])
    vx = random_images(1, 3, 1)
    with torch.no_grad():
        a = model(vx, enc.input_ids).logits
        b = model(random_images(1, 3, 1, seed=1), enc.input_ids).logits
    # The gated MLP acts on all tokens, but pixels reach no token before the first <image>.
    assert torch.equal(a[:, :first], b[:, :first])
    assert (a[:, first:] - b[:, first:]).abs().amax(-1).gt(1e-4).all()


def _no_token_mixing(model):
    """Zero the Llama self-attention output projections: tokens no longer see each other, so each
    token's logits depend only on itself and the media it cross-attends to."""
    with torch.no_grad():
        for layer in model.lang_encoder.get_submodule(model.decoder_layers_path):
            layer.decoder_layer.self_attn.o_proj.weight.zero_()


@pytest.mark.parametrize("immediate", [True, False])
def test_each_token_sees_the_right_images(immediate):
    model, _, tok = build_model("llama", only_attend_immediate_media=immediate)
    set_gates(model)
    _no_token_mixing(model)
    enc = _encode(tok, [PROMPT])
    seg = _segments(enc.input_ids, model.media_token_id)[0]  # (L,)
    vx = random_images(1, 3, 1)
    with torch.no_grad():
        base = model(vx, enc.input_ids).logits[0]
        for k in range(3):
            changed = vx.clone()
            changed[0, k] = random_images(1, seed=10 + k)[0]
            diff = (model(changed, enc.input_ids).logits[0] - base).abs().amax(-1)  # (L,)
            affected = (seg == k + 1) if immediate else (seg >= k + 1)
            assert torch.equal(diff[~affected], torch.zeros_like(diff[~affected])), k
            assert diff[affected].gt(1e-4).all(), k


def test_with_token_mixing_changes_never_flow_backwards(llama):
    model, _, tok = llama
    set_gates(model)
    try:
        enc = _encode(tok, [PROMPT])
        pos = (enc.input_ids[0] == model.media_token_id).nonzero()[:, 0]
        vx = random_images(1, 3, 1)
        with torch.no_grad():
            base = model(vx, enc.input_ids).logits[0]
            for k in range(3):
                changed = vx.clone()
                changed[0, k] = random_images(1, seed=20 + k)[0]
                diff = (model(changed, enc.input_ids).logits[0] - base).abs().amax(-1)
                assert torch.equal(diff[: pos[k]], torch.zeros_like(diff[: pos[k]]))
                assert diff[pos[k] :].gt(1e-5).all()  # image k, then self-attention carries it on
    finally:
        set_gates(model, 0.0)


def test_media_attention_mask_values():
    text_time = torch.tensor([[0, 1, 1, 2, 2, 3]])
    media_mask = torch.tensor([[True, True, False]])
    m = media_attention_mask(text_time, media_mask, num_latents=2, only_attend_immediate_media=True)
    assert m.shape == (1, 1, 6, 6)
    expect_img = torch.tensor([[0, 0, 0], [1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 1, 0], [0, 0, 0]], dtype=torch.bool)
    assert torch.equal(m[0, 0], expect_img.repeat_interleave(2, dim=1))
    m_all = media_attention_mask(text_time, media_mask, num_latents=1, only_attend_immediate_media=False)
    expect_all = torch.tensor([[0, 0, 0], [1, 0, 0], [1, 0, 0], [1, 1, 0], [1, 1, 0], [1, 1, 0]], dtype=torch.bool)
    assert torch.equal(m_all[0, 0], expect_all)


def test_absent_images_are_never_attended(llama):
    model, _, tok = llama
    set_gates(model)
    try:
        enc = _encode(tok, ["<image>a cat<|endofchunk|><image>a dog", "<image>a dog and a cat in the park"])
        vx = random_images(2, 2, 1)
        media_mask = torch.tensor([[True, True], [True, False]])
        with torch.no_grad():
            a = model(vx, enc.input_ids, attention_mask=enc.attention_mask, media_mask=media_mask).logits
            vx2 = vx.clone()
            vx2[1, 1] = random_images(1, seed=5)[0]  # the padding slot of example 1
            b = model(vx2, enc.input_ids, attention_mask=enc.attention_mask, media_mask=media_mask).logits
            latents, _ = model.encode_media(vx, media_mask)
        assert torch.equal(a, b)
        assert torch.equal(latents[1, 1], torch.zeros_like(latents[1, 1]))
        # the padding slot never goes through the vision tower; the real images land in their own slots
        seen = []
        hook = model.vision_encoder.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
        try:
            with torch.no_grad():
                latents, _ = model.encode_media(vx, torch.tensor([[True, False], [True, True]]))
                alone, _ = model.encode_media(vx[1:])
        finally:
            hook.remove()
        assert seen == [3, 2]
        assert torch.equal(latents[0, 1], torch.zeros_like(latents[0, 1]))
        torch.testing.assert_close(latents[1], alone[0])
    finally:
        set_gates(model, 0.0)


def test_text_only_input_equals_bare_lm(llama):
    model, _, tok = llama
    enc = _encode(tok, ["a photo of a dog"])
    with torch.no_grad():
        logits = model(None, enc.input_ids, attention_mask=enc.attention_mask).logits
        ref = _bare_lm("llama")(enc.input_ids, attention_mask=enc.attention_mask).logits
    assert torch.equal(logits[..., : model.num_base_tokens], ref)


def test_trainable_parameters_and_gradients(llama):
    model, _, tok = llama
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(model.added_parameter_names())
    for name in trainable:
        assert name.startswith("perceiver.") or ".gated_cross_attn_layer." in name or name.endswith(".extra"), name
    assert {"lang_encoder.model.embed_tokens.extra", "lang_encoder.lm_head.extra"} <= trainable
    assert not any(p.requires_grad for p in model.vision_encoder.parameters())

    enc = _encode(tok, [PROMPT])
    labels = enc.input_ids.clone()
    labels[labels == model.media_token_id] = -100
    model.zero_grad()
    out = model(random_images(1, 3, 1), enc.input_ids, attention_mask=enc.attention_mask, labels=labels)
    ref = torch.nn.functional.cross_entropy(out.logits[0, :-1], labels[0, 1:], ignore_index=-100)
    torch.testing.assert_close(out.loss, ref)
    out.loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads <= trainable
    # At init only the gates (and the added rows) get gradient through the zero-gated blocks.
    assert all(any(g.endswith(f"{i}.gated_cross_attn_layer.attn_gate") for g in grads) for i in (0, 1))
    assert "lang_encoder.model.embed_tokens.extra" in grads
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_loss_only_gives_the_same_loss_and_gradients(family):
    """loss_only computes the head at the labelled positions only: same loss, same gradients, fewer logits."""
    model, _, tok = build_model(family)
    set_gates(model, 0.5)
    enc = _encode(tok, [PROMPT, "<image>a cat on a mat<|endofchunk|>"])
    labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
    labels[:, :3] = -100
    images = random_images(2, 3, 1)
    results = []
    for loss_only in (False, True):
        model.zero_grad(set_to_none=True)
        out = model(images, enc.input_ids, attention_mask=enc.attention_mask, labels=labels, loss_only=loss_only)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out, grads))
    (full, full_grads), (only, only_grads) = results
    n = int((labels[:, 1:] != -100).sum())
    assert only.logits.shape == (1, n, full.logits.shape[-1])
    torch.testing.assert_close(only.loss, full.loss, rtol=1e-5, atol=1e-6)
    selected = torch.zeros_like(labels, dtype=torch.bool)
    selected[:, :-1] = labels[:, 1:] != -100
    torch.testing.assert_close(only.logits[0], full.logits[selected], rtol=1e-5, atol=1e-5)
    assert full_grads.keys() == only_grads.keys() and full_grads
    for name, grad in full_grads.items():
        torch.testing.assert_close(only_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    model.zero_grad(set_to_none=True)


def test_training_steps_lower_the_loss_and_leave_the_bases_untouched():
    model, _, tok = build_model("gpt2")
    model.train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    enc = _encode(tok, ["<image>a photo of a cat<|endofchunk|><image>a photo of a dog<|endofchunk|>"])
    labels = enc.input_ids.clone()
    labels[labels == model.media_token_id] = -100
    vx = random_images(1, 2, 1)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    losses = []
    for _ in range(6):
        loss = model(vx, enc.input_ids, attention_mask=enc.attention_mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]
    assert all(float(b.attn_gate.abs()) > 0 for b in model.gated_cross_attn_layers)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def test_cross_attention_every_n_layers_and_layer_discovery():
    model, _, _ = build_model("opt", cross_attn_every_n_layers=2)
    layers = model.lang_encoder.get_submodule(model.decoder_layers_path)
    assert model.decoder_layers_path == "model.decoder.layers"
    assert [layer.gated_cross_attn_layer is not None for layer in layers] == [False, True]
    assert all(isinstance(layer, vlm.FlamingoLayer) for layer in layers)
    with pytest.raises(ValueError, match="cross_attn_every_n_layers=3"):
        build_model("opt", cross_attn_every_n_layers=3)
    with pytest.raises(ValueError, match="decoder_layers_attr_name='model.nope'"):
        build_model("opt", decoder_layers_attr_name="model.nope")
    explicit, _, _ = build_model("gpt2", decoder_layers_attr_name="transformer.h")
    assert explicit.decoder_layers_path == "transformer.h"


def test_media_state_is_scoped(llama):
    model, _, tok = llama
    enc = _encode(tok, [PROMPT])
    with torch.no_grad():
        model(random_images(1, 3, 1), enc.input_ids)
    assert model.conditioning.state is None
    assert not model.lang_encoder._forward_pre_hooks
    with pytest.raises(RuntimeError, match="call the Flamingo model"):
        model.lang_encoder(enc.input_ids)
    with pytest.raises(ValueError, match="vision_x has batch 2"):
        model(random_images(2, 3, 1), enc.input_ids)
    assert model.conditioning.state is None  # cleared even when a call fails


def test_input_validation(llama):
    model, _, tok = llama
    ids = _encode(tok, [PROMPT]).input_ids
    with pytest.raises(ValueError, match=r"\(B, T_img, F, C, H, W\)"):
        model(random_images(1, 3), ids)
    with pytest.raises(ValueError, match="media_mask must be bool"):
        model(random_images(1, 3, 1), ids, media_mask=torch.ones(1, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"lang_x must be \(B, T_txt\)"):
        model(random_images(1, 3, 1), ids[0])
    with pytest.raises(ValueError, match="3 <image> tokens but vision_x holds only T_img=2"):
        model(random_images(1, 2, 1), ids)
    with pytest.raises(ValueError, match="vision_x is None"):
        model(None, ids)
    with pytest.raises(ValueError, match="labels shape"):
        model(random_images(1, 3, 1), ids, labels=ids[:, 1:])
    with pytest.raises(ValueError, match="resampler_depth"):
        build_model("llama", resampler_depth=0)


def test_tokenizer_and_image_processor(llama):
    model, image_processor, tok = llama
    from PIL import Image

    assert tok.convert_tokens_to_ids("<image>") == model.media_token_id
    assert tok.convert_tokens_to_ids("<|endofchunk|>") == model.eoc_token_id
    assert tok.pad_token == "<PAD>" and model.num_new_tokens == 3
    assert model.image_processor is image_processor
    x = image_processor(Image.new("RGB", (50, 40), color=(200, 10, 10)))
    assert x.shape == (3, 32, 32)


def test_gated_block_cache_identity_and_no_media():
    torch.manual_seed(0)
    block = vlm.GatedCrossAttentionBlock(16, 8, num_heads=2, head_channels=4, widening_factor=2).eval()
    x, media = torch.randn(2, 5, 16), torch.randn(2, 6, 8)
    text_time = torch.tensor([[0, 1, 1, 2, 2], [1, 1, 1, 1, 1]])
    mask = media_attention_mask(text_time, torch.ones(2, 2, dtype=torch.bool), num_latents=3)
    out, kv = block(x, media, mask)
    assert torch.equal(out, x)  # gates at 0: identity
    with torch.no_grad():
        block.attn_gate.fill_(1.0)
        block.mlp_gate.fill_(1.0)
    fresh, kv = block(x, media, mask)
    cached, kv2 = block(x, media[:, :0], mask, kv_cache=kv)  # no media passed: keys/values reused
    assert kv2 is kv and torch.equal(cached, fresh)
    # A token that sees no image gets no attention output: only the gated MLP changes it.
    expect_first = x[0, 0] + block.mlp(block.mlp_norm(x[0, 0])) * torch.tanh(torch.tensor(1.0))
    torch.testing.assert_close(fresh[0, 0], expect_first)
    empty, _ = block(x, media[:, :0], mask[..., :0])  # no images at all
    torch.testing.assert_close(empty, x + block.mlp(block.mlp_norm(x)) * torch.tanh(torch.tensor(1.0)))


def test_video_frames_with_frame_embeddings():
    model, _, tok = build_model("llama", max_num_frames=2, max_num_media=3)
    set_gates(model)
    enc = _encode(tok, [PROMPT])
    frames = random_images(1, 3, 2)  # (B, T_img, F=2, C, H, W)
    with torch.no_grad():
        a = model(frames, enc.input_ids).logits
        b = model(frames.flip(2), enc.input_ids).logits  # same frames, other order
        latents, _ = model.encode_media(frames)
    assert latents.shape == (1, 3, model.perceiver.num_latents, model.perceiver.num_channels)
    first = int((enc.input_ids[0] == model.media_token_id).nonzero()[0])
    assert (a[:, first:] - b[:, first:]).abs().max() > 1e-4  # frame order is seen


def test_wrapped_layers_delegate_attributes(llama):
    model, _, _ = llama
    layer = model.lang_encoder.get_submodule(model.decoder_layers_path)[0]
    assert layer.self_attn is layer.decoder_layer.self_attn
    with pytest.raises(AttributeError):
        layer.no_such_attribute  # noqa: B018
