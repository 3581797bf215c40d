import math

import pytest
import torch
from torch.testing import assert_close

from perceiver.attention import CrossAttentionLayer, MultiHeadAttention, SelfAttentionLayer, causal_mask


def naive_attention(mha: MultiHeadAttention, x_q, x_kv, mask=None):
    """Textbook attention with explicit softmax; fully-masked rows -> 0."""
    h = mha.num_heads
    q = mha.q_proj(x_q)
    k = mha.k_proj(x_kv)
    v = mha.v_proj(x_kv)
    b, nq, _ = q.shape
    nk = k.shape[1]
    q = q.reshape(b, nq, h, -1).permute(0, 2, 1, 3)
    k = k.reshape(b, nk, h, -1).permute(0, 2, 1, 3)
    v = v.reshape(b, nk, h, -1).permute(0, 2, 1, 3)
    q, k = mha.q_norm(q), mha.k_norm(k)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is not None:
        m = mask.expand(b, h, nq, nk)
        scores = scores.masked_fill(~m, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        probs = torch.where(m.any(-1, keepdim=True), probs, torch.zeros_like(probs))
    else:
        probs = torch.softmax(scores, dim=-1)
    out = (probs @ v).permute(0, 2, 1, 3).reshape(b, nq, -1)
    return mha.o_proj(out)


@pytest.mark.parametrize("qk_layernorm", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_sdpa_matches_naive_values_and_gradients(qk_layernorm, masked):
    mha = MultiHeadAttention(
        num_heads=4,
        num_q_input_channels=24,
        num_kv_input_channels=20,
        qk_channels=32,
        v_channels=16,
        output_channels=12,
        qk_layernorm=qk_layernorm,
    ).double()
    x_q = torch.randn(3, 7, 24, dtype=torch.float64, requires_grad=True)
    x_kv = torch.randn(3, 11, 20, dtype=torch.float64, requires_grad=True)
    mask = None
    if masked:
        mask = torch.rand(3, 1, 7, 11) > 0.4
        mask[0, 0, 2] = False  # one fully-masked query row
    out = mha(x_q, x_kv, mask)
    ref = naive_attention(mha, x_q, x_kv, mask)
    assert out.shape == (3, 7, 12)
    assert_close(out, ref)

    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x_q, x_kv, *mha.parameters()], g)
    grads_ref = torch.autograd.grad(ref, [x_q, x_kv, *mha.parameters()], g)
    for a, b in zip(grads, grads_ref):
        assert_close(a, b)


def test_fully_masked_rows_are_zero_and_finite():
    mha = MultiHeadAttention(2, 8, 8)
    x_q = torch.randn(2, 4, 8, requires_grad=True)
    x_kv = torch.randn(2, 5, 8, requires_grad=True)
    mask = torch.ones(2, 4, 5, dtype=torch.bool)
    mask[1] = False  # every query of sample 1 sees nothing
    mask[0, 3] = False  # and one row of sample 0
    out = mha(x_q, x_kv, mask)
    bias = mha.o_proj.bias
    # zero attention output -> output projection of 0 = its bias
    assert_close(out[1], bias.expand(4, 8))
    assert_close(out[0, 3], bias)
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(x_q.grad).all() and torch.isfinite(x_kv.grad).all()
    assert torch.count_nonzero(x_kv.grad[1]) == 0  # masked keys get no gradient


def test_mask_must_be_boolean():
    mha = MultiHeadAttention(2, 8, 8)
    with pytest.raises(TypeError, match="boolean"):
        mha(torch.randn(1, 3, 8), torch.randn(1, 3, 8), torch.ones(1, 3, 3))


def test_heads_must_divide_channels():
    with pytest.raises(ValueError, match="qk_channels=30 must be divisible by num_heads=4"):
        MultiHeadAttention(4, 16, 16, qk_channels=30)


def test_causal_flag_equals_explicit_mask_and_cache_equals_full():
    mha = MultiHeadAttention(2, 16, 16).eval()
    x = torch.randn(2, 9, 16)
    full = mha(x, x, is_causal=True)
    assert_close(full, mha(x, x, causal_mask(9, 9)))
    # query i must not see key j > i: perturbing the last token leaves earlier outputs unchanged
    x2 = x.clone()
    x2[:, -1] += 1.0
    assert_close(mha(x2, x2, is_causal=True)[:, :-1], full[:, :-1])
    # incremental: prefix computed once, the last 3 queries with the cached keys/values
    _, cache = mha(x[:, :6], x[:, :6], is_causal=True, return_kv=True)
    step = mha(x[:, 6:], x[:, 6:], is_causal=True, kv_cache=cache)
    assert_close(step, full[:, 6:])


def test_cached_keys_alone_are_reused_without_copy():
    """Fixed keys/values (e.g. an image's, reused at every decoding step): no new keys -> the cache as is."""
    mha = MultiHeadAttention(2, 16, 12).eval()
    q, kv = torch.randn(2, 3, 16), torch.randn(2, 5, 12)
    mask = torch.rand(2, 3, 5) > 0.3
    full, cache = mha(q, kv, mask, return_kv=True)
    out, again = mha(q, kv[:, :0], mask, kv_cache=cache, return_kv=True)
    assert_close(out, full)
    assert again[0] is cache[0] and again[1] is cache[1]


