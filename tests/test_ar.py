"""Perceiver AR: causality, cached decoding vs full forward, window restarts, sampling filters, overfitting."""

import pytest
import torch
import torch.nn.functional as F

from perceiver import (
    PerceiverAR,
    PerceiverARConfig,
    RotaryPositionEmbedding,
    SelfAttentionLayer,
    sample_next_token,
    top_k_filter,
    top_p_filter,
)

VOCAB = 13


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny models: a second thread only adds contention on a shared machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_model(position_encoding="rotary", dtype=torch.float32, **kw) -> PerceiverAR:
    cfg = dict(
        vocab_size=VOCAB,
        max_seq_len=20,
        num_latents=6,
        num_channels=32,
        num_heads=4,
        num_self_attention_layers=2,
        position_encoding=position_encoding,
    )
    cfg.update(kw)
    return PerceiverAR(PerceiverARConfig(**cfg)).to(dtype).eval()


# ------------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(num_latents=30), "num_latents=30 must be <= max_seq_len=20"),
        (dict(num_heads=5), "num_channels=32 is not divisible by num_heads=5"),
        (dict(position_encoding="alibi"), "position_encoding must be one of"),
        (dict(rotary_dim=3), "rotary_dim=3 must be even"),
        (dict(rotary_dim=16), r"rotary_dim=16 must be even and in \(0, head_dim=8\]"),
        (dict(position_encoding="learned", rotary_dim=4), "rotary_dim=4 is set but position_encoding='learned'"),
        (dict(num_latents=0), "num_latents must be a positive int"),
        (dict(cross_attention_dropout=1.0), r"cross_attention_dropout must be in \[0, 1\)"),
    ],
)
def test_config_validation_names_field_and_value(kw, match):
    base = dict(vocab_size=VOCAB, max_seq_len=20, num_latents=6, num_channels=32, num_heads=4)
    base.update(kw)
    with pytest.raises(ValueError, match=match):
        PerceiverARConfig(**base)


def test_config_round_trips_through_dict():
    cfg = PerceiverARConfig(vocab_size=VOCAB, max_seq_len=20, num_latents=6, num_channels=32, num_heads=4)
    assert PerceiverARConfig.from_dict(cfg.to_dict()) == cfg


def test_bad_inputs_are_rejected_with_clear_errors():
    model = make_model()
    with pytest.raises(ValueError, match="exceeds max_seq_len=20"):
        model(torch.zeros(1, 21, dtype=torch.long))
    with pytest.raises(ValueError, match=r"num_latents=7 must be in \[1, min\(input length 10"):
        model(torch.zeros(1, 10, dtype=torch.long), num_latents=7)
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, vocab_size=13\)"):
        model(torch.full((1, 10), VOCAB))
    _, cache = model(torch.zeros(1, 10, dtype=torch.long), num_latents=5, return_cache=True)
    with pytest.raises(ValueError, match="recompute the window"):
        model.extend(torch.zeros(1, 2, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="top_p must be in"):
        model.generate(torch.zeros(1, 3, dtype=torch.long), 2, top_p=0.0)


# --------------------------------------------------------------------------------------------- structure


@pytest.mark.parametrize("position_encoding", ["rotary", "learned"])
def test_causality_and_prefix_influence(position_encoding):
    model = make_model(position_encoding)
    x = torch.randint(0, VOCAB, (2, 16))
    n = 6  # latents are positions 10..15
    base = model(x)
    for t in (11, 13):
        y = x.clone()
        y[:, t] = (y[:, t] + 1) % VOCAB
        out = model(y)
        i = t - (16 - n)  # latent index of position t
        torch.testing.assert_close(out[:, :i], base[:, :i])  # earlier positions do not see token t
        assert (out[:, i:] - base[:, i:]).abs().amax(dim=-1).min() > 1e-4  # t and later do
    # a prefix token reaches every latent through the cross-attention
    y = x.clone()
    y[:, 2] = (y[:, 2] + 1) % VOCAB
    assert (model(y) - base).abs().amax(dim=-1).min() > 1e-4


def test_rotary_scores_depend_only_on_position_difference():
    rope = RotaryPositionEmbedding(8)
    q, k = torch.randn(1, 2, 5, 12), torch.randn(1, 2, 5, 12)  # 12 channels: the last 4 pass through
    pos = torch.arange(5)[None]
    qr, kr = rope.qk_transform(pos, pos)(q, k)
    qs, ks = rope.qk_transform(pos + 37, pos + 37)(q, k)
    torch.testing.assert_close(qr @ kr.transpose(-1, -2), qs @ ks.transpose(-1, -2))
    torch.testing.assert_close(qr[..., 8:], q[..., 8:])  # channels beyond rotary_dim are untouched
    torch.testing.assert_close(qr.norm(dim=-1), q.norm(dim=-1))  # a rotation
    assert not torch.allclose(qr, q)


def test_loss_is_cross_entropy_of_latent_predictions():
    model = make_model()
    tokens = torch.randint(0, VOCAB, (3, 17))
    logits = model(tokens[:, :-1])  # (3, 6, V)
    expected = F.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, -6:].reshape(-1))
    torch.testing.assert_close(model.loss(tokens), expected)


