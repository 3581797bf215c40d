"""Parity of ``perceiver.from_transformers`` / ``from_pretrained`` with transformers' Perceiver models."""

import pytest
import torch
import transformers
import transformers.models.perceiver.modeling_perceiver as hfp
from hf_helpers import build, make_inputs, randomize, tiny_config
from torch.testing import assert_close

import perceiver
from perceiver.hf import ConvertedPerceiver, from_pretrained, from_transformers
from perceiver.modalities import BytesTokenizer

ATOL = RTOL = 1e-4

# per-class tiny configs (the image models have hard-coded widths: 261, 322 and 512 input channels)
CLASS_CONFIGS = {
    "PerceiverForMaskedLM": {},
    "PerceiverForSequenceClassification": {},
    "PerceiverForImageClassificationLearned": {"num_cross_attention_heads": 2},
    "PerceiverForImageClassificationFourier": {"d_latents": 18, "num_cross_attention_heads": 3},
    "PerceiverForImageClassificationConvProcessing": {"image_size": 16, "num_cross_attention_heads": 2},
    "PerceiverForOpticalFlow": {"train_size": [6, 8]},
    "PerceiverForMultimodalAutoencoding": {},
}

VARIANTS = {
    "qkv_channels_and_heads": dict(
        qk_channels=32, v_channels=16, num_self_attention_heads=4, num_cross_attention_heads=2
    ),
    "no_query_residual_3_blocks": dict(use_query_residual=False, num_blocks=3, num_self_attends_per_block=1),
    "shape_for_attention_q": dict(cross_attention_shape_for_attention="q", num_cross_attention_heads=4),
    "widening_gelu_tanh": dict(
        self_attention_widening_factor=3, cross_attention_widening_factor=2, hidden_act="gelu_new"
    ),
    "relu_one_latent": dict(hidden_act="relu", num_latents=1),
}


def compare(ref, out):
    """Max abs difference after asserting agreement within 1e-4."""
    if isinstance(ref, dict):
        assert isinstance(out, dict) and sorted(out) == sorted(ref)
        return max(compare(ref[k], out[k]) for k in ref)
    assert out.shape == ref.shape
    assert_close(out, ref, atol=ATOL, rtol=RTOL)
    return (out - ref).abs().max().item()


def run_both(cls_name, config, **input_overrides):
    hf = build(cls_name, config)
    ours = from_transformers(hf)
    kwargs = make_inputs(cls_name, config)
    kwargs.update(input_overrides)
    with torch.no_grad():
        ref = hf(**kwargs).logits
        out = ours(**kwargs)
    return hf, ours, ref, out


@pytest.mark.parametrize("cls_name", list(CLASS_CONFIGS))
def test_parity_per_class(cls_name):
    config = tiny_config(**CLASS_CONFIGS[cls_name])
    hf, ours, ref, out = run_both(cls_name, config)
    assert isinstance(ours, ConvertedPerceiver) and not ours.training
    if cls_name == "PerceiverForOpticalFlow":
        ref, out = ref * 100, out * 100  # flow is divided by 100: compare at the decoder's scale
    compare(ref, out)
    # built from this project's modules, no transformers module inside
    assert not any(type(m).__module__.startswith("transformers") for m in ours.modules())
    n_ours = sum(p.numel() for p in ours.parameters())
    n_hf = sum(p.numel() for p in hf.parameters())
    assert n_ours == n_hf


def test_parity_shapes_of_published_layouts():
    config = tiny_config(**CLASS_CONFIGS["PerceiverForMultimodalAutoencoding"])
    _, _, ref, out = run_both("PerceiverForMultimodalAutoencoding", config)
    assert {k: tuple(v.shape) for k, v in out.items()} == {"audio": (2, 12), "image": (2, 42, 3), "label": (2, 5)}
    config = tiny_config()
    _, _, ref, out = run_both("PerceiverForMaskedLM", config)
    assert out.shape == (2, config.max_position_embeddings, config.vocab_size)  # all positions decoded


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize(
    "cls_name", ["PerceiverForSequenceClassification", "PerceiverForMaskedLM", "PerceiverForMultimodalAutoencoding"]
)
def test_parity_config_variety(cls_name, variant):
    compare(*run_both(cls_name, tiny_config(**VARIANTS[variant]))[2:])


