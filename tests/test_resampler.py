"""Perceiver Resampler: shapes, parity with OpenFlamingo's resampler, embeddings, absent images."""

import pytest
import torch
from vlm_helpers import import_open_flamingo

from perceiver import PerceiverResampler

D = 16


def _resampler(**kw) -> PerceiverResampler:
    args = dict(depth=2, num_latents=5, num_heads=2, head_channels=8, widening_factor=2)
    args.update(kw)
    return PerceiverResampler(D, **args).eval()


def test_output_shape_and_exported():
    import perceiver

    assert perceiver.PerceiverResampler is PerceiverResampler
    x = torch.randn(2, 3, 2, 7, D)  # (B, T_img, F, v, D)
    assert _resampler()(x).shape == (2, 3, 5, D)


def _copy_from_openflamingo(ours: PerceiverResampler, ref) -> None:
    with torch.no_grad():
        ours.latents.copy_(ref.latents)
        if ref.frame_embs is not None:
            ours.frame_embeddings.copy_(ref.frame_embs)
        if ref.media_time_embs is not None:
            ours.media_time_embeddings.copy_(ref.media_time_embs[:, 0])
        for mine, (attn, ff) in zip(ours.layers, ref.layers):
            mine.media_norm.load_state_dict(attn.norm_media.state_dict())
            mine.latent_norm.load_state_dict(attn.norm_latents.state_dict())
            mine.attention.q_proj.weight.copy_(attn.to_q.weight)
            k, v = attn.to_kv.weight.chunk(2, dim=0)
            mine.attention.k_proj.weight.copy_(k)
            mine.attention.v_proj.weight.copy_(v)
            mine.attention.o_proj.weight.copy_(attn.to_out.weight)
            mine.mlp_norm.load_state_dict(ff[0].state_dict())
            mine.mlp[0].weight.copy_(ff[1].weight)
            mine.mlp[2].weight.copy_(ff[3].weight)
        ours.norm.load_state_dict(ref.norm.state_dict())


@pytest.mark.parametrize("embeddings", [False, True])
def test_matches_openflamingo_resampler(embeddings):
    of = import_open_flamingo()
    from open_flamingo.src.helpers import PerceiverResampler as RefResampler

    assert of is not None
    kw = dict(max_num_media=4, max_num_frames=3) if embeddings else {}
    ref = RefResampler(dim=D, depth=2, dim_head=8, heads=2, num_latents=5, ff_mult=2, **kw).eval()
    with torch.no_grad():  # non-trivial norms so every parameter matters
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    ours = _resampler(**kw)
    _copy_from_openflamingo(ours, ref)
    x = torch.randn(2, 3, 2, 7, D)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)


def test_latents_are_part_of_keys_and_values():
    # With zero media the output still depends on the latents through the keys/values: compare
    # against attention over the media only (the latents dropped from the keys) - they must differ.
    torch.manual_seed(0)
    r = _resampler(depth=1)
    x = torch.randn(1, 1, 1, 6, D)
    block = r.layers[0]
    q = block.latent_norm(r.latents[None])
    media_only = r.latents[None] + block.attention(q, block.media_norm(x[0, 0]))
    media_only = media_only + block.mlp(block.mlp_norm(media_only))
    assert not torch.allclose(r(x)[0, 0], r.norm(media_only)[0], atol=1e-4)


def test_media_time_embeddings_are_used():
    torch.manual_seed(0)
    img = torch.randn(1, 1, 1, 7, D)
    other = torch.randn(1, 1, 1, 7, D)
    x01 = torch.cat([img, other], dim=1)  # img in slot 0
    x10 = torch.cat([other, img], dim=1)  # img in slot 1
    plain = _resampler()
    # Without media-time embeddings each image is resampled independently of its slot ...
    torch.testing.assert_close(plain(x01)[:, 0], plain(x10)[:, 1])
    # ... with them, the slot changes the latents.
    timed = _resampler(max_num_media=2)
    assert (timed(x01)[:, 0] - timed(x10)[:, 1]).abs().max() > 1e-3


def test_frame_embeddings_are_used():
    torch.manual_seed(0)
    frames = torch.randn(1, 1, 2, 7, D)
    swapped = frames.flip(2)  # same frames, other order
    plain = _resampler()
    torch.testing.assert_close(plain(frames), plain(swapped), atol=1e-5, rtol=1e-5)  # a set: order-free
    video = _resampler(max_num_frames=2)
    assert (video(frames) - video(swapped)).abs().max() > 1e-3


