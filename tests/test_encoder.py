import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from perceiver import (
    ArrayInputAdapter,
    EncoderConfig,
    IdentityInputAdapter,
    Perceiver,
    PerceiverEncoder,
)
from perceiver.attention import CrossAttentionLayer
from perceiver.encoder import LatentBlock


def small_config(**kw) -> EncoderConfig:
    base = dict(
        num_input_channels=12,
        num_latents=8,
        num_latent_channels=16,
        num_cross_attention_heads=2,
        num_self_attention_heads=4,
        num_self_attends_per_block=2,
        num_blocks=2,
    )
    base.update(kw)
    return EncoderConfig(**base)


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def test_masked_inputs_have_no_influence():
    enc = PerceiverEncoder(small_config()).eval()
    x = torch.randn(3, 10, 12)
    mask = torch.ones(3, 10, dtype=torch.bool)
    mask[0, 7:] = False
    mask[2, :4] = False
    out = enc(x, mask)
    x2 = x.clone()
    x2[~mask] = torch.randn(int((~mask).sum()), 12) * 100
    assert_close(enc(x2, mask), out)
    # truncating padding away gives the same latents for sample 0
    assert_close(enc(x[:1, :7]), out[:1])
    # and the mask does matter
    assert not torch.allclose(enc(x), out)


def test_fully_masked_sample_is_finite():
    enc = PerceiverEncoder(small_config()).eval()
    x = torch.randn(2, 5, 12)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1] = False
    out = enc(x, mask)
    assert torch.isfinite(out).all()
    # with no visible input, the first cross-attention contributes zeros: the sample's latents
    # are the input-independent result of the latent array alone
    assert_close(out[1], enc(torch.randn(2, 5, 12), mask)[1])


def test_permutation_invariant_without_positions():
    enc = PerceiverEncoder(small_config(num_cross_attends=2)).eval()
    x = torch.randn(2, 16, 12)
    perm = torch.randperm(16)
    assert_close(enc(x[:, perm]), enc(x), atol=1e-5, rtol=1e-5)
    # with Fourier positions appended the inputs are no longer exchangeable
    adapter = ArrayInputAdapter((16,), 4, num_bands=2)
    cfg = small_config(num_input_channels=adapter.num_input_channels, num_cross_attention_heads=1)
    model = Perceiver(adapter, cfg, 3).eval()
    img = torch.randn(1, 16, 4)
    assert not torch.allclose(model(img[:, perm]), model(img), atol=1e-4)


def test_weight_sharing_schemes():
    cfg = dict(num_blocks=4, num_cross_attends=4)
    cross = n_params(CrossAttentionLayer(16, 12, num_heads=2))
    block = n_params(LatentBlock(small_config()))
    latents = 8 * 16
    expected = {"all": (1, 1), "all_but_first": (2, 2), "none": (4, 4)}
    for sharing, (n_cross, n_block) in expected.items():
        enc = PerceiverEncoder(small_config(weight_sharing=sharing, **cfg))
        assert n_params(enc) == latents + n_cross * cross + n_block * block, sharing
        assert len(enc.cross_attends) == n_cross and len(enc.blocks) == n_block
    enc = PerceiverEncoder(small_config(weight_sharing="all_but_first", **cfg))
    blocks = [enc.blocks[i] for i in enc.block_schedule]
    crosses = [enc.cross_attends[i] for i in enc.cross_attend_schedule]
    assert blocks[1] is blocks[2] is blocks[3] and blocks[0] is not blocks[1]
    assert crosses[1] is crosses[3] and crosses[0] is not crosses[1]


def test_shared_block_is_applied_num_blocks_times():
    """num_blocks=3 with shared weights equals applying the one block three times by hand."""
    enc = PerceiverEncoder(small_config(num_blocks=3)).eval()
    x = torch.randn(2, 6, 12)
    z = enc.cross_attends[0](enc.latents.expand(2, -1, -1), x)
    for _ in range(3):
        z = enc.blocks[0](z)
    assert_close(enc(x), z)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (
            dict(num_self_attention_heads=3),
            "num_self_attention_qk_channels=16 \\(defaulted\\) is not divisible by num_self_attention_heads=3",
        ),
        (
            dict(num_cross_attention_qk_channels=10, num_cross_attention_heads=4),
            "num_cross_attention_qk_channels=10 is not divisible",
        ),
        (dict(num_cross_attends=3), "num_cross_attends=3 cannot exceed num_blocks=2"),
        (dict(weight_sharing="some"), "weight_sharing must be one of"),
        (dict(num_latents=0), "num_latents must be a positive int, got 0"),
        (dict(dropout=1.5), "dropout must be in"),
    ],
)
def test_config_errors_name_field_and_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        small_config(**kwargs)


def test_input_errors():
    enc = PerceiverEncoder(small_config())
    with pytest.raises(ValueError, match="num_input_channels=12"):
        enc(torch.randn(2, 5, 11))
    with pytest.raises(ValueError, match=r"pad_mask must be \(batch, length\) = \(2, 5\)"):
        enc(torch.randn(2, 5, 12), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="num_input_channels=12 does not match ArrayInputAdapter"):
        Perceiver(ArrayInputAdapter((4,), 3, num_bands=2), small_config(), 5)


def test_gradient_checkpointing_same_values_and_grads():
    enc = PerceiverEncoder(small_config(num_cross_attends=2)).train()
    x = torch.randn(2, 6, 12, requires_grad=True)
    out = enc(x)
    grads = torch.autograd.grad(out.square().sum(), [x, *enc.parameters()])
    enc.set_gradient_checkpointing(True)
    out_ckpt = enc(x)
    grads_ckpt = torch.autograd.grad(out_ckpt.square().sum(), [x, *enc.parameters()])
    assert_close(out_ckpt, out)
    for a, b in zip(grads_ckpt, grads):
        assert_close(a, b)


def test_bf16_autocast():
    enc = PerceiverEncoder(small_config()).eval()
    x = torch.randn(2, 6, 12)
    ref = enc(x)
    seen = []
    enc.blocks[0][0].attention.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = enc(x)
    assert seen == [torch.bfloat16] * 2  # attention ran in bf16 (residual stream stays fp32)
    assert torch.isfinite(out).all()
    assert_close(out.float(), ref, atol=0.1, rtol=0.05)


def test_torch_compile_has_no_graph_breaks():
    enc = PerceiverEncoder(small_config()).eval()
    x = torch.randn(2, 6, 12)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, 4:] = False
    explanation = torch._dynamo.explain(enc)(x, mask)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(enc, backend="aot_eager", fullgraph=True)
    assert_close(compiled(x, mask), enc(x, mask))


@pytest.mark.slow
def test_torch_compile_inductor():
    enc = PerceiverEncoder(small_config()).eval()
    x = torch.randn(2, 6, 12)
    compiled = torch.compile(enc, fullgraph=True)
    assert_close(compiled(x), enc(x), atol=1e-4, rtol=1e-4)


def test_overfits_one_batch():
    adapter = IdentityInputAdapter(12)
    model = Perceiver(adapter, small_config(), num_classes=5)
    x, y = torch.randn(16, 10, 12), torch.randint(0, 5, (16,))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = F.cross_entropy(model(x), y).item()
    for _ in range(150):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first / 20, (first, loss.item())
    assert (model(x).argmax(-1) == y).all()
