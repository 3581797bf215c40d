"""Generation: cached == uncached step-by-step decoding, left padding, beams, sampling, caching."""

import pytest
import torch
from vlm_helpers import FAMILIES, build_model, random_images, set_gates

from vlm import FlamingoProcessor

PROMPTS = [
    [0, "a photo of a cat<|endofchunk|>", 1, "a photo of"],
    [2, "two birds on"],
]


def _inputs(tok, padding_side="left", prompts=PROMPTS, seed=0):
    images = random_images(3, 1, seed=seed)  # (3, 1, C, H, W) video-of-one-frame tensors
    batch = [[images[x] if isinstance(x, int) else x for x in ex] for ex in prompts]
    return FlamingoProcessor(tok)(batch, padding_side=padding_side)


def _double(inputs):
    vx = None if inputs.vision_x is None else inputs.vision_x.double()
    return vx, inputs.input_ids, inputs.attention_mask, inputs.media_mask


def _model(family="llama", **kw):
    model, _, tok = build_model(family, **kw)
    set_gates(model, 1.0)  # make the images matter
    return model.double(), tok


def _reference_greedy(model, vx, ids, am, mm, max_new_tokens):
    """Uncached decoding: recompute the whole sequence at every step, take the argmax
    (<image> excluded, as generate excludes it), pad finished rows like Hugging Face does."""
    eos, pad = model.eoc_token_id, model.pad_token_id
    finished = torch.zeros(ids.shape[0], dtype=torch.bool)
    steps = []
    for _ in range(max_new_tokens):
        with torch.no_grad():
            logits = model(vx, ids, attention_mask=am, media_mask=mm).logits[:, -1].clone()
        logits[:, model.media_token_id] = -float("inf")
        steps.append(logits)
        nxt = torch.where(finished, torch.full_like(finished, pad, dtype=torch.long), logits.argmax(-1))
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        am = torch.cat([am, torch.ones_like(am[:, :1])], dim=1)
        finished |= nxt == eos
        if finished.all():
            break
    return ids, steps


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_greedy_equals_uncached_step_by_step(family):
    model, tok = _model(family)
    vx, ids, am, mm = _double(_inputs(tok))
    assert (am == 0).any()  # the batch is left padded
    out = model.generate(
        vx, ids, attention_mask=am, media_mask=mm, max_new_tokens=6, output_scores=True, return_dict_in_generate=True
    )
    ref_ids, ref_logits = _reference_greedy(model, vx, ids, am, mm, 6)
    assert torch.equal(out.sequences, ref_ids)
    for got, want in zip(out.scores, ref_logits):
        finite = torch.isfinite(want)
        assert torch.equal(torch.isfinite(got), finite)
        torch.testing.assert_close(got[finite], want[finite].to(got.dtype), atol=1e-6, rtol=1e-6)


def test_images_change_the_generation():
    model, tok = _model("llama")
    vx, ids, am, mm = _double(_inputs(tok))
    with torch.no_grad():
        a = model.generate(
            vx,
            ids,
            attention_mask=am,
            media_mask=mm,
            max_new_tokens=4,
            output_scores=True,
            return_dict_in_generate=True,
        )
        b = model.generate(
            -vx,
            ids,
            attention_mask=am,
            media_mask=mm,
            max_new_tokens=4,
            output_scores=True,
            return_dict_in_generate=True,
        )
    finite = torch.isfinite(a.scores[0])
    assert (a.scores[0][finite] - b.scores[0][finite]).abs().max() > 1e-4


def test_left_padded_batch_equals_one_by_one():
    model, tok = _model("llama")
    vx, ids, am, mm = _double(_inputs(tok))
    batch = model.generate(vx, ids, attention_mask=am, media_mask=mm, max_new_tokens=6)
    new_batch = batch[:, ids.shape[1] :]
    for i, prompt in enumerate(PROMPTS):
        svx, sids, sam, smm = _double(_inputs(tok, prompts=[prompt]))
        torch.testing.assert_close(svx[0, : int(smm.sum())], vx[i, : int(smm.sum())])
        single = model.generate(svx, sids, attention_mask=sam, media_mask=smm, max_new_tokens=6)
        new_single = single[0, sids.shape[1] :]
        assert torch.equal(new_batch[i, : len(new_single)], new_single)
        assert (new_batch[i, len(new_single) :] == model.pad_token_id).all()
        # and the prompt logits agree at every real token
        with torch.no_grad():
            lb = model(vx[i : i + 1], ids[i : i + 1], attention_mask=am[i : i + 1], media_mask=mm[i : i + 1]).logits
            ls = model(svx, sids, attention_mask=sam, media_mask=smm).logits
        torch.testing.assert_close(lb[0, am[i].bool()], ls[0], atol=1e-9, rtol=1e-9)


