"""difusi.networks.algorithms against an independent implementation: the installed LyCORIS package (4.1.3).

Every case synthesizes small random tensors (fixed generator seeds) in a real key layout, computes difusi's
`updown`, and compares it with LyCORIS's own weight math on the same tensors (its functional `diff_weight` /
`kron_weight` / `weight_decompose`, always with backend="torch" so no kernel or compile tier is involved, or
its module classes' `get_diff_weight` / `get_merged_weight`), to 1e-5 of max |delta|. Cases LyCORIS cannot
express, or where difusi follows A1111 instead, compare with a hand-written formula and say so.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from lycoris.functional import general as ly_general
from lycoris.functional import locon as ly_locon
from lycoris.functional import loha as ly_loha
from lycoris.functional import lokr as ly_lokr
from lycoris.modules.ia3 import _ia3_weight as ly_ia3_weight
from lycoris.modules.locon import LoConModule
from lycoris.modules.loha import LohaModule

from difusi.errors import NetworkError
from difusi.networks.algorithms import ALGORITHMS, algorithm_of, updown

TORCH = "torch"  # LyCORIS backend pin: its eager reference body


def rand(seed: int, *shape: int, low: float = -1.0, high: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=g) * (high - low) + low


def assert_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.dtype == torch.float32
    assert tuple(ours.shape) == tuple(ref.shape)
    ref = ref.to(torch.float32)
    top = ref.abs().max().item()
    assert top > 0, "reference delta is all zero: the test would prove nothing"
    err = (ours - ref).abs().max().item()
    assert err <= 1e-5 * top, f"max error {err} vs max |delta| {top}"


# --------------------------------------------------------------------------------------------------------------
# LoRA / LoCon


def test_lora_linear_with_alpha_matches_lycoris_module():
    weight = rand(1, 10, 12)
    up, down = rand(2, 10, 4), rand(3, 4, 12)
    tensors = {"lora_up.weight": up, "lora_down.weight": down, "alpha": torch.tensor(3.0)}
    delta, bias = updown(tensors, weight, None, "te_q")
    layer = nn.Linear(12, 10, bias=False)
    with torch.no_grad():
        layer.weight.copy_(weight)
        module = LoConModule.make_module_from_state_dict("te_q", layer, up, down, None, torch.tensor(3.0), None)
        ref, _ = module.get_diff_weight()
    assert bias is None
    assert_close(delta, ref)
    # and the functional form, alpha / rank = 3 / 4
    assert_close(delta, ly_locon.diff_weight(down, up, None, gamma=3.0 / 4, backend=TORCH))


def test_lora_linear_without_alpha_has_scale_one():
    weight = rand(4, 8, 6)
    up, down = rand(5, 8, 2), rand(6, 2, 6)
    delta, _ = updown({"lora_up.weight": up, "lora_down.weight": down}, weight, rand(7, 8), "k")
    assert_close(delta, ly_locon.diff_weight(down, up, None, gamma=1.0, backend=TORCH))


def test_lora_conv3x3_locon_down_with_1x1_up():
    weight = rand(8, 6, 5, 3, 3)
    up, down = rand(9, 6, 3, 1, 1), rand(10, 3, 5, 3, 3)
    tensors = {"lora_up.weight": up, "lora_down.weight": down, "alpha": torch.tensor(1.5)}
    delta, _ = updown(tensors, weight, None, "unet_conv")
    layer = nn.Conv2d(5, 6, 3, padding=1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(weight)
        module = LoConModule.make_module_from_state_dict("c", layer, up, down, None, torch.tensor(1.5), None)
        ref, _ = module.get_diff_weight()
    assert_close(delta, ref)


def test_lora_conv_1x1():
    weight = rand(11, 7, 4, 1, 1)
    up, down = rand(12, 7, 2, 1, 1), rand(13, 2, 4, 1, 1)
    tensors = {"lora_up.weight": up, "lora_down.weight": down, "alpha": torch.tensor(1.0)}
    delta, _ = updown(tensors, weight, None, "proj_in")
    assert_close(delta, ly_locon.diff_weight(down, up, None, gamma=0.5, backend=TORCH))


def test_lora_cp_decomposition_lora_mid():
    weight = rand(14, 6, 5, 3, 3)
    up, down, mid = rand(15, 6, 3, 1, 1), rand(16, 3, 5, 1, 1), rand(17, 3, 3, 3, 3)
    tensors = {"lora_up.weight": up, "lora_down.weight": down, "lora_mid.weight": mid, "alpha": torch.tensor(2.0)}
    delta, _ = updown(tensors, weight, None, "cp")
    layer = nn.Conv2d(5, 6, 3, padding=1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(weight)
        module = LoConModule.make_module_from_state_dict("cp", layer, up, down, mid, torch.tensor(2.0), None)
        ref, _ = module.get_diff_weight()
    assert_close(delta, ref)
    assert_close(delta, ly_general.tucker_weight_from_conv(up, down, mid) * (2.0 / 3))


def test_linear_layer_with_conv_shaped_lora_factors():
    """Some trainers save a Linear layer's factors as [out, r, 1, 1] / [r, in, 1, 1]; the delta is the same."""
    weight = rand(18, 9, 7)
    up, down = rand(19, 9, 3, 1, 1), rand(20, 3, 7, 1, 1)
    delta, _ = updown({"lora_up.weight": up, "lora_down.weight": down, "alpha": torch.tensor(3.0)}, weight, None, "x")
    ref = ly_locon.diff_weight(down, up, None, gamma=1.0, backend=TORCH)  # [9, 7, 1, 1]
    assert_close(delta, ref.reshape(9, 7))