def test_prefix_dropout_keeps_latents_and_a_sorted_prefix_subset():
    model = make_model(cross_attention_dropout=0.5).train()
    x = torch.randn(3, 16, 32)
    pos = torch.arange(16).expand(3, -1)
    kx, kpos, _ = model._drop_prefix(x, pos, None, 6)
    assert kpos.shape == (3, 5 + 6)  # round(10 * 0.5) prefix positions + all 6 latents
    assert torch.equal(kpos[:, 5:], pos[:, 10:])
    assert (kpos[:, :5].diff(dim=1) > 0).all() and (kpos[:, :5] < 10).all()
    torch.testing.assert_close(kx, x.gather(1, kpos[..., None].expand(-1, -1, 32)))
    # in eval mode nothing is dropped: the output is deterministic and differs from a training pass
    tokens = torch.randint(0, VOCAB, (2, 16))
    train_out = model(tokens)
    model.eval()
    torch.testing.assert_close(model(tokens), model(tokens))
    assert not torch.allclose(train_out, model(tokens))


# ------------------------------------------------------------------------------------------------- cache


def test_self_attention_layer_cache_matches_full_causal_forward():
    layer = SelfAttentionLayer(16, num_heads=2, causal=True).eval()
    x = torch.randn(2, 7, 16)
    full = layer(x)
    out, kv = layer(x[:, :4], return_kv=True)
    steps = [out]
    for t in range(4, 7):
        out, kv = layer(x[:, t : t + 1], kv_cache=kv, return_kv=True)
        steps.append(out)
    torch.testing.assert_close(torch.cat(steps, dim=1), full)
    assert kv[0].shape == (2, 2, 7, 8)


@pytest.mark.parametrize("position_encoding", ["rotary", "learned"])
@pytest.mark.parametrize("padded", [False, True])
def test_incremental_cached_logits_equal_full_forward(position_encoding, padded):
    model = make_model(position_encoding)
    x = torch.randint(0, VOCAB, (3, 18))
    pad = None
    if padded:  # left padding: rows with 0, 2 and 5 pad tokens
        pad = torch.ones(3, 18, dtype=torch.bool)
        pad[1, :2] = False
        pad[2, :5] = False
    full = model(x, pad_mask=pad)  # latents = positions 12..17
    logits, cache = model(x[:, :14], None if pad is None else pad[:, :14], num_latents=2, return_cache=True)
    steps = [logits]
    for t in (14, 15):  # one token at a time, then two at once
        logits, cache = model.extend(x[:, t : t + 1], cache)
        steps.append(logits)
    logits, cache = model.extend(x[:, 16:18], cache)
    steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.seq_len == 18 and cache.num_latents == 6


def test_left_padding_gives_the_same_logits_as_the_unpadded_row():
    model = make_model("learned")
    row = torch.randint(0, VOCAB, (1, 12))
    padded = torch.cat([torch.randint(0, VOCAB, (1, 4)), row], dim=1)
    pad = torch.ones(1, 16, dtype=torch.bool)
    pad[:, :4] = False
    torch.testing.assert_close(model(padded, pad_mask=pad), model(row))


# -------------------------------------------------------------------------------------------- generation


@pytest.mark.parametrize("position_encoding", ["rotary", "learned"])
@pytest.mark.parametrize("num_latents", [1, 3, 6])
@pytest.mark.parametrize(
    "sampling",
    [dict(temperature=0.0), dict(temperature=1.0), dict(temperature=0.8, top_k=4, top_p=0.9)],
    ids=["greedy", "sample", "sample-topk-topp"],
)
def test_generate_with_cache_equals_without(position_encoding, num_latents, sampling):
    # 50 new tokens after a 9-token prompt run far past max_seq_len=20 and num_latents=6: many window restarts
    model = make_model(position_encoding, dtype=torch.float64)
    prompt = torch.randint(0, VOCAB, (2, 9))
    runs = []
    for use_cache in (True, False):
        gen = torch.Generator().manual_seed(123)
        runs.append(model.generate(prompt, 50, num_latents=num_latents, generator=gen, use_cache=use_cache, **sampling))
    assert runs[0].shape == (2, 59)
    assert torch.equal(runs[0][:, :9], prompt)
    assert torch.equal(runs[0], runs[1])


