import pytest
import torch
import torch.nn.functional as F
from fourier_reference import direct_fourier, grid_coords
from torch.testing import assert_close

from perceiver import (
    ClassificationOutputAdapter,
    DecoderConfig,
    EncoderConfig,
    InputQueryProvider,
    PerceiverEncoder,
    PerceiverIO,
    TrainableQueryProvider,
)
from perceiver.modalities import (
    AudioInputAdapter,
    AudioOutputAdapter,
    BytesTokenizer,
    ConvDownsample,
    ConvDownsampleLayer,
    DenseOutputAdapter,
    GridQueryProvider,
    ImageInputAdapter,
    LabelInputAdapter,
    MaskedLMOutputAdapter,
    MultimodalInputAdapter,
    MultimodalOutputAdapter,
    MultimodalPerceiverIO,
    MultimodalQueryProvider,
    OpticalFlowInputAdapter,
    OpticalFlowOutputAdapter,
    OpticalFlowQueryProvider,
    PointCloudInputAdapter,
    TextInputAdapter,
    VideoInputAdapter,
    VideoOutputAdapter,
    VideoQueryProvider,
    extract_flow_patches,
    same_padding,
    space_to_depth,
)


def small_encoder(width, latents=4, channels=16):
    return EncoderConfig(
        num_input_channels=width,
        num_latents=latents,
        num_latent_channels=channels,
        num_self_attention_heads=2,
        num_self_attends_per_block=1,
    )


# ----------------------------------------------------------------------------- image