def test_conv1x1_layer_with_linear_shaped_lora_factors():
    weight = rand(21, 6, 4, 1, 1)
    up, down = rand(22, 6, 2), rand(23, 2, 4)
    delta, _ = updown({"lora_up.weight": up, "lora_down.weight": down}, weight, None, "x")
    assert_close(delta, ly_locon.diff_weight(down, up, None, gamma=1.0, backend=TORCH).reshape(6, 4, 1, 1))


def test_alpha_zero_follows_a1111_not_lycoris():
    """A1111's calc_scale gives alpha / rank = 0 for alpha 0; LyCORIS would read alpha 0 as alpha = rank."""
    weight = rand(24, 4, 4)
    tensors = {"lora_up.weight": rand(25, 4, 2), "lora_down.weight": rand(26, 2, 4), "alpha": torch.tensor(0.0)}
    delta, _ = updown(tensors, weight, None, "x")
    assert delta.abs().max().item() == 0.0


def test_scale_key_overrides_alpha_over_rank_like_a1111():
    weight = rand(27, 5, 3)
    up, down = rand(28, 5, 2), rand(29, 2, 3)
    tensors = {"lora_up.weight": up, "lora_down.weight": down, "alpha": torch.tensor(8.0), "scale": torch.tensor(0.25)}
    delta, _ = updown(tensors, weight, None, "x")
    assert_close(delta, 0.25 * (up @ down))


# --------------------------------------------------------------------------------------------------------------
# LoHa


def test_loha_linear_plain():
    weight = rand(30, 8, 6)
    w1a, w1b, w2a, w2b = rand(31, 8, 3), rand(32, 3, 6), rand(33, 8, 3), rand(34, 3, 6)
    tensors = {"hada_w1_a": w1a, "hada_w1_b": w1b, "hada_w2_a": w2a, "hada_w2_b": w2b, "alpha": torch.tensor(2.0)}
    delta, _ = updown(tensors, weight, None, "loha")
    # LyCORIS names: w1d = hada_w1_b (down), w1u = hada_w1_a (up)
    assert_close(delta, ly_loha.diff_weight(w1b, w1a, w2b, w2a, None, None, gamma=2.0 / 3, backend=TORCH))


