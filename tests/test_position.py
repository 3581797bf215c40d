import pytest
import torch
from fourier_reference import direct_fourier, grid_coords
from torch.testing import assert_close

from perceiver.position import (
    FourierPositionEncoding,
    TrainablePositionEncoding,
    build_linear_positions,
    fourier_features,
)


@pytest.mark.parametrize("concat_pos,sine_only", [(True, False), (False, False), (True, True)])
def test_fourier_features_match_direct_formula(concat_pos, sine_only):
    enc = FourierPositionEncoding(
        (5, 7), num_bands=4, max_resolution=(10, 12), concat_pos=concat_pos, sine_only=sine_only
    )
    ref = direct_fourier(grid_coords(5, 7), 4, (10, 12), concat_pos, sine_only)
    assert enc.num_channels == ref.shape[1]
    assert_close(enc(2)[1], ref, atol=1e-5, rtol=1e-5)


def test_imagenet_fourier_channel_count_and_grid():
    # Perceiver IO ImageNet: 224x224, 64 bands, concat_pos -> 2 * (2 * 64) + 2 = 258 channels
    enc = FourierPositionEncoding((224, 224), num_bands=64)
    assert enc.num_channels == 258 and enc.features.shape == (224 * 224, 258)
    pos = build_linear_positions((3, 4))
    assert pos.shape == (3, 4, 2)
    assert_close(pos[0, 0], torch.tensor([-1.0, -1.0]))
    assert_close(pos[-1, -1], torch.tensor([1.0, 1.0]))
    assert_close(pos[1, 0], torch.tensor([0.0, -1.0]))  # 'ij' order: first axis varies slowest


def test_continuous_coordinates_agree_with_grid():
    enc = FourierPositionEncoding((4, 6), num_bands=3, max_resolution=8)
    grid = build_linear_positions((4, 6)).reshape(1, -1, 2)
    assert_close(enc.encode(grid)[0], enc.features)
    xyz = torch.rand(2, 50, 3) * 2 - 1  # a point cloud
    feats = fourier_features(xyz, num_bands=5, max_resolution=(16, 16, 16))
    assert feats.shape == (2, 50, 3 * 10 + 3)
    assert_close(feats[..., :3], xyz)


def test_fourier_validation_and_subsampling():
    with pytest.raises(ValueError, match="max_resolution"):
        FourierPositionEncoding((4, 4), num_bands=2, max_resolution=(4, 4, 4))
    enc = FourierPositionEncoding((4, 4), num_bands=2)
    idx = torch.tensor([3, 0, 15])
    assert_close(enc(2, idx), enc(2)[:, idx])


def test_fourier_buffer_follows_module_and_is_not_saved():
    enc = FourierPositionEncoding((4,), num_bands=2)
    assert "features" not in enc.state_dict()
    assert enc.to(torch.float64)(1).dtype == torch.float64


def test_trainable_positions():
    enc = TrainablePositionEncoding(10, 6, init_scale=0.02)
    assert enc(3).shape == (3, 10, 6)
    assert enc.embeddings.abs().max() <= 0.04 + 1e-6  # truncated at 2 std
    assert_close(enc(2, torch.tensor([4, 1])), enc(2)[:, [4, 1]])
    enc(1).sum().backward()
    assert enc.embeddings.grad is not None
