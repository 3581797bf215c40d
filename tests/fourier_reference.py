"""The official Fourier position features written out with plain loops, as the reference for the tests."""

import math

import torch


def direct_fourier(coords, num_bands, max_resolution, concat_pos=True, sine_only=False):
    """Official layout per point: [x_d] + [sin(pi f_dk x_d)]_{d,k} + [cos(pi f_dk x_d)]_{d,k}, f linear in [1, res/2]."""
    rows = []
    for x in coords:
        sins, coss = [], []
        for d, res in enumerate(max_resolution):
            for k in range(num_bands):
                f = 1.0 + k * (res / 2 - 1.0) / (num_bands - 1)
                sins.append(math.sin(math.pi * f * x[d]))
                coss.append(math.cos(math.pi * f * x[d]))
        rows.append((list(x) if concat_pos else []) + sins + ([] if sine_only else coss))
    return torch.tensor(rows, dtype=torch.float32)


def grid_coords(*dims):
    """Row-major points of a grid spanning [-1, 1] per axis (a 1-point axis sits at -1)."""
    axes = [[-1 + 2 * i / (n - 1) if n > 1 else -1.0 for i in range(n)] for n in dims]
    idx = torch.cartesian_prod(*[torch.arange(n) for n in dims]).reshape(-1, len(dims)).tolist()
    return [[axes[d][i] for d, i in enumerate(ix)] for ix in idx]