def test_absent_images_are_zero_and_isolated():
    torch.manual_seed(0)
    r = _resampler(max_num_media=3)
    x = torch.randn(2, 3, 1, 7, D)
    mask = torch.tensor([[True, True, True], [True, False, False]])
    out = r(x, mask)
    assert torch.equal(out[1, 1:], torch.zeros_like(out[1, 1:]))
    assert out[0].abs().sum(dim=(-1, -2)).gt(0).all() and out[1, 0].abs().sum() > 0
    x2 = x.clone()
    x2[1, 1:] = torch.randn_like(x2[1, 1:])  # change only the absent images
    assert torch.equal(r(x2, mask), out)
    torch.testing.assert_close(out[0], r(x)[0])


def test_gradients_reach_all_parameters():
    r = _resampler(max_num_media=2, max_num_frames=2).train()
    r(torch.randn(2, 2, 2, 7, D)).square().sum().backward()
    for name, p in r.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_input_projection_to_a_narrower_width():
    """input_channels: wide features are projected to the resampler's width; the projection is the first step."""
    r = _resampler(input_channels=3 * D).train()
    x = torch.randn(2, 2, 1, 7, 3 * D)
    out = r(x)
    assert out.shape == (2, 2, 5, D)
    out.square().sum().backward()
    assert r.input_projection.weight.grad.abs().sum() > 0
    plain = _resampler()
    plain.load_state_dict({k: v for k, v in r.state_dict().items() if not k.startswith("input_projection.")})
    with torch.no_grad():
        torch.testing.assert_close(r.eval()(x), plain(r.input_projection(x)))
    with pytest.raises(ValueError, match=f"media features have {D} channels, the resampler expects {3 * D}"):
        r(torch.randn(1, 1, 1, 7, D))
    with pytest.raises(ValueError, match="input_channels"):
        PerceiverResampler(D, input_channels=0)


def test_validation_errors():
    with pytest.raises(ValueError, match="depth"):
        PerceiverResampler(D, depth=0)
    with pytest.raises(ValueError, match="max_num_media"):
        PerceiverResampler(D, max_num_media=0)
    with pytest.raises(ValueError, match=r"\(B, T_img, F, v, D\)"):
        _resampler()(torch.randn(2, 7, D))
    with pytest.raises(ValueError, match="channels"):
        _resampler()(torch.randn(1, 1, 1, 7, D + 1))
    with pytest.raises(ValueError, match="max_num_media=2"):
        _resampler(max_num_media=2)(torch.randn(1, 3, 1, 7, D))
    with pytest.raises(ValueError, match="max_num_frames=1"):
        _resampler(max_num_frames=1)(torch.randn(1, 1, 2, 7, D))
    with pytest.raises(ValueError, match="media_mask"):
        _resampler()(torch.randn(1, 2, 1, 7, D), torch.ones(1, 3, dtype=torch.bool))


def test_token_position_embeddings_break_the_permutation_invariance():
    torch.manual_seed(0)
    x = torch.randn(2, 1, 1, 9, 16)
    perm = torch.randperm(9)
    plain = PerceiverResampler(16, depth=2, num_latents=4, num_heads=2, head_channels=8).eval()
    # without positions the latents are a function of the set of tokens: their order cannot matter
    torch.testing.assert_close(plain(x), plain(x[:, :, :, perm]), rtol=1e-5, atol=1e-5)
    positioned = PerceiverResampler(16, depth=2, num_latents=4, num_heads=2, head_channels=8, max_num_media_tokens=9)
    positioned.eval()
    assert positioned.token_embeddings.shape == (9, 16)
    assert (positioned(x) - positioned(x[:, :, :, perm])).abs().max() > 1e-3  # now where a token is matters
    # fewer tokens use the first positions; more than the table holds is an error naming both numbers
    assert positioned(x[:, :, :, :4]).shape == (2, 1, 4, 16)
    with pytest.raises(ValueError, match="10 tokens per frame, but max_num_media_tokens=9"):
        positioned(torch.randn(1, 1, 1, 10, 16))
    with pytest.raises(ValueError, match="max_num_media_tokens"):
        PerceiverResampler(16, max_num_media_tokens=0)