def test_loha_conv_plain_flat_b_matches_lycoris_module():
    """Without Tucker, LyCORIS stores a conv LoHa's b factors flat as [r, in * k * k].

    LyCORIS 4.1.3's LohaModule.get_diff_weight applies alpha / rank twice (once in get_weight, once more in
    get_diff_weight; its forward path applies it once, as A1111 does), so this module comparison uses
    alpha == rank, where both agree; the functional check covers a scale != 1."""
    weight = rand(35, 6, 4, 3, 3)
    w1a, w1b, w2a, w2b = rand(36, 6, 2), rand(37, 2, 36), rand(38, 6, 2), rand(39, 2, 36)
    alpha = torch.tensor(2.0)
    tensors = {"hada_w1_a": w1a, "hada_w1_b": w1b, "hada_w2_a": w2a, "hada_w2_b": w2b, "alpha": alpha}
    delta, _ = updown(tensors, weight, None, "loha_conv")
    layer = nn.Conv2d(4, 6, 3, bias=False)
    with torch.no_grad():
        layer.weight.copy_(weight)
        module = LohaModule.make_module_from_state_dict("l", layer, w1a, w1b, w2a, w2b, None, None, alpha, None)
        ref, _ = module.get_diff_weight()
    assert_close(delta, ref.reshape(weight.shape))
    tensors["alpha"] = torch.tensor(1.0)
    delta, _ = updown(tensors, weight, None, "loha_conv")
    ref = ly_loha.diff_weight(w1b, w1a, w2b, w2a, None, None, gamma=0.5, backend=TORCH)
    assert_close(delta, ref.reshape(weight.shape))


def test_loha_tucker_conv():
    weight = rand(40, 6, 5, 3, 3)
    r = 3
    w1a, w1b, w2a, w2b = rand(41, r, 6), rand(42, r, 5), rand(43, r, 6), rand(44, r, 5)
    t1, t2 = rand(45, r, r, 3, 3), rand(46, r, r, 3, 3)
    tensors = {
        "hada_w1_a": w1a, "hada_w1_b": w1b, "hada_w2_a": w2a, "hada_w2_b": w2b,
        "hada_t1": t1, "hada_t2": t2, "alpha": torch.tensor(1.0),
    }  # fmt: skip
    delta, _ = updown(tensors, weight, None, "loha_tucker")
    ref = ly_loha.diff_weight(w1b, w1a, w2b, w2a, t1, t2, gamma=1.0 / r, backend=TORCH)
    assert_close(delta, ref)


# --------------------------------------------------------------------------------------------------------------
# LoKr


def test_lokr_full_w1_factored_w2_linear():
    weight = rand(50, 4 * 6, 2 * 8)
    w1, w2a, w2b = rand(51, 4, 2), rand(52, 6, 3), rand(53, 3, 8)
    tensors = {"lokr_w1": w1, "lokr_w2_a": w2a, "lokr_w2_b": w2b, "alpha": torch.tensor(2.0)}
    delta, _ = updown(tensors, weight, None, "lokr")
    assert_close(delta, ly_lokr.diff_weight(w1, None, None, None, w2a, w2b, None, gamma=2.0, backend=TORCH))


def test_lokr_factored_both_linear():
    weight = rand(54, 4 * 6, 6 * 5)
    w1a, w1b, w2a, w2b = rand(55, 4, 2), rand(56, 2, 6), rand(57, 6, 2), rand(58, 2, 5)
    tensors = {"lokr_w1_a": w1a, "lokr_w1_b": w1b, "lokr_w2_a": w2a, "lokr_w2_b": w2b, "alpha": torch.tensor(1.0)}
    delta, _ = updown(tensors, weight, None, "lokr")
    assert_close(delta, ly_lokr.diff_weight(None, w1a, w1b, None, w2a, w2b, None, gamma=1.0, backend=TORCH))


def test_lokr_full_both_ignores_alpha():
    """No factored side means no rank: A1111's calc_scale and LyCORIS's rank_scale both give scale 1."""
    weight = rand(59, 2 * 3, 2 * 4)
    w1, w2 = rand(60, 2, 2), rand(61, 3, 4)
    delta, _ = updown({"lokr_w1": w1, "lokr_w2": w2, "alpha": torch.tensor(7.0)}, weight, None, "lokr")
    assert_close(delta, ly_lokr.diff_weight(w1, None, None, w2, None, None, None, gamma=7.0, backend=TORCH))