def test_beam_search_cached_equals_uncached():
    model, tok = _model("gpt2")
    vx, ids, am, mm = _double(_inputs(tok))
    kw = dict(attention_mask=am, media_mask=mm, max_new_tokens=5, num_beams=3, num_return_sequences=2)
    cached = model.generate(vx, ids, **kw)
    uncached = model.generate(vx, ids, use_cache=False, **kw)
    assert cached.shape[0] == 4
    assert torch.equal(cached, uncached)
    # Each example's beams use that example's images: the batch equals the examples run alone.
    for i, prompt in enumerate(PROMPTS):
        svx, sids, sam, smm = _double(_inputs(tok, prompts=[prompt]))
        single = model.generate(svx, sids, **{**kw, "attention_mask": sam, "media_mask": smm})
        n = single.shape[1] - sids.shape[1]
        assert torch.equal(cached[2 * i : 2 * i + 2, ids.shape[1] : ids.shape[1] + n], single[:, sids.shape[1] :])


def test_sampling_cached_equals_uncached():
    model, tok = _model("gpt_neox")
    vx, ids, am, mm = _double(_inputs(tok))
    kw = dict(attention_mask=am, media_mask=mm, max_new_tokens=6, do_sample=True, top_k=0, num_return_sequences=2)
    torch.manual_seed(123)
    cached = model.generate(vx, ids, **kw)
    torch.manual_seed(123)
    uncached = model.generate(vx, ids, use_cache=False, **kw)
    assert torch.equal(cached, uncached)


def test_media_is_encoded_and_projected_once_per_prompt():
    model, tok = _model("llama")
    vx, ids, am, mm = _double(_inputs(tok))
    calls = {"vision": 0, "kv": 0, "lm": 0}
    projected_rows = []

    def counter(key):
        def hook(*_):
            calls[key] += 1

        return hook

    def kv_rows(module, args, out):
        projected_rows.append(args[0].shape[1])  # media tokens whose keys were computed

    handles = [model.vision_encoder.register_forward_hook(counter("vision"))]
    handles += [b.attention.k_proj.register_forward_hook(kv_rows) for b in model.gated_cross_attn_layers]
    handles.append(model.lang_encoder.register_forward_hook(counter("lm")))
    try:
        # min_new_tokens keeps all 6 steps (no early stop at <|endofchunk|>)
        model.generate(vx, ids, attention_mask=am, media_mask=mm, max_new_tokens=6, min_new_tokens=6, num_beams=2)
    finally:
        for h in handles:
            h.remove()
    assert calls["lm"] == 6
    assert calls["vision"] == 1
    # The images' latents are projected to keys/values once per block (on the prompt); the later
    # steps reuse them and project no media at all.
    n_media = vx.shape[1] * model.perceiver.num_latents
    assert sorted(r for r in projected_rows if r) == [n_media] * len(model.gated_cross_attn_layers)
    assert len(projected_rows) == 6 * len(model.gated_cross_attn_layers)
    assert model.conditioning.state is None


def test_media_token_is_never_generated_and_eoc_stops():
    model, tok = _model("llama")
    vx, ids, am, mm = _double(_inputs(tok))
    head = model.lang_head
    captured = []
    handle = head.register_forward_hook(lambda m, args, out: captured.append(args[0][:, -1]))
    with torch.no_grad():
        model(vx, ids, attention_mask=am, media_mask=mm)
    handle.remove()
    with torch.no_grad():
        saved = head.extra.clone()
        k = model.media_token_id - model.num_base_tokens
        favourite = 1000 * captured[0].mean(0)
        head.extra[k] = favourite  # make <image> the favourite
    try:
        out = model.generate(vx, ids, attention_mask=am, media_mask=mm, max_new_tokens=5)
        assert not (out[:, ids.shape[1] :] == model.media_token_id).any()
        with torch.no_grad():
            logits = model(vx, ids, attention_mask=am, media_mask=mm).logits[:, -1]
        assert (logits.argmax(-1) == model.media_token_id).all()  # it would have been chosen
        with torch.no_grad():
            head.extra.copy_(saved)
            j = model.eoc_token_id - model.num_base_tokens
            head.extra[j] = favourite  # now <|endofchunk|> is the favourite: stop at once
        out = model.generate(vx, ids, attention_mask=am, media_mask=mm, max_new_tokens=5)
        assert out.shape[1] == ids.shape[1] + 1 and (out[:, -1] == model.eoc_token_id).all()
    finally:
        with torch.no_grad():
            head.extra.copy_(saved)


def test_generate_text_only_prompt():
    model, tok = _model("opt")
    inputs = FlamingoProcessor(tok)([["a photo of"], ["the quick brown"]])
    assert inputs.vision_x is None
    out = model.generate(None, inputs.input_ids, attention_mask=inputs.attention_mask, max_new_tokens=3)
    ref, _ = _reference_greedy(model, None, inputs.input_ids, inputs.attention_mask, None, 3)
    assert torch.equal(out, ref)