def test_attention_mask_and_aliases():
    config = tiny_config()
    hf = build("PerceiverForSequenceClassification", config)
    ours = from_transformers(hf)
    kw = make_inputs("PerceiverForSequenceClassification", config)
    with torch.no_grad():
        unmasked = ours(kw["inputs"])
        masked = ours(input_ids=kw["inputs"], attention_mask=kw["attention_mask"])
        compare(hf(input_ids=kw["inputs"], attention_mask=kw["attention_mask"]).logits, masked)
    assert (masked[0] - unmasked[0]).abs().max() > 1e-3  # the mask changes the masked example
    assert_close(masked[1], unmasked[1])  # and not the fully valid one
    image = build(
        "PerceiverForImageClassificationFourier", tiny_config(**CLASS_CONFIGS["PerceiverForImageClassificationFourier"])
    )
    pixels = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        compare(image(pixel_values=pixels).logits, from_transformers(image)(pixel_values=pixels))
    with pytest.raises(ValueError, match="attention_mask must be"):
        ours(kw["inputs"], attention_mask=torch.ones(2, 3))


def _generic_models(config):
    """PerceiverModel compositions exercising the preprocessor/decoder options transformers offers."""

    def fourier(bands, res, sine_only=False):
        return dict(num_bands=bands, max_resolution=res, concat_pos=True, sine_only=sine_only)

    yield "no_preprocessor_no_decoder", hfp.PerceiverModel(config), torch.randn(2, 7, config.d_model), {}
    audio = hfp.PerceiverAudioPreprocessor(
        config,
        samples_per_patch=4,
        position_encoding_type="trainable",
        out_channels=8,
        project_pos_dim=6,
        trainable_position_encoding_kwargs=dict(index_dims=5, num_channels=8),
    )
    dec = hfp.PerceiverBasicDecoder(  # a 1-d Fourier decoder without subsampling: transformers' channel-axis grid
        config,
        output_num_channels=3,
        position_encoding_type="fourier",
        output_index_dims=(7,),
        num_channels=7,
        fourier_position_encoding_kwargs=fourier(3, (7,)),
    )
    yield (
        "audio_trainable_fourier_decoder",
        hfp.PerceiverModel(config, input_preprocessor=audio, decoder=dec),
        torch.randn(2, 20),
        {},
    )
    pixels = hfp.PerceiverImagePreprocessor(
        config,
        prep_type="pixels",
        spatial_downsample=2,
        in_channels=4,
        fourier_position_encoding_kwargs=fourier(3, (8, 8)),
    )
    cls = hfp.PerceiverClassificationDecoder(
        config,
        num_channels=config.d_latents,
        use_query_residual=True,
        trainable_position_encoding_kwargs=dict(num_channels=config.d_latents, index_dims=1),
    )
    yield (
        "pixels_stride_2",
        hfp.PerceiverModel(config, input_preprocessor=pixels, decoder=cls),
        torch.randn(4, 4, 8, 8),
        {},
    )
    patches = hfp.PerceiverImagePreprocessor(
        config,
        prep_type="patches",
        spatial_downsample=2,
        concat_or_add_pos="add",
        out_channels=10,
        project_pos_dim=12,
        fourier_position_encoding_kwargs=fourier(4, (4, 4), sine_only=True),
    )
    dec = hfp.PerceiverBasicDecoder(
        config,
        output_num_channels=6,
        position_encoding_type="trainable",
        num_channels=10,
        output_index_dims=9,
        trainable_position_encoding_kwargs=dict(index_dims=9, num_channels=10),
        num_heads=2,
        qk_channels=8,
        v_channels=10,
        widening_factor=2,
        use_query_residual=True,
    )
    post = hfp.PerceiverProjectionPostprocessor(6, 4)
    model = hfp.PerceiverModel(config, input_preprocessor=patches, decoder=dec, output_postprocessor=post)
    yield "patches_added_positions", model, torch.randn(2, 3, 8, 8), {}
    video = hfp.PerceiverImagePreprocessor(
        config,
        prep_type="pixels",
        spatial_downsample=2,
        temporal_downsample=2,
        fourier_position_encoding_kwargs=fourier(2, (2, 4, 4)),
    )
    yield "video_pixels", hfp.PerceiverModel(config, input_preprocessor=video), torch.randn(2, 4, 3, 8, 8), {}
    conv1x1 = hfp.PerceiverImagePreprocessor(
        config,
        prep_type="conv1x1",
        spatial_downsample=2,
        out_channels=5,
        position_encoding_type="trainable",
        trainable_position_encoding_kwargs=dict(index_dims=16, num_channels=7),
    )
    yield "conv1x1_stride_2", hfp.PerceiverModel(config, input_preprocessor=conv1x1), torch.randn(2, 3, 8, 8), {}
    conv = hfp.PerceiverImagePreprocessor(
        config,
        prep_type="conv",
        spatial_downsample=4,
        conv2d_use_batchnorm=False,
        out_channels=8,
        fourier_position_encoding_kwargs=fourier(2, (5, 5)),
    )
    yield (
        "conv_no_batchnorm_odd_size",
        hfp.PerceiverModel(config, input_preprocessor=conv),
        torch.randn(2, 3, 17, 13),
        {},
    )
    mm = hfp.PerceiverMultimodalPreprocessor(
        modalities=dict(
            audio=hfp.PerceiverAudioPreprocessor(
                config, samples_per_patch=4, fourier_position_encoding_kwargs=fourier(3, (16,))
            ),
            label=hfp.PerceiverOneHotPreprocessor(config),
        ),
        mask_probs=dict(label=1.0, audio=0.0),
        min_padding_size=3,
    )
    dec = hfp.PerceiverMultimodalDecoder(
        config,
        modalities=dict(
            audio=hfp.PerceiverBasicDecoder(
                config,
                output_num_channels=4,
                position_encoding_only=True,
                position_encoding_type="fourier",
                output_index_dims=(4,),
                fourier_position_encoding_kwargs=fourier(3, (16,)),
            ),
            label=hfp.PerceiverClassificationDecoder(
                config,
                position_encoding_only=True,
                position_encoding_type="trainable",
                trainable_position_encoding_kwargs=dict(num_channels=6, index_dims=1),
            ),
        ),
        num_outputs=None,
        output_num_channels=9,
    )
    post = hfp.PerceiverMultimodalPostprocessor(
        modalities=dict(
            audio=hfp.PerceiverAudioPostprocessor(config, in_channels=9),
            label=hfp.PerceiverClassificationPostprocessor(config, in_channels=9),
        )
    )
    model = hfp.PerceiverModel(config, input_preprocessor=mm, decoder=dec, output_postprocessor=post)
    yield "multimodal_without_subsampling", model, {"audio": torch.randn(2, 16), "label": torch.zeros(2, 5)}, {}