def test_lokr_conv_full_w2():
    weight = rand(62, 2 * 3, 2 * 2, 3, 3)
    w1, w2 = rand(63, 2, 2), rand(64, 3, 2, 3, 3)
    delta, _ = updown({"lokr_w1": w1, "lokr_w2": w2}, weight, None, "lokr_conv")
    assert_close(delta, ly_lokr.diff_weight(w1, None, None, w2, None, None, None, gamma=1.0, backend=TORCH))


@pytest.mark.parametrize("flat_b", [True, False])
def test_lokr_conv_factored_w2(flat_b):
    """LyCORIS writes a conv LoKr's w2_b flat ([r, d*k*k]); the 4-D [r, d, k, k] form breaks A1111's plain
    `w2a @ w2b`, so difusi flattens it first, as LyCORIS's own rebuild does."""
    weight = rand(65, 2 * 4, 3 * 2, 3, 3)
    w1, w2a = rand(66, 2, 3), rand(67, 4, 2)
    w2b = rand(68, 2, 2 * 9) if flat_b else rand(68, 2, 2, 3, 3)
    tensors = {"lokr_w1": w1, "lokr_w2_a": w2a, "lokr_w2_b": w2b, "alpha": torch.tensor(1.0)}
    delta, _ = updown(tensors, weight, None, "lokr_conv")
    ref = ly_lokr.diff_weight(w1, None, None, None, w2a, w2b, None, gamma=1.0, backend=TORCH)
    assert_close(delta, ref.reshape(weight.shape))


def test_lokr_tucker_t2_conv():
    """Tucker LoKr: w2 = t2 x_1 w2_a x_2 w2_b with w2_a [r, c], w2_b [r, d]. The scale follows A1111
    (alpha / w2_b.shape[0] = alpha / r); LyCORIS's rank_scale would read w2_a.shape[1] = c, the output size, so
    the reference is LyCORIS's kron_weight with the A1111 scale passed explicitly."""
    r = 2
    weight = rand(70, 2 * 5, 3 * 4, 3, 3)
    w1, w2a, w2b, t2 = rand(71, 2, 3), rand(72, r, 5), rand(73, r, 4), rand(74, r, r, 3, 3)
    tensors = {"lokr_w1": w1, "lokr_w2_a": w2a, "lokr_w2_b": w2b, "lokr_t2": t2, "alpha": torch.tensor(3.0)}
    delta, _ = updown(tensors, weight, None, "lokr_t2")
    ref = ly_lokr.kron_weight(w1, None, None, None, w2a, w2b, t2, scale=3.0 / r, backend=TORCH)
    assert_close(delta, ref)


# --------------------------------------------------------------------------------------------------------------
# IA3, full, norm


@pytest.mark.parametrize("on_input", [False, True])
def test_ia3_linear(on_input):
    weight = rand(80, 7, 5)
    w = rand(81, 5 if on_input else 7)
    tensors = {"weight": w, "on_input": torch.tensor(int(on_input))}
    delta, bias = updown(tensors, weight, rand(82, 7), "ia3")
    assert bias is None
    assert_close(delta, ly_ia3_weight(weight, w, on_input, 1.0, True))
    hand = torch.einsum("oi,i->oi", weight, w) if on_input else torch.einsum("oi,o->oi", weight, w)
    assert_close(delta, hand)


@pytest.mark.parametrize("on_input", [False, True])
def test_ia3_conv(on_input):
    """LyCORIS stores a conv IA3 vector as [1, C, 1, 1]; A1111's broadcast only works for Linear layers."""
    weight = rand(83, 6, 4, 3, 3)
    w = rand(84, 1, 4 if on_input else 6, 1, 1)
    delta, _ = updown({"weight": w, "on_input": torch.tensor(int(on_input))}, weight, None, "ia3c")
    assert_close(delta, ly_ia3_weight(weight, w, on_input, 1.0, True))
    flat = w.reshape(-1)
    hand = torch.einsum("oikl,i->oikl", weight, flat) if on_input else torch.einsum("oikl,o->oikl", weight, flat)
    assert_close(delta, hand)