def test_space_to_depth_layout_matches_formula():
    b, c, h, w, s = 2, 3, 4, 6, 2
    x = torch.randn(b, c, h, w)
    y = space_to_depth(x, s)
    assert y.shape == (b, h // s, w // s, s * s * c)
    for i, j, ch in [(0, 0, 0), (3, 5, 2), (2, 1, 1), (1, 4, 0)]:
        assert y[1, i // s, j // s, (i % s) * s * c + (j % s) * c + ch] == x[1, ch, i, j]
    t = 2
    v = torch.randn(b, 4, c, h, w)
    yv = space_to_depth(v, s, t)
    assert yv.shape == (b, 2, h // s, w // s, t * s * s * c)
    n, i, j, ch = 3, 2, 5, 1
    depth = (n % t) * s * s * c + (i % s) * s * c + (j % s) * c + ch
    assert yv[0, n // t, i // s, j // s, depth] == v[0, n, ch, i, j]
    with pytest.raises(ValueError, match="not divisible"):
        space_to_depth(torch.randn(1, 3, 5, 4), 2)


@pytest.mark.parametrize("concat_pos,sine_only", [(True, False), (True, True)])
def test_image_pixels_with_fourier_positions_match_formula(concat_pos, sine_only):
    adapter = ImageInputAdapter(
        (3, 5), num_channels=2, num_bands=4, max_resolution=(6, 8), concat_pos=concat_pos, sine_only=sine_only
    )
    x = torch.randn(2, 2, 3, 5)
    out = adapter(x)
    ref_pos = direct_fourier(grid_coords(3, 5), 4, (6, 8), concat_pos, sine_only)
    assert out.shape == (2, 15, adapter.num_input_channels) and adapter.num_input_channels == 2 + ref_pos.shape[1]
    assert_close(out[..., :2], x.flatten(2).transpose(1, 2))  # pixels, row-major
    assert_close(out[1, :, 2:], ref_pos, atol=1e-5, rtol=1e-5)
    # another input size of the same rank: positions are computed for that grid (max_resolution kept)
    out2 = adapter(torch.randn(1, 2, 4, 4))
    assert_close(
        out2[0, :, 2:], direct_fourier(grid_coords(4, 4), 4, (6, 8), concat_pos, sine_only), atol=1e-5, rtol=1e-5
    )
    with pytest.raises(ValueError, match="C=2"):
        adapter(torch.randn(1, 3, 3, 5))


def test_image_trainable_projected_and_added_positions():
    adapter = ImageInputAdapter(
        (4, 4),
        prep_type="patches",
        spatial_downsample=2,
        position_encoding="trainable",
        num_position_channels=5,
        project_pos_dim=12,
        concat_or_add_pos="add",
    )
    x = torch.randn(2, 3, 4, 4)
    out = adapter(x)
    assert adapter.num_input_channels == 12 and out.shape == (2, 4, 12)
    pos = adapter.positions.projection(adapter.positions.encoding.embeddings)  # (4, 12)
    assert_close(out, space_to_depth(x, 2).reshape(2, 4, 12) + pos)
    with pytest.raises(ValueError, match="trainable positions cover 4 points"):
        adapter(torch.randn(2, 3, 6, 6))
    with pytest.raises(ValueError, match="concat_or_add_pos='add'"):
        ImageInputAdapter((4, 4), position_encoding="trainable", num_position_channels=5, concat_or_add_pos="add")


def test_conv_stem_padding_official_vs_transformers():
    # delta kernel at the centre, no batch norm: the conv picks one input pixel per output
    layers = {}
    for conv_pad, pool_pad in [("same", "same"), ("symmetric", "valid")]:
        layer = ConvDownsampleLayer(1, 1, use_batchnorm=False, conv_padding=conv_pad, pool_padding=pool_pad)
        with torch.no_grad():
            layer.conv.weight.zero_()
            layer.conv.weight[0, 0, 3, 3] = 1.0
        layers[conv_pad] = layer
    x = torch.rand(1, 1, 16, 16) + 0.1  # positive: ReLU is the identity
    assert same_padding(16, 7, 2) == (2, 3) and same_padding(15, 7, 2) == (3, 3)
    conv_same = F.conv2d(F.pad(x, (2, 3, 2, 3)), layers["same"].conv.weight, stride=2)
    assert_close(conv_same[0, 0], x[0, 0, 1::2, 1::2])  # TF-SAME: output i centred on input 2i + 1
    y = x[0, 0, 1::2, 1::2]  # (8, 8)
    # SAME max-pool: window rows/cols 2i .. 2i+2 clipped to the input (pad 0 before, 1 after)
    ref = torch.tensor([[y[2 * i : 2 * i + 3, 2 * j : 2 * j + 3].max() for j in range(4)] for i in range(4)])
    assert_close(layers["same"](x)[0, 0], ref)
    # transformers: conv padded 3/3 (output i centred on input 2i), VALID pool 8 -> 3
    yt = x[0, 0, 0::2, 0::2]
    ref_t = torch.tensor([[yt[2 * i : 2 * i + 3, 2 * j : 2 * j + 3].max() for j in range(3)] for i in range(3)])
    assert_close(layers["symmetric"](x)[0, 0], ref_t)
    # the ImageNet stem: 224 -> 56 x 56 (official) vs 55 x 55 (transformers)
    assert ImageInputAdapter((224, 224), prep_type="conv", spatial_downsample=4).positions.index_dims == (56, 56)
    hf_like = ImageInputAdapter(
        (224, 224), prep_type="conv", spatial_downsample=4, conv_padding="symmetric", pool_padding="valid"
    )
    assert hf_like.positions.index_dims == (55, 55)
    assert ConvDownsample(3, 8, num_layers=2).output_size(64) == 4


def test_conv_stem_and_conv1x1_shapes_and_per_frame_video():
    adapter = ImageInputAdapter((16, 16), prep_type="conv", spatial_downsample=4, out_channels=8, num_bands=3).eval()
    x = torch.randn(2, 3, 16, 16)
    out = adapter(x)
    assert out.shape == (2, 16, adapter.num_input_channels) and adapter.num_input_channels == 8 + 2 * 2 * 3 + 2
    conv1 = ImageInputAdapter((8, 8), prep_type="conv1x1", spatial_downsample=2, out_channels=5, num_bands=2)
    assert conv1(torch.randn(2, 3, 8, 8)).shape == (2, 16, 5 + 10)
    # a video through the conv stem is processed frame by frame
    video = ImageInputAdapter((2, 16, 16), prep_type="conv", spatial_downsample=4, out_channels=8, num_bands=3).eval()
    video.convnet.load_state_dict(adapter.convnet.state_dict())
    frames = torch.randn(1, 2, 3, 16, 16)
    feats = video.features(frames)  # (1, 2, 4, 4, 8)
    assert_close(feats[0, 1], adapter.features(frames[:, 1])[0])
    with pytest.raises(ValueError, match="power of 4"):
        ImageInputAdapter((16, 16), prep_type="conv", spatial_downsample=2)


def test_dense_decoding_subsampling_equals_slicing_the_full_decode():
    adapter = ImageInputAdapter((6, 6), num_bands=3)
    queries = GridQueryProvider((6, 6), num_bands=5)
    model = PerceiverIO(
        adapter,
        small_encoder(adapter.num_input_channels),
        DecoderConfig(
            num_latent_channels=16, num_query_channels=queries.num_query_channels, num_output_channels=4, num_heads=1
        ),
        queries,
        DenseOutputAdapter((6, 6)),
    ).eval()
    x = torch.randn(2, 3, 6, 6)
    full = model(x)
    assert full.shape == (2, 6, 6, 4)
    points = torch.tensor([35, 0, 7, 20])
    sub = model(x, subsampled_points=points)
    assert sub.shape == (2, 4, 4)
    assert_close(sub, full.reshape(2, 36, 4)[:, points])


def test_grid_query_provider_modes():
    q = GridQueryProvider((3, 4), num_bands=2, max_resolution=(8, 8))
    batch = torch.zeros(2, 1, 1)
    full = q(batch)
    assert full.shape == (2, 12, q.num_query_channels)
    assert_close(full[0], direct_fourier(grid_coords(3, 4), 2, (8, 8)), atol=1e-5, rtol=1e-5)
    idx = torch.tensor([11, 5])
    assert_close(q(batch, idx), full[:, idx])
    official = GridQueryProvider((3, 4), num_bands=2, max_resolution=(8, 8), subsample_mode="official")
    # official coordinates: -1 + 2 * i / n per axis (index 11 = (2, 3), index 5 = (1, 1))
    coords = [[-1 + 2 * 2 / 3, -1 + 2 * 3 / 4], [-1 + 2 * 1 / 3, -1 + 2 * 1 / 4]]
    assert_close(official(batch, idx)[0], direct_fourier(coords, 2, (8, 8)), atol=1e-5, rtol=1e-5)
    trainable = GridQueryProvider((5,), "trainable", num_channels=3, subsample_mode="official")
    assert trainable(batch, idx).shape == (2, 5, 3)  # the official code ignores subsampling of trainable queries
    sliced = GridQueryProvider((5,), "trainable", num_channels=3)
    assert_close(sliced(batch, torch.tensor([4, 1])), sliced(batch)[:, [4, 1]])


# ----------------------------------------------------------------------------- audio


def test_audio_patches_positions_and_mask():
    adapter = AudioInputAdapter(num_samples=24, samples_per_patch=4, num_bands=3, max_resolution=24)
    wave = torch.randn(2, 24)
    x = adapter(wave)
    assert x.shape == (2, 6, 4 + 2 * 3 + 1) and adapter.num_input_channels == x.shape[-1]
    assert_close(x[:, 2, :4], wave[:, 8:12])
    assert_close(x[0, :, 4:], direct_fourier(grid_coords(6), 3, (24,)), atol=1e-5, rtol=1e-5)
    assert_close(adapter(wave[..., None]), x)  # (B, S, 1) accepted
    sample_mask = torch.ones(2, 24, dtype=torch.bool)
    sample_mask[1, 13:] = False  # the second clip has 13 samples: patches 0..3 valid (3 partially)
    _, patch_mask = adapter(wave, sample_mask)
    assert patch_mask.tolist() == [[True] * 6, [True] * 4 + [False] * 2]
    with pytest.raises(ValueError, match="divisible by 4"):
        adapter(torch.randn(2, 23))
    head = AudioOutputAdapter(num_input_channels=7, samples_per_patch=4)
    assert head(torch.randn(2, 6, 7)).shape == (2, 24)


def test_audio_padding_mask_is_honoured_by_the_encoder():
    adapter = AudioInputAdapter(num_samples=32, samples_per_patch=4, num_bands=2, max_resolution=32)
    encoder = PerceiverEncoder(small_encoder(adapter.num_input_channels)).eval()
    wave = torch.randn(1, 32)
    mask = torch.arange(32)[None] < 16
    x, patch_mask = adapter(wave, mask)
    noisy, _ = adapter(torch.where(mask, wave, torch.randn(1, 32) * 100), mask)
    assert_close(encoder(x, patch_mask), encoder(noisy, patch_mask))
    assert not torch.allclose(encoder(x), encoder(noisy))


# ----------------------------------------------------------------------------- text


def test_bytes_tokenizer():
    tok = BytesTokenizer()
    assert tok.vocab_size == 262
    assert tok.encode("hé") == [ord("h") + 6, 0xC3 + 6, 0xA9 + 6]
    assert tok.encode("a", add_special_tokens=True) == [tok.cls_token_id, 97 + 6, tok.sep_token_id]
    assert tok.decode(tok.encode("Perceiver ✓", add_special_tokens=True) + [tok.pad_token_id]) == "Perceiver ✓"
    ids, mask = tok(["ab", "abcd"])
    assert ids.tolist() == [[103, 104, 0, 0], [103, 104, 105, 106]]
    assert mask.tolist() == [[True, True, False, False], [True] * 4]
    ids, mask = tok("abcdef", max_length=3)
    assert ids.shape == (1, 3) and mask.all()


def test_text_adapter_and_tied_masked_lm_head():
    adapter = TextInputAdapter(vocab_size=262, max_seq_len=10, num_channels=8, pad_token_id=0)
    ids = torch.tensor([[7, 8, 9, 0], [10, 11, 12, 13]])
    x, mask = adapter(ids)
    assert_close(x, adapter.embedding.weight[ids] + adapter.positions.embeddings[:4])
    assert mask.tolist() == [[True, True, True, False], [True] * 4]
    with pytest.raises(ValueError, match="exceeds max_seq_len=10"):
        adapter(torch.ones(1, 11, dtype=torch.long))
    head = MaskedLMOutputAdapter(adapter.embedding)
    with torch.no_grad():
        head.bias.normal_()
    h = torch.randn(2, 3, 8)
    logits = head(h)
    assert_close(logits, h @ adapter.embedding.weight.t() + head.bias)
    logits.sum().backward()
    assert adapter.embedding.weight.grad is not None and adapter.embedding.weight.grad.abs().sum() > 0
    untied = MaskedLMOutputAdapter(num_input_channels=8, vocab_size=262)
    assert untied(h).shape == (2, 3, 262)


def test_masked_lm_model_mask_and_query_subsampling():
    vocab, max_len, width = 262, 12, 16
    adapter = TextInputAdapter(vocab, max_len, width, pad_token_id=0)
    model = PerceiverIO(
        adapter,
        small_encoder(width),
        DecoderConfig(
            num_latent_channels=16, num_query_channels=width, num_heads=2, num_qk_channels=16, num_v_channels=width
        ),
        TrainableQueryProvider(max_len, width),
        MaskedLMOutputAdapter(adapter.embedding),
    ).eval()
    ids = torch.randint(6, vocab, (2, 7))
    full = model(ids)
    assert full.shape == (2, max_len, vocab)  # one output per position, as the official MLM
    first7 = model(ids, subsampled_points=torch.arange(7))
    assert_close(first7, full[:, :7])
    # right padding is masked out of the encoder: same predictions as the unpadded text
    padded = torch.cat([ids, torch.zeros(2, 3, dtype=torch.long)], dim=1)
    assert_close(model(padded), full)


def test_classification_with_single_trainable_query():
    adapter = TextInputAdapter(262, 12, 16, pad_token_id=0)
    model = PerceiverIO(
        adapter,
        small_encoder(16),
        DecoderConfig(num_latent_channels=16, num_query_channels=16, num_output_channels=3, use_query_residual=True),
        TrainableQueryProvider(1, 16),
        ClassificationOutputAdapter(),
    ).eval()
    ids = torch.randint(6, 262, (2, 5))
    logits = model(ids)
    assert logits.shape == (2, 3)
    assert_close(model(torch.cat([ids, torch.zeros(2, 4, dtype=torch.long)], 1)), logits)


# ----------------------------------------------------------------------------- video


def test_video_adapter_queries_and_output():
    adapter = VideoInputAdapter((4, 8, 8), spatial_patch_size=4, temporal_patch_size=2, num_bands=2)
    video = torch.randn(2, 4, 3, 8, 8)
    x = adapter(video)
    assert adapter.positions.index_dims == (2, 2, 2)
    assert x.shape == (2, 8, 2 * 4 * 4 * 3 + 3 * 2 * 2 + 3)
    assert_close(x[..., :96], space_to_depth(video, 4, 2).reshape(2, 8, 96))
    assert_close(x[0, :, 96:], direct_fourier(grid_coords(2, 2, 2), 2, (2, 2, 2)), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"\(B, T, C, H, W\)"):
        adapter(torch.randn(2, 3, 8, 8))
    queries = VideoQueryProvider((4, 8, 8), num_bands=2)
    assert queries(x).shape == (2, 256, 3 * 2 * 2 + 3)
    idx = torch.tensor([255, 3, 100])
    assert_close(queries(x, idx), queries(x)[:, idx])
    head = VideoOutputAdapter((4, 8, 8), num_input_channels=5)
    assert head(torch.randn(2, 256, 5)).shape == (2, 4, 8, 8, 3)
    assert head(torch.randn(2, 3, 5)).shape == (2, 3, 3)


# ----------------------------------------------------------------------------- point clouds


def test_point_cloud_fourier_features_and_padding_invariance():
    adapter = PointCloudInputAdapter(num_feature_channels=2, num_bands=3, max_resolution=(4, 6, 8))
    pts = torch.rand(1, 5, 3) * 2 - 1
    feats = torch.randn(1, 5, 2)
    x, mask = adapter(pts, feats)
    assert (
        mask is None and x.shape == (1, 5, adapter.num_input_channels) and adapter.num_input_channels == 2 + 3 * 6 + 3
    )
    assert_close(x[0, :, :2], feats[0])
    assert_close(x[0, :, 2:], direct_fourier(pts[0].tolist(), 3, (4, 6, 8)), atol=1e-5, rtol=1e-5)
    # a batch of two clouds with 5 and 3 points, padded with garbage (even NaN) to 5
    pts2 = torch.cat([pts, torch.cat([torch.rand(1, 3, 3), torch.full((1, 2, 3), float("nan"))], 1)])
    feats2 = torch.cat([feats, torch.randn(1, 5, 2)])
    mask2 = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    x2, m2 = adapter({"points": pts2, "features": feats2, "mask": mask2})
    assert torch.isfinite(x2).all() and (x2[1, 3:] == 0).all() and m2.tolist() == mask2.tolist()
    encoder = PerceiverEncoder(small_encoder(adapter.num_input_channels)).eval()
    z = encoder(x2, m2)
    x_small, _ = adapter(pts2[1:, :3], feats2[1:, :3])
    assert_close(z[1], encoder(x_small)[0])
    assert_close(z[0], encoder(x)[0])
    with pytest.raises(ValueError, match="features must be"):
        adapter(pts)


def test_point_segmentation_queries_follow_the_points():
    adapter = PointCloudInputAdapter(num_bands=2, max_resolution=8.0)
    model = PerceiverIO(
        adapter,
        small_encoder(adapter.num_input_channels),
        DecoderConfig(num_latent_channels=16, num_query_channels=adapter.num_input_channels, num_output_channels=4),
        InputQueryProvider(adapter.num_input_channels),
    ).eval()
    pts = torch.rand(2, 6, 3)
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    out = model({"points": pts, "mask": mask}, query_mask=mask)
    assert out.shape == (2, 6, 4) and (out[1, 4:] == 0).all()  # padded points get no prediction


# ----------------------------------------------------------------------------- multimodal


def _kinetics_like():
    audio = AudioInputAdapter(16, samples_per_patch=4, num_bands=3, max_resolution=16)
    video = VideoInputAdapter((2, 8, 8), spatial_patch_size=4, num_bands=2, max_resolution=(2, 8, 8))
    label = LabelInputAdapter(5)
    return {"audio": audio, "image": video, "label": label}


def _kinetics_inputs(batch=2):
    return {"audio": torch.randn(batch, 16), "image": torch.randn(batch, 2, 3, 8, 8), "label": torch.eye(5)[:batch]}


def test_multimodal_input_adapter_padding_order_and_masking():
    adapters = _kinetics_like()
    mm = MultimodalInputAdapter(adapters, min_padding_size=4, mask_probs={"label": 1.0, "audio": 0.0})
    inputs = _kinetics_inputs()
    x, mask, sizes = mm.encode(inputs)
    widths = {m: a.num_input_channels for m, a in adapters.items()}
    assert mm.num_input_channels == max(widths.values()) + 4
    assert sizes == {"audio": 4, "image": 8, "label": 1} and list(sizes) == ["audio", "image", "label"]
    assert mask is None and x.shape == (2, 13, mm.num_input_channels)
    audio_part, image_part, label_part = x[:, :4], x[:, 4:12], x[:, 12:]
    assert_close(audio_part[..., : widths["audio"]], adapters["audio"](inputs["audio"]))
    assert_close(audio_part[..., widths["audio"] :], mm.padding["audio"].expand(2, 4, -1))
    assert_close(image_part[..., : widths["image"]], adapters["image"](inputs["image"]))
    assert_close(label_part, mm.mask_tokens["label"].expand(2, 1, -1))  # masked with probability 1
    # a modality that returns a mask: the combined mask marks the other modalities valid
    with_mask = MultimodalInputAdapter({"audio": adapters["audio"], "label": adapters["label"]})
    sample_mask = torch.arange(16).expand(2, 16) < 5  # 5 valid samples: patches 0 and 1
    _, mask, _ = with_mask.encode({"audio": (inputs["audio"], sample_mask), "label": inputs["label"]})
    assert mask.tolist() == [[True, True, False, False, True]] * 2
    with pytest.raises(ValueError, match="lack modalities"):
        mm.encode({"audio": inputs["audio"]})


def test_multimodal_perceiver_io_splits_outputs_and_subsamples():
    adapters = _kinetics_like()
    mm_in = MultimodalInputAdapter(adapters, min_padding_size=2, mask_probs={"label": 1.0})
    queries = MultimodalQueryProvider(
        {
            "audio": GridQueryProvider((4,), num_bands=3, max_resolution=16),
            "image": VideoQueryProvider((2, 8, 8), num_bands=2),
            "label": TrainableQueryProvider(1, 6),
        },
        min_padding_size=2,
    )
    heads = MultimodalOutputAdapter(
        {
            "audio": AudioOutputAdapter(7, samples_per_patch=4),
            "image": VideoOutputAdapter((2, 8, 8), num_input_channels=7),
            "label": torch.nn.Sequential(torch.nn.Linear(7, 5), ClassificationOutputAdapter()),
        }
    )
    model = MultimodalPerceiverIO(
        mm_in,
        small_encoder(mm_in.num_input_channels),
        DecoderConfig(num_latent_channels=16, num_query_channels=queries.num_query_channels, num_output_channels=7),
        queries,
        heads,
    ).eval()
    inputs = _kinetics_inputs()
    full = model(inputs)
    assert {k: tuple(v.shape) for k, v in full.items()} == {"audio": (2, 16), "image": (2, 2, 8, 8, 3), "label": (2, 5)}
    points = {"image": torch.tensor([127, 0, 64]), "audio": torch.tensor([3, 1])}
    sub = model(inputs, subsampled_points=points)
    assert_close(sub["image"], full["image"].reshape(2, 128, 3)[:, points["image"]])
    assert_close(sub["audio"], full["audio"].reshape(2, 4, 4)[:, points["audio"]].reshape(2, 8))
    assert_close(sub["label"], full["label"])
    with pytest.raises(ValueError, match="unknown modalities"):
        model(inputs, subsampled_points={"text": torch.tensor([0])})


# ----------------------------------------------------------------------------- optical flow


def test_flow_patches_layout():
    frames = torch.randn(1, 2, 3, 5, 6)
    p = extract_flow_patches(frames)
    assert p.shape == (1, 2, 27, 5, 6)
    t, i, j = 1, 2, 3
    for dy in range(3):
        for dx in range(3):
            for c in range(3):
                assert p[0, t, (dy * 3 + dx) * 3 + c, i, j] == frames[0, t, c, i + dy - 1, j + dx - 1]
    assert (p[0, 0, :3, 0, 0] == 0).all()  # the top-left neighbour of the corner pixel is zero padding


def test_optical_flow_model():
    adapter = OpticalFlowInputAdapter((6, 8), out_channels=8, num_bands=4)
    assert adapter.num_input_channels == 8 + 2 * 2 * 4 + 2

    def build(rescale):
        torch.manual_seed(0)
        return PerceiverIO(
            adapter,
            small_encoder(adapter.num_input_channels),
            DecoderConfig(num_latent_channels=16, num_query_channels=adapter.num_input_channels, num_output_channels=2),
            OpticalFlowQueryProvider(adapter.num_input_channels),
            OpticalFlowOutputAdapter((6, 8), rescale_factor=rescale),
        ).eval()

    frames = torch.randn(2, 2, 3, 6, 8)
    flow = build(100.0)(frames)
    assert flow.shape == (2, 6, 8, 2)
    assert_close(flow * 100, build(1.0)(frames))
    # the adapter's patch extraction equals feeding pre-extracted patches (transformers' input format)
    pre = OpticalFlowInputAdapter((6, 8), out_channels=8, num_bands=4, extract_patches=False)
    pre.load_state_dict(adapter.state_dict())
    assert_close(pre(extract_flow_patches(frames)), adapter(frames))


def test_added_positions_must_match_the_feature_width():
    with pytest.raises(ValueError, match=r"position channels \(9\) == samples_per_patch \(8\)"):
        AudioInputAdapter(num_samples=64, samples_per_patch=8, concat_or_add_pos="add", num_bands=4)
    with pytest.raises(ValueError, match=r"position channels \(18\) == feature channels \(3\)"):
        ImageInputAdapter((8, 8), 3, prep_type="pixels", concat_or_add_pos="add", num_bands=4)
    # concatenated: features + 1 coordinate + sin/cos of 4 bands per axis
    assert AudioInputAdapter(num_samples=64, samples_per_patch=8, num_bands=4).num_input_channels == 8 + 1 + 8
    added = ImageInputAdapter((8, 8), 18, prep_type="pixels", concat_or_add_pos="add", num_bands=4)
    assert added.num_input_channels == 18 and added(torch.randn(2, 18, 8, 8)).shape == (2, 64, 18)