@pytest.mark.parametrize("case", range(8))
def test_parity_perceiver_model_compositions(case):
    config = tiny_config()
    name, model, inputs, kwargs = list(_generic_models(config))[case]
    randomize(model)
    ours = from_transformers(model)
    with torch.no_grad():
        result = model(inputs=inputs, **kwargs)
        out = ours(inputs, **kwargs)
    ref = result.logits if result.logits is not None else result.last_hidden_state
    compare(ref, out)


@pytest.mark.parametrize(
    "cls_name",
    ["PerceiverForMaskedLM", "PerceiverForImageClassificationConvProcessing", "PerceiverForMultimodalAutoencoding"],
)
def test_from_pretrained_local_directory(tmp_path, cls_name):
    config = tiny_config(**CLASS_CONFIGS[cls_name])
    hf = build(cls_name, config)
    hf.save_pretrained(tmp_path)
    ours = perceiver.from_pretrained(str(tmp_path))
    assert ours.source_class == cls_name and not ours.training
    kwargs = make_inputs(cls_name, config)
    with torch.no_grad():
        compare(hf(**kwargs).logits, ours(**kwargs))


def test_from_pretrained_rejects_other_checkpoints(tmp_path):
    transformers.BertConfig(
        hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8
    ).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not a Perceiver"):
        from_pretrained(str(tmp_path))
    with pytest.raises(TypeError, match="cannot convert BertModel"):
        from_transformers(transformers.BertModel(transformers.BertConfig.from_pretrained(tmp_path)))


def test_unsupported_parts_fail_clearly():
    config = tiny_config()
    video_decoder = hfp.PerceiverBasicVideoAutoencodingDecoder(
        config,
        output_shape=[1, 2, 4, 4],
        position_encoding_type="trainable",
        output_num_channels=3,
        num_channels=8,
        trainable_position_encoding_kwargs=dict(index_dims=32, num_channels=8),
    )
    model = hfp.PerceiverModel(config, decoder=video_decoder).eval()
    with pytest.raises(TypeError):  # transformers cannot run a standalone video decoder either
        model(torch.randn(1, 3, config.d_model))
    with pytest.raises(NotImplementedError, match="PerceiverBasicVideoAutoencodingDecoder"):
        from_transformers(model)


def test_tokenizer_matches_transformers():
    hf_tok = transformers.PerceiverTokenizer()
    ours = BytesTokenizer()
    for text in ["Perceiver IO", "naïve ✓ bytes"]:
        assert ours.encode(text, add_special_tokens=True) == hf_tok(text)["input_ids"]
    assert (ours.pad_token_id, ours.mask_token_id, ours.vocab_size) == (
        hf_tok.pad_token_id,
        hf_tok.mask_token_id,
        len(hf_tok),
    )