def test_full_diff_and_diff_b_exact():
    weight, bias = rand(90, 6, 4, 3, 3), rand(91, 6)
    diff, diff_b = rand(92, 6, 4, 3, 3), rand(93, 6)
    delta, dbias = updown({"diff": diff, "diff_b": diff_b, "alpha": torch.tensor(4.0)}, weight, bias, "full")
    assert torch.equal(delta, diff)
    assert dbias is not None and torch.equal(dbias, diff_b)


def test_full_bias_delta_kept_when_layer_has_no_bias():
    """A1111 creates the bias in that case (`torch.nn.Parameter(ex_bias)`), so the delta comes back [out]."""
    weight = rand(94, 5, 3)
    _, dbias = updown({"diff": rand(95, 5, 3), "diff_b": rand(96, 5)}, weight, None, "full")
    assert dbias is not None and dbias.shape == (5,)


def test_norm_exact_layernorm_and_groupnorm():
    for seed, channels in ((100, 8), (104, 12)):
        weight, bias = rand(seed, channels), rand(seed + 1, channels)
        w_norm, b_norm = rand(seed + 2, channels), rand(seed + 3, channels)
        delta, dbias = updown({"w_norm": w_norm, "b_norm": b_norm}, weight, bias, "norm")
        assert torch.equal(delta, w_norm)
        assert dbias is not None and torch.equal(dbias, b_norm)


# --------------------------------------------------------------------------------------------------------------
# DoRA


def test_dora_linear_per_output_matches_lycoris_module():
    """LyCORIS's default `wd_on_out=True` layout: dora_scale [out, 1], norm per output row."""
    weight = rand(110, 8, 6)
    up, down = rand(111, 8, 2), rand(112, 2, 6)
    magnitude = rand(113, 8, 1, low=0.5, high=2.0)
    alpha = torch.tensor(1.0)
    tensors = {"lora_up.weight": up, "lora_down.weight": down, "alpha": alpha, "dora_scale": magnitude}
    delta, _ = updown(tensors, weight, None, "dora")
    layer = nn.Linear(6, 8, bias=False)
    with torch.no_grad():
        layer.weight.copy_(weight)
        module = LoConModule.make_module_from_state_dict("d", layer, up, down, None, alpha, magnitude)
        merged, _ = module.get_merged_weight(multiplier=1.0)
    assert_close(delta, merged - weight)


def test_dora_linear_per_input_matches_lycoris_and_a1111_formula():
    """dora_scale [1, in]: the layout A1111's apply_weight_decompose computes (norm per input column)."""
    weight = rand(120, 8, 6)
    up, down = rand(121, 8, 2), rand(122, 2, 6)
    magnitude = rand(123, 1, 6, low=0.5, high=2.0)
    tensors = {"lora_up.weight": up, "lora_down.weight": down, "alpha": torch.tensor(1.0), "dora_scale": magnitude}
    delta, _ = updown(tensors, weight, None, "dora")
    plain = 0.5 * (up @ down)
    merged = ly_general.weight_decompose(weight + plain, magnitude, 1, wd_on_out=False, backend=TORCH)
    assert_close(delta, merged - weight)
    # A1111: merged * (m / ||merged|| over columns) - W, written out by hand
    w_new = weight + plain
    a1111 = w_new * (magnitude / w_new.norm(dim=0, keepdim=True)) - weight
    assert_close(delta, a1111)


