import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from perceiver import (
    ArrayInputAdapter,
    ClassificationOutputAdapter,
    DecoderConfig,
    EncoderConfig,
    FourierQueryProvider,
    InputQueryProvider,
    PerceiverDecoder,
    PerceiverIO,
    TrainableQueryProvider,
)
from perceiver.position import FourierPositionEncoding


def enc_cfg(c_in, **kw):
    return EncoderConfig(
        num_input_channels=c_in,
        num_latents=8,
        num_latent_channels=16,
        num_self_attention_heads=2,
        num_self_attends_per_block=2,
        **kw,
    )


def test_dense_decode_subsampling_equals_slicing_full_decode():
    adapter = ArrayInputAdapter((6, 5), 3, num_bands=4)
    queries = FourierQueryProvider((6, 5), num_bands=4)
    model = PerceiverIO(
        adapter,
        enc_cfg(adapter.num_input_channels),
        DecoderConfig(num_latent_channels=16, num_query_channels=queries.num_query_channels, num_output_channels=2),
        queries,
    ).eval()
    x = torch.randn(2, 6, 5, 3)
    full = model(x)
    assert full.shape == (2, 30, 2)
    points = torch.tensor([29, 0, 7, 7, 13])
    assert_close(model(x, subsampled_points=points), full[:, points])


def test_classification_decoder_and_query_mask():
    adapter = ArrayInputAdapter((10,), 4, position_encoding="trainable", num_position_channels=4)
    model = PerceiverIO(
        adapter,
        enc_cfg(8),
        DecoderConfig(num_latent_channels=16, num_query_channels=12, num_output_channels=5, num_heads=2),
        TrainableQueryProvider(1, 12),
        ClassificationOutputAdapter(),
    )
    assert model(torch.randn(3, 10, 4)).shape == (3, 5)

    dec = PerceiverDecoder(DecoderConfig(16, 12, 5), TrainableQueryProvider(4, 12)).eval()
    z = torch.randn(2, 8, 16)
    qmask = torch.tensor([[True, False, True, True], [False, False, False, True]])
    out = dec(z, z, query_mask=qmask)
    assert (out[~qmask] == 0).all()
    assert_close(out[qmask], dec(z, z)[qmask])  # queries are independent: masking one leaves others intact
    with pytest.raises(ValueError, match=r"query_mask must be \(batch, num_queries\) = \(2, 4\)"):
        dec(z, z, query_mask=qmask[:, :3])


def test_queries_derived_from_input():
    pos = FourierPositionEncoding((7,), num_bands=2)
    provider = InputQueryProvider(3, position_encoding=pos, num_query_channels=10)
    x = torch.randn(2, 7, 3)
    q = provider(x)
    assert_close(q, provider.proj(torch.cat([x, pos(2)], -1)))
    idx = torch.tensor([6, 2])
    assert_close(provider(x, idx), q[:, idx])
    assert InputQueryProvider(3).num_query_channels == 3


def test_decoder_config_errors():
    with pytest.raises(ValueError, match="num_query_channels=10 does not match"):
        PerceiverDecoder(DecoderConfig(16, 10), TrainableQueryProvider(1, 12))
    with pytest.raises(ValueError, match="num_qk_channels=16 \\(defaulted\\) is not divisible by num_heads=3"):
        DecoderConfig(16, 12, num_heads=3)
    with pytest.raises(ValueError, match="num_latent_channels=32 does not match EncoderConfig.num_latent_channels=16"):
        PerceiverIO(ArrayInputAdapter((4,), 2, None), enc_cfg(2), DecoderConfig(32, 12), TrainableQueryProvider(1, 12))
    with pytest.raises(ValueError, match="unknown DecoderConfig keys \\['heads'\\]"):
        DecoderConfig.from_dict({"num_latent_channels": 4, "num_query_channels": 4, "heads": 2})


def test_perceiver_io_classifier_overfits_and_checkpointing_matches():
    adapter = ArrayInputAdapter((10,), 4, num_bands=3)
    model = PerceiverIO(
        adapter,
        enc_cfg(adapter.num_input_channels),
        DecoderConfig(16, 16, num_output_channels=5, num_heads=2),
        TrainableQueryProvider(1, 16),
        ClassificationOutputAdapter(),
    )
    x, y = torch.randn(16, 10, 4), torch.randint(0, 5, (16,))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = F.cross_entropy(model(x), y).item()
    for _ in range(150):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first / 20, (first, loss.item())
    assert (model(x).argmax(-1) == y).all()

    model.train()
    out = model(x)
    model.set_gradient_checkpointing(True)
    assert_close(model(x), out)