def test_generate_float32_greedy_cache_equals_no_cache():
    model = make_model("rotary")
    prompt = torch.randint(0, VOCAB, (3, 5))
    a = model.generate(prompt, 40, temperature=0.0, use_cache=True)
    b = model.generate(prompt, 40, temperature=0.0, use_cache=False)
    assert torch.equal(a, b)


def test_left_padded_batch_generation_equals_per_row_generation():
    model = make_model("rotary", dtype=torch.float64, max_seq_len=32)
    rows = [torch.randint(0, VOCAB, (1, n)) for n in (7, 4, 6)]
    batch = torch.zeros(3, 7, dtype=torch.long)
    pad = torch.zeros(3, 7, dtype=torch.bool)
    for i, r in enumerate(rows):
        batch[i, 7 - r.shape[1] :] = r[0]
        pad[i, 7 - r.shape[1] :] = True
    # 12 new tokens: the windows stay within max_seq_len, latents restart twice (num_latents=6)
    out = model.generate(batch, 12, pad_mask=pad, num_latents=2, temperature=0.0)
    for i, r in enumerate(rows):
        alone = model.generate(r, 12, num_latents=2, temperature=0.0)
        assert torch.equal(out[i, 7:], alone[0, r.shape[1] :])


def test_generate_restores_training_mode():
    model = make_model().train()
    model.generate(torch.zeros(1, 3, dtype=torch.long), 3)
    assert model.training


# --------------------------------------------------------------------------------------------- sampling


def test_top_k_filter_keeps_exactly_the_k_largest():
    logits = torch.randn(4, 50)
    out = top_k_filter(logits, 7)
    kept = torch.isfinite(out)
    assert (kept.sum(-1) == 7).all()
    top = logits.topk(7, dim=-1).indices
    assert kept.gather(1, top).all()
    torch.testing.assert_close(out[kept], logits[kept])


def test_top_p_filter_keeps_the_smallest_set_reaching_p():
    logits = torch.randn(6, 40) * 2
    p = 0.7
    out = top_p_filter(logits, p)
    probs = logits.softmax(-1)
    for row in range(6):
        kept = torch.isfinite(out[row])
        mass = probs[row][kept].sum()
        assert mass >= p
        # minimal: without its least likely member the kept set falls below p
        assert mass - probs[row][kept].min() < p
        # and it is a top set: every kept token is more likely than every removed one
        if (~kept).any():
            assert probs[row][kept].min() >= probs[row][~kept].max()
    assert torch.isfinite(top_p_filter(logits, 1e-6)).sum(-1).eq(1).all()  # tiny p keeps only the argmax


def test_sampling_respects_filters_and_temperature():
    torch.manual_seed(0)
    logits = torch.randn(1, 30).expand(4000, -1).contiguous()
    allowed = torch.isfinite(top_p_filter(top_k_filter(logits[:1], 5), 0.8))[0]
    tokens = sample_next_token(logits, temperature=1.0, top_k=5, top_p=0.8)
    assert allowed[tokens].all()
    assert len(tokens.unique()) == int(allowed.sum())
    torch.testing.assert_close(sample_next_token(logits, temperature=0.0), logits.argmax(-1))
    torch.testing.assert_close(sample_next_token(logits, top_k=1), logits.argmax(-1))
    # temperature: empirical frequencies follow softmax(logits / T)
    small = torch.tensor([[0.0, 1.0, 2.0]]).expand(20000, -1)
    counts = torch.bincount(sample_next_token(small, temperature=2.0), minlength=3).float() / 20000
    torch.testing.assert_close(counts, (small[0] / 2.0).softmax(-1), atol=0.015, rtol=0)


# ---------------------------------------------------------------------------------------------- training


def test_overfits_a_tiny_sequence_and_regenerates_it():
    torch.manual_seed(0)
    model = make_model("rotary", max_seq_len=16, num_latents=8).train()
    seq = torch.randint(0, VOCAB, (1, 17))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):
        loss = model.loss(seq)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.02, loss.item()  # chance is ln 13 = 2.56 nats
    model.eval()
    # the first latent of a restarted window sees the same 9 tokens as the first latent in training
    out = model.generate(seq[:, :9], 8, num_latents=1, temperature=0.0)
    assert torch.equal(out, seq)