@pytest.mark.parametrize("wd_on_out", [True, False])
def test_dora_conv(wd_on_out):
    weight = rand(130, 6, 4, 3, 3)
    up, down = rand(131, 6, 2, 1, 1), rand(132, 2, 4, 3, 3)
    shape = (6, 1, 1, 1) if wd_on_out else (1, 4, 1, 1)
    magnitude = rand(133, *shape, low=0.5, high=2.0)
    tensors = {"lora_up.weight": up, "lora_down.weight": down, "alpha": torch.tensor(2.0), "dora_scale": magnitude}
    delta, _ = updown(tensors, weight, None, "dora_conv")
    plain = ly_locon.diff_weight(down, up, None, gamma=1.0, backend=TORCH)
    merged = ly_general.weight_decompose(weight + plain, magnitude, 1, wd_on_out=wd_on_out, backend=TORCH)
    assert_close(delta, merged - weight)
    if wd_on_out:
        layer = nn.Conv2d(4, 6, 3, bias=False)
        with torch.no_grad():
            layer.weight.copy_(weight)
            module = LoConModule.make_module_from_state_dict("dc", layer, up, down, None, torch.tensor(2.0), magnitude)
            module_merged, _ = module.get_merged_weight(multiplier=1.0)
        assert_close(delta, module_merged - weight)


def test_dora_on_loha():
    """Module check with alpha == rank (see the LoHa module note above), then a functional one at scale 1/2."""
    weight = rand(140, 6, 5)
    w1a, w1b, w2a, w2b = rand(141, 6, 2), rand(142, 2, 5), rand(143, 6, 2), rand(144, 2, 5)
    magnitude = rand(145, 6, 1, low=0.5, high=2.0)
    alpha = torch.tensor(2.0)
    tensors = {
        "hada_w1_a": w1a, "hada_w1_b": w1b, "hada_w2_a": w2a, "hada_w2_b": w2b, "alpha": alpha,
        "dora_scale": magnitude,
    }  # fmt: skip
    delta, _ = updown(tensors, weight, None, "doha")
    layer = nn.Linear(5, 6, bias=False)
    with torch.no_grad():
        layer.weight.copy_(weight)
        module = LohaModule.make_module_from_state_dict("dh", layer, w1a, w1b, w2a, w2b, None, None, alpha, magnitude)
        merged, _ = module.get_merged_weight(multiplier=1.0)
    assert_close(delta, merged - weight)
    tensors["alpha"] = torch.tensor(1.0)
    delta, _ = updown(tensors, weight, None, "doha")
    plain = ly_loha.diff_weight(w1b, w1a, w2b, w2a, None, None, gamma=0.5, backend=TORCH)
    merged = ly_general.weight_decompose(weight + plain, magnitude, 1, wd_on_out=True, backend=TORCH)
    assert_close(delta, merged - weight)


@pytest.mark.parametrize(("stored", "wd_on_out"), [((6,), True), ((4,), False), ((6, 1), True)])
def test_dora_magnitude_without_singleton_axes(stored, wd_on_out):
    """Converters may drop the size-1 axes of dora_scale; the layout is still read from which size it has."""
    weight = rand(146, 6, 4, 3, 3)
    up, down = rand(147, 6, 2, 1, 1), rand(148, 2, 4, 3, 3)
    magnitude = rand(149, *stored, low=0.5, high=2.0)
    tensors = {"lora_up.weight": up, "lora_down.weight": down, "dora_scale": magnitude}
    delta, _ = updown(tensors, weight, None, "dora_flat")
    full_shape = (6, 1, 1, 1) if wd_on_out else (1, 4, 1, 1)
    plain = ly_locon.diff_weight(down, up, None, gamma=1.0, backend=TORCH)
    merged = ly_general.weight_decompose(weight + plain, magnitude.reshape(full_shape), 1, wd_on_out, backend=TORCH)
    assert_close(delta, merged - weight)


def test_dora_scale_of_wrong_shape_is_an_error():
    weight = rand(150, 8, 6)
    tensors = {"lora_up.weight": rand(151, 8, 2), "lora_down.weight": rand(152, 2, 6), "dora_scale": rand(153, 3, 1)}
    with pytest.raises(NetworkError, match="dora_scale shape"):
        updown(tensors, weight, None, "bad")


# --------------------------------------------------------------------------------------------------------------
# Detection, errors, dtypes, the inpainting pad


