"""Tiled upscaling equals the untiled network wherever no tile edge is within the receptive field, and its
blended seams deviate no more than the worst single tile does.

Why these bounds: a tile differs from the whole image only through the zero padding at its cut edges, which reaches
an output pixel only within the network's receptive-field radius R of a cut (RRDBNet with nb blocks: 2 + 15 nb
3x3 convs at the input resolution, plus the upsampling convs worth < 2 input pixels). Outside that, the tiled and
untiled outputs are the same sums (float rounding only). Inside a seam band the output is a convex combination of
two tiles (weights i / band and 1 - i / band), so its error is at most the larger of the two tiles' errors there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from builders import rrdbnet_basicsr

from difusi.upscalers.arch import build_model
from difusi.upscalers.tiling import tile_starts, tiled_upscale


def test_tile_layout_is_a1111s_split_grid():
    assert tile_starts(512, 192, 8) == [0, 160, 320]
    assert tile_starts(120, 64, 8) == [0, 56]
    assert tile_starts(100, 192, 8) == [0]


def test_pointwise_model_is_stitched_exactly_in_2d():
    def model(x):
        return F.interpolate(x * 2 + 1, scale_factor=3, mode="nearest")

    x = torch.rand(1, 3, 130, 101, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(tiled_upscale(model, x, 3, tile=48, overlap=8), model(x), rtol=0, atol=1e-6)


def test_rrdbnet_tiled_equals_untiled_away_from_seams_and_seams_are_bounded():
    module, spec = build_model(rrdbnet_basicsr(num_feat=8, num_blocks=1, seed=5))
    radius = 2 + 15 * spec.num_blocks + 2
    x = torch.rand(1, 3, 40, 120, generator=torch.Generator().manual_seed(1))
    tile, overlap, s = 64, 8, spec.scale
    with torch.inference_mode():
        whole = module(x)
        tiled = tiled_upscale(module, x, s, tile=tile, overlap=overlap)
        left, right = module(x[..., 0:64]), module(x[..., 56:120])
    assert tile_starts(120, tile, overlap) == [0, 56]
    error = (tiled - whole).abs()
    exact = torch.ones(120 * s, dtype=torch.bool)
    exact[(64 - radius) * s : (56 + radius) * s] = False  # within R of tile A's cut (col 64) or B's (col 56)
    assert error[..., exact].max() <= 1e-5
    assert error[..., ~exact].max() > 1e-4  # the padding does reach the seam: the test can fail
    band = slice(56 * s, 64 * s)
    worst = torch.maximum((left[..., 56 * s : 64 * s] - whole[..., band]).abs(),
                          (right[..., 0 : 8 * s] - whole[..., band]).abs())
    assert (error[..., band] <= worst + 1e-6).all()