def test_cross_attention_layer_structure():
    """x = attn(LN(q), LN(kv)) + q; x + MLP(LN(x)) - computed by hand from the submodules."""
    layer = CrossAttentionLayer(16, 10, num_heads=2, qk_channels=8, widening_factor=2).eval()
    q, kv = torch.randn(2, 4, 16), torch.randn(2, 6, 10)
    h = naive_attention(layer.attention, layer.q_norm(q), layer.kv_norm(kv)) + q
    ref = h + layer.mlp(layer.mlp_norm(h))
    assert_close(layer(q, kv), ref)
    # without the query residual the queries only enter through attention
    layer_nr = CrossAttentionLayer(16, 10, num_heads=2, use_query_residual=False).eval()
    h = naive_attention(layer_nr.attention, layer_nr.q_norm(q), layer_nr.kv_norm(kv))
    assert_close(layer_nr(q, kv), h + layer_nr.mlp(layer_nr.mlp_norm(h)))


def test_cross_attention_qk_default_follows_shape_for_attention():
    assert CrossAttentionLayer(16, 10, shape_for_attention="kv").attention.qk_channels == 10
    assert CrossAttentionLayer(16, 10, shape_for_attention="q").attention.qk_channels == 16
    with pytest.raises(ValueError, match="shape_for_attention"):
        CrossAttentionLayer(16, 10, shape_for_attention="x")


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_form_selectable(approximate):
    layer = SelfAttentionLayer(8, num_heads=2, gelu_approximate=approximate)
    assert layer.mlp[1].approximate == approximate
    x = torch.linspace(-3, 3, 7)
    expected = (
        0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
        if approximate == "tanh"
        else 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))
    )
    assert_close(layer.mlp[1](x), expected)


def _bf16_attention_case(masked: bool):
    torch.manual_seed(0)
    q = torch.randn(2, 4, 9, 16, requires_grad=True)
    k = torch.randn(2, 4, 13, 16, requires_grad=True)
    v = torch.randn(2, 4, 13, 16, requires_grad=True)
    mask = None
    if masked:
        mask = torch.rand(2, 1, 9, 13) > 0.4
        mask[1, 0, 3] = False  # a fully-masked query row
    return q, k, v, mask


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_bf16_cpu_attention_takes_the_explicit_path_and_matches_fp32(monkeypatch, masked, causal):
    """bf16 on CPU runs attention as matmul + softmax (faster than the CPU flash kernel there): same values and
    gradients as the fp32 SDPA reference within bf16 tolerance, fully-masked rows zero, and the same result as
    bf16 SDPA."""
    import perceiver.attention as A

    q, k, v, mask = _bf16_attention_case(masked)
    calls = []
    explicit = A._explicit_attention
    monkeypatch.setattr(A, "_explicit_attention", lambda *a: calls.append(1) or explicit(*a))

    def run(dtype):
        out = A.attend(q.to(dtype), k.to(dtype), v.to(dtype), mask, causal, 0.0)
        grads = torch.autograd.grad(out.float().square().sum(), [q, k, v])
        return out.float(), grads

    ref, ref_grads = run(torch.float32)
    assert not calls  # fp32 keeps SDPA
    out, grads = run(torch.bfloat16)
    assert calls == [1]
    monkeypatch.setattr(A, "EXPLICIT_ATTENTION_MAX_SCORES", 0)
    sdpa, sdpa_grads = run(torch.bfloat16)
    assert calls == [1]  # over the size limit: SDPA
    for a, b in [(out, ref), (sdpa, ref), *zip(grads, ref_grads), *zip(sdpa_grads, ref_grads)]:
        assert torch.isfinite(a).all()
        assert_close(a, b, atol=0.05, rtol=0.05)
    if masked:
        assert (out[1, :, 3] == 0).all()
    if causal:  # a query sees only keys up to its diagonal (aligned to the last key): later keys get no gradient
        q2, k2, v2, _ = _bf16_attention_case(False)
        out = A.attend(q2.bfloat16(), k2.bfloat16(), v2.bfloat16(), None, True, 0.0)
        (g,) = torch.autograd.grad(out[:, :, 0].float().sum(), [v2])
        assert (g[:, :, 13 - 9 + 1 :] == 0).all() and (g[:, :, : 13 - 9 + 1] != 0).any()


def test_encoder_under_bf16_autocast_uses_the_explicit_path_and_agrees_with_fp32():
    from perceiver import EncoderConfig, PerceiverEncoder

    enc = PerceiverEncoder(EncoderConfig(num_input_channels=12, num_latents=8, num_latent_channels=32))
    x = torch.randn(2, 50, 12)
    ref = enc(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = enc(x)
    assert_close(out.float(), ref, atol=0.1, rtol=0.05)
    rel = (out.float() - ref).norm() / ref.norm()
    assert rel < 0.02, rel  # bf16 has 8 mantissa bits: ~0.4% per rounding