LAYOUTS = {
    "lora": {"lora_up.weight", "lora_down.weight", "alpha"},
    "lora_cp": {"lora_up.weight", "lora_down.weight", "lora_mid.weight", "alpha", "dora_scale"},
    "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha", "hada_t1", "hada_t2"},
    "lokr_full": {"lokr_w1", "lokr_w2"},
    "lokr_factored": {"lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "alpha"},
    "ia3": {"weight", "on_input"},
    "full": {"diff", "diff_b"},
    "norm": {"w_norm", "b_norm", "bias_indices", "bias_values"},
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_algorithm_of_each_layout(layout):
    tensors = dict.fromkeys(LAYOUTS[layout], torch.zeros(1))
    expected = layout.split("_")[0]
    assert expected in ALGORITHMS
    assert algorithm_of(tensors, "m") == expected


@pytest.mark.parametrize(
    "keys",
    [
        {"oft_blocks", "alpha"},
        {"lora_up.weight", "lora_down.weight", "hada_w1_a"},  # two algorithms mixed
        {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2"},  # one factor stored twice
        {"lokr_w1", "lokr_w2", "lokr_t2"},  # a Tucker core with nothing to rebuild
        {"lora_up.weight", "alpha"},  # half a LoRA
        {"alpha"},
    ],
)
def test_unknown_algorithm_names_the_keys(keys):
    tensors = dict.fromkeys(keys, torch.zeros(1))
    with pytest.raises(NetworkError) as info:
        algorithm_of(tensors, "lora_unet_down_blocks_0")
    err = info.value
    assert err.name == "lora_unet_down_blocks_0"
    assert "unknown network algorithm" in err.message
    assert all(k in err.message for k in keys)
    assert "known: lora, loha, lokr, ia3, full, norm" in err.message
    with pytest.raises(NetworkError):
        updown(tensors, torch.zeros(2, 2), None, "lora_unet_down_blocks_0")


def test_shape_mismatch_is_an_error():
    weight = rand(160, 8, 6)
    tensors = {"lora_up.weight": rand(161, 10, 2), "lora_down.weight": rand(162, 2, 6)}  # 10 outputs, layer has 8
    with pytest.raises(NetworkError, match=r"does not fit the model's layer shape \(8, 6\)") as info:
        updown(tensors, weight, None, "lora_te_mlp")
    assert info.value.name == "lora_te_mlp"
    with pytest.raises(NetworkError, match="does not fit"):
        updown({"diff": rand(163, 6, 8)}, weight, None, "full_t")  # transposed: same numel, still refused
    # An inconsistent file is not a layer misfit: difusi.networks.apply skips layers whose error says "shape".
    with pytest.raises(NetworkError, match="do not multiply") as info:
        updown({"lora_up.weight": rand(164, 8, 3), "lora_down.weight": rand(165, 2, 6)}, weight, None, "rank")
    assert "shape" not in info.value.message
    with pytest.raises(NetworkError, match="bias"):
        updown({"diff": rand(166, 8, 6), "diff_b": rand(167, 7)}, weight, rand(168, 8), "full_b")
    with pytest.raises(NetworkError, match="ia3"):
        updown({"weight": rand(169, 5), "on_input": torch.tensor(0)}, weight, None, "ia3_t")


def test_half_precision_inputs_give_float32_on_the_weight_device():
    weight = rand(170, 6, 4).half()
    up, down = rand(171, 6, 2).to(torch.bfloat16), rand(172, 2, 4).half()
    delta, _ = updown({"lora_up.weight": up, "lora_down.weight": down}, weight, None, "fp16")
    assert delta.dtype == torch.float32 and delta.device == weight.device
    assert_close(delta, up.float() @ down.float())


def test_inpainting_conv_in_gets_zero_padded_channels_like_a1111():
    """A1111 pads a 4-input-channel delta with zeros onto an inpainting model's 9-channel conv_in."""
    weight = rand(180, 6, 9, 3, 3)
    up, down = rand(181, 6, 2, 1, 1), rand(182, 2, 4, 3, 3)
    delta, _ = updown({"lora_up.weight": up, "lora_down.weight": down}, weight, None, "conv_in")
    plain = ly_locon.diff_weight(down, up, None, gamma=1.0, backend=TORCH)
    assert delta.shape == weight.shape
    assert_close(delta[:, :4], plain)
    assert delta[:, 4:].abs().max().item() == 0.0
