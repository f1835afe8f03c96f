"""The weight delta of one network module, for every LoRA / LyCORIS algorithm difusi loads.

Input: the tensors of one module (keys already normalized by the file reader to the suffixes below) and the
model layer's weight / bias. Output: the delta at multiplier 1, in float32, shaped like the layer; the caller
merges `W + multiplier * delta`, as A1111's `finalize_updown` does (`updown * calc_scale() * multiplier`, DoRA
applied before the multiplier).

Sources read for the math (no code copied):
- A1111 stable-diffusion-webui `extensions-builtin/Lora/network.py` (`calc_scale`, `finalize_updown`,
  `apply_weight_decompose`), `network_lora.py`, `network_hada.py`, `network_lokr.py`, `network_ia3.py`,
  `network_full.py`, `network_norm.py`, `lyco_helpers.py`, `networks.py` (the inpainting-channel pad and the
  "create the bias when the layer has none" rule).
- LyCORIS 4.1.3 (`lycoris/functional/{locon,loha,lokr,general}.py`, `lycoris/modules/{ia3,full,norm,locon,
  lokr}.py`).

Where the two differ, A1111 wins, since difusi's outputs are meant to match A1111's:
- alpha == 0: A1111 scales by 0 / rank = 0 (the module does nothing); LyCORIS and kohya read 0 as "alpha = rank".
- LoKr rank: A1111 takes it from `lokr_w2_b.shape[0]`, else `lokr_w1_b.shape[0]`; LyCORIS from
  `lokr_w1_a.shape[1]`, else `lokr_w2_a.shape[1]`. They agree except for Tucker LoKr, where LyCORIS reads the
  output size of `lokr_w2_a` ([rank, out]) as the rank.
- DoRA at multiplier m != 1: A1111 merges `W + m * (DoRA(W + dW) - W)`; LyCORIS merges
  `(W + dW) * (m * (s - 1) + 1)` with s = magnitude / norm. They agree at m = 1, which is all this module returns.
- A "scale" tensor, which A1111 reads for every module, overrides alpha / rank; LyCORIS never writes one.
- LyCORIS 4.1.3's LoHa / LoKr modules apply alpha / rank twice in their merge path (`get_diff_weight`
  scales `get_weight`, which is already scaled); their forward path and A1111 apply it once, as here.
Where A1111 has a plain bug, the intended math is used instead and the function says so (LoKr conv with a 4-D
`lokr_w2_b`, IA3 on conv layers).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from difusi.errors import NetworkError

ALGORITHMS: tuple[str, ...] = ("lora", "loha", "lokr", "ia3", "full", "norm")

# Sparse-bias entries some files carry next to the weights; none of the weight math here reads them.
_IGNORED = frozenset({"bias_indices", "bias_values", "bias_size"})
# Keys any algorithm may carry.
_SHARED = frozenset({"alpha", "scale", "dora_scale"})

_ALLOWED: dict[str, frozenset[str]] = {
    "lora": frozenset({"lora_up.weight", "lora_down.weight", "lora_mid.weight"}),
    "loha": frozenset({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"}),
    "lokr": frozenset({"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"}),
    "ia3": frozenset({"weight", "on_input"}),
    "full": frozenset({"diff", "diff_b"}),
    "norm": frozenset({"w_norm", "b_norm"}),
}


def _lokr_side_ok(keys: frozenset[str], side: str) -> bool:
    """One Kronecker factor is either stored whole or as an a @ b pair, never both, never half a pair."""
    whole = f"lokr_{side}" in keys
    pair = {f"lokr_{side}_a", f"lokr_{side}_b"} & keys
    return (whole and not pair) or (not whole and len(pair) == 2)


def _complete(name: str, keys: frozenset[str]) -> bool:
    """Whether `keys` (the algorithm-specific ones) hold everything `name` needs."""
    if name == "lokr":
        tucker_ok = "lokr_t2" not in keys or "lokr_w2_a" in keys
        return _lokr_side_ok(keys, "w1") and _lokr_side_ok(keys, "w2") and tucker_ok
    required = {
        "lora": {"lora_up.weight", "lora_down.weight"},
        "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"},
        "ia3": {"weight"},
        "full": {"diff"},
        "norm": {"w_norm"},
    }[name]
    return required <= keys


def algorithm_of(tensors: Mapping[str, Tensor], module_key: str) -> str:
    """Which of `ALGORITHMS` one module's tensors are (see the module docstring for each key layout).

    Strict on purpose: a key set that is a mix of two algorithms, or of an algorithm difusi lacks (OFT, GLoRA,
    BOFT), raises NetworkError naming the keys instead of silently merging part of the module.
    """
    keys = frozenset(tensors) - _IGNORED
    own = keys - _SHARED
    for name in ALGORITHMS:
        if own and own <= _ALLOWED[name] and _complete(name, own):
            return name
    raise NetworkError(
        module_key, f"unknown network algorithm: keys {', '.join(sorted(keys))}, known: {', '.join(ALGORITHMS)}"
    )


# ---------------------------------------------------------------------------------------------------------------
# Building blocks


def _shape(tensor: Tensor) -> tuple[int, ...]:
    return tuple(tensor.shape)


def _f32(tensor: Tensor, device: torch.device) -> Tensor:
    return tensor.to(device=device, dtype=torch.float32)


def _matmul(a: Tensor, b: Tensor, what: str, module_key: str) -> Tensor:
    """a.flatten(1) @ b.flatten(1): conv factors are matrices over (in, kh, kw) in row-major order.

    Errors about the file's own tensors avoid the word "shape": the caller reads "shape" as "this layer does not
    fit the model" (skipped with a warning), while an inconsistent file must fail loudly.
    """
    a2 = a.reshape(a.shape[0], -1)
    b2 = b.reshape(b.shape[0], -1)
    if a2.shape[1] != b2.shape[0]:
        raise NetworkError(
            module_key, f"{what} {tuple(a.shape)} and {tuple(b.shape)} do not multiply: the file is inconsistent"
        )
    return a2 @ b2


def _tucker(core: Tensor, wa: Tensor, wb: Tensor) -> Tensor:
    """Rebuild a Tucker-2 factored kernel: out[p, q, ...] = sum_ij core[i, j, ...] wa[i, p] wb[j, q].

    The LyCORIS layout for LoHa `hada_t*` and LoKr `lokr_t2`: `wa` is [rank, out], `wb` is [rank, in]
    (A1111 `lyco_helpers.make_weight_cp`, LyCORIS `functional.general.rebuild_tucker`).
    """
    return torch.einsum("ij...,ip,jq->pq...", core, wa.reshape(wa.shape[0], -1), wb.reshape(wb.shape[0], -1))


# ---------------------------------------------------------------------------------------------------------------
# One function per algorithm: (delta before the alpha scale, bias delta or None, rank or None).

_Parts = tuple[Tensor, Tensor | None, int | None]


def _lora(t: Mapping[str, Tensor], weight: Tensor, module_key: str) -> _Parts:
    """LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"): dW = up @ down.

    Also LoCon (the conv variant): `lora_down` may be a k x k conv [rank, in, k, k] with a 1x1 `lora_up`
    [out, rank, 1, 1], giving dW[o, i, y, x] = sum_r up[o, r] down[r, i, y, x]; Linear layers may come with
    conv-shaped [*, *, 1, 1] factors (the delta is reshaped to the layer). With kohya's CP decomposition
    (`lora_mid` [rank, rank, k, k], 1x1 up and down): dW[o, i, ...] = sum_nm mid[n, m, ...] up[o, n] down[m, i]
    (A1111 `rebuild_cp_decomposition`, LyCORIS `tucker_weight_from_conv`). Rank = rows of `lora_down`.
    """
    dev = weight.device
    up, down = _f32(t["lora_up.weight"], dev), _f32(t["lora_down.weight"], dev)
    rank = down.shape[0]
    if "lora_mid.weight" in t:
        mid = _f32(t["lora_mid.weight"], dev)
        up2, down2 = up.reshape(up.shape[0], -1), down.reshape(rank, -1)
        if mid.dim() < 2 or mid.shape[0] != up2.shape[1] or mid.shape[1] != rank:
            raise NetworkError(
                module_key,
                f"lora_mid {tuple(mid.shape)} does not match lora_up {tuple(up.shape)} / lora_down "
                f"{tuple(down.shape)}: the file is inconsistent",
            )
        return torch.einsum("nm...,on,mi->oi...", mid, up2, down2), None, rank
    delta = _matmul(up, down, "lora_up / lora_down", module_key)
    if down.dim() == 4:
        delta = delta.reshape(up.shape[0], down.shape[1], *down.shape[2:])
    return delta, None, rank


def _hada_half(t: Mapping[str, Tensor], n: int, dev: torch.device, module_key: str) -> Tensor:
    """One factor of the Hadamard product: w_a @ w_b, or its Tucker rebuild when `hada_t{n}` is present."""
    wa, wb = _f32(t[f"hada_w{n}_a"], dev), _f32(t[f"hada_w{n}_b"], dev)
    if f"hada_t{n}" in t:
        return _tucker(_f32(t[f"hada_t{n}"], dev), wa, wb)
    half = _matmul(wa, wb, f"hada_w{n}_a / hada_w{n}_b", module_key)
    return half.reshape(wa.shape[0], *wb.shape[1:]) if wb.dim() > 2 else half


def _loha(t: Mapping[str, Tensor], weight: Tensor, module_key: str) -> _Parts:
    """LoHa (LyCORIS; Yeh et al. 2023, "Navigating Text-To-Image Customization: From LyCORIS Fine-Tuning to
    Model Evaluation"; after FedPara, Hyeon-Woo et al. 2022): dW = (w1_a @ w1_b) * (w2_a @ w2_b), elementwise.

    With Tucker cores (`hada_t1`, `hada_t2` [rank, rank, k, k]; then `hada_w*_a` is [rank, out] and `hada_w*_b`
    [rank, in]) each half is the Tucker rebuild. Rank (for alpha / rank) = `hada_w1_b.shape[0]`, as in both
    A1111 and LyCORIS.
    """
    dev = weight.device
    first, second = _hada_half(t, 1, dev, module_key), _hada_half(t, 2, dev, module_key)
    if first.numel() != second.numel():
        raise NetworkError(
            module_key,
            f"loha halves {tuple(first.shape)} and {tuple(second.shape)} do not match: the file is inconsistent",
        )
    if first.shape != second.shape:
        # A Tucker half is [out, in, k, k], a plain one [out, in * k * k]: the same row-major layout.
        second = second.reshape(first.shape)
    return first * second, None, int(t["hada_w1_b"].shape[0])


def _lokr_w2(t: Mapping[str, Tensor], dev: torch.device, module_key: str) -> Tensor:
    """The larger Kronecker factor: whole, a @ b, or Tucker-rebuilt from `lokr_t2`.

    For conv layers LyCORIS stores a factored w2 as [c, rank] @ [rank, d * k * k] or [rank, d, k, k]; A1111's
    plain `w2a @ w2b` breaks on the 4-D form, so b is flattened first and the product reshaped back.
    """
    if "lokr_w2" in t:
        return _f32(t["lokr_w2"], dev)
    wa, wb = _f32(t["lokr_w2_a"], dev), _f32(t["lokr_w2_b"], dev)
    if "lokr_t2" in t:
        return _tucker(_f32(t["lokr_t2"], dev), wa, wb)
    w2 = _matmul(wa, wb, "lokr_w2_a / lokr_w2_b", module_key)
    return w2.reshape(wa.shape[0], *wb.shape[1:]) if wb.dim() > 2 else w2


def _lokr(t: Mapping[str, Tensor], weight: Tensor, module_key: str) -> _Parts:
    """LoKr (LyCORIS; Yeh et al. 2023, "Navigating Text-To-Image Customization: From LyCORIS Fine-Tuning to
    Model Evaluation"): dW = kron(w1, w2), each factor stored whole or as a low-rank a @ b pair.

    For conv layers w2 carries the kernel axes, and w1 is broadcast over them (kron of [a, b, 1, 1] with
    [c, d, k, k] -> [a c, b d, k, k]). Rank follows A1111: `lokr_w2_b.shape[0]` if w2 is factored, else
    `lokr_w1_b.shape[0]`, else none (then alpha is ignored and the scale is 1, in LyCORIS too).
    """
    dev = weight.device
    if "lokr_w1" in t:
        w1 = _f32(t["lokr_w1"], dev)
    else:
        w1 = _matmul(_f32(t["lokr_w1_a"], dev), _f32(t["lokr_w1_b"], dev), "lokr_w1_a / lokr_w1_b", module_key)
    w2 = _lokr_w2(t, dev, module_key)
    if w1.dim() != 2:
        raise NetworkError(module_key, f"lokr w1 must be a matrix, got {tuple(w1.shape)}: the file is inconsistent")
    w1 = w1.reshape(*w1.shape, *([1] * (w2.dim() - 2)))
    rank = None
    for key in ("lokr_w2_b", "lokr_w1_b"):
        if key in t:
            rank = int(t[key].shape[0])
            break
    return torch.kron(w1, w2.contiguous()), None, rank


def _ia3(t: Mapping[str, Tensor], weight: Tensor, module_key: str) -> _Parts:
    """(IA)^3 (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
    Learning"): the layer is rescaled by a learned vector, W' = W * (1 + w), so dW = W * w.

    `w` scales output rows, or input columns when `on_input` is true. A1111's broadcasting only works for
    Linear layers; for conv layers this scales the out / in channel axis, as LyCORIS does.
    """
    dev = weight.device
    w = _f32(t["weight"], dev).reshape(-1)
    on_input = bool(t["on_input"].reshape(-1)[0].item()) if "on_input" in t else False
    if weight.dim() < 2:
        raise NetworkError(module_key, f"ia3 needs a Linear or conv layer, the layer shape is {_shape(weight)}")
    axis = 1 if on_input else 0
    if w.numel() != weight.shape[axis]:
        raise NetworkError(
            module_key,
            f"ia3 weight shape {tuple(t['weight'].shape)} does not fit the model's layer shape {_shape(weight)} "
            f"({'input' if on_input else 'output'} channels)",
        )
    view = [1] * weight.dim()
    view[axis] = -1
    return _f32(weight, dev) * w.reshape(view), None, None


def _full(t: Mapping[str, Tensor], weight: Tensor, module_key: str) -> _Parts:
    """Full fine-tune difference (LyCORIS "full" / "diff"): dW = diff, dB = diff_b; no rank, no alpha."""
    dev = weight.device
    diff_b = _f32(t["diff_b"], dev) if "diff_b" in t else None
    return _f32(t["diff"], dev), diff_b, None


def _norm(t: Mapping[str, Tensor], weight: Tensor, module_key: str) -> _Parts:
    """Norm-layer tuning (LyCORIS "norm"): LayerNorm / GroupNorm affine parameters shift by w_norm and b_norm."""
    dev = weight.device
    b_norm = _f32(t["b_norm"], dev) if "b_norm" in t else None
    return _f32(t["w_norm"], dev), b_norm, None


_BUILDERS: dict[str, Callable[[Mapping[str, Tensor], Tensor, str], _Parts]] = {
    "lora": _lora,
    "loha": _loha,
    "lokr": _lokr,
    "ia3": _ia3,
    "full": _full,
    "norm": _norm,
}


# ---------------------------------------------------------------------------------------------------------------
# Shared epilogue: scale, fit to the layer, DoRA.


def _scale(t: Mapping[str, Tensor], rank: int | None) -> float:
    """A1111 `calc_scale`: an explicit "scale" wins, else alpha / rank when both exist, else 1 (alpha 0 -> 0)."""
    if "scale" in t:
        return float(t["scale"].float().reshape(-1)[0].item())
    if rank is not None and "alpha" in t:
        return float(t["alpha"].float().reshape(-1)[0].item()) / rank
    return 1.0


def _fit(delta: Tensor, weight: Tensor, name: str, module_key: str) -> Tensor:
    """Reshape `delta` to the layer's weight shape, or raise.

    A row-major reshape is exact when the output axis agrees and the element count does: that covers a
    Linear layer with [out, in, 1, 1] factors, a 1x1 conv with Linear factors, and conv factors stored flat as
    [out, in * k * k]. A1111 also zero-pads a 4-input-channel delta onto an inpainting model's 9-channel
    conv (`networks.py`), so the same is done here.
    """
    if delta.shape == weight.shape:
        return delta
    if delta.dim() >= 1 and weight.dim() >= 1 and delta.shape[0] == weight.shape[0]:
        if delta.numel() == weight.numel():
            return delta.reshape(weight.shape)
        if weight.dim() == 4 and weight.shape[1] == 9 and delta.numel() * 9 == weight.numel() * 4:
            four = delta.reshape(weight.shape[0], 4, *weight.shape[2:])
            return torch.nn.functional.pad(four, (0, 0, 0, 0, 0, 5))
    raise NetworkError(
        module_key, f"{name} delta shape {tuple(delta.shape)} does not fit the model's layer shape {_shape(weight)}"
    )


def _fit_bias(delta: Tensor | None, weight: Tensor, bias: Tensor | None, name: str, module_key: str) -> Tensor | None:
    """Shape the bias delta like the layer's bias; when the layer has none A1111 creates one, so the delta is
    still returned, shaped [out] (the caller decides whether to add a bias)."""
    if delta is None:
        return None
    target = tuple(bias.shape) if bias is not None else (weight.shape[0],)
    if delta.numel() != int(torch.Size(target).numel()):
        raise NetworkError(
            module_key, f"{name} bias delta shape {tuple(delta.shape)} does not fit the model's bias shape {target}"
        )
    return delta.reshape(target)


def _weight_decompose(delta: Tensor, weight: Tensor, dora_scale: Tensor, module_key: str) -> Tensor:
    """DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation"): the merged weight W + dW keeps
    its direction and takes its magnitude from `dora_scale`: W' = (W + dW) * m / ||W + dW||; returns W' - W.

    The norm axis follows the stored magnitude's layout. [1, in, 1...] (or [in]) is a norm per input column,
    which is what A1111's `apply_weight_decompose` always computes (and LyCORIS with `wd_on_out=False`);
    [out, 1, 1...] (or [out]) is LyCORIS's default `wd_on_out=True` layout, a norm per output row, which
    A1111 would silently broadcast into a wrong [out, in] matrix. A square layer with a 1-D magnitude is
    read per input column, as A1111 broadcasts it. Like LyCORIS, float32 eps is added to the norm so that an
    all-zero column gives 0, not NaN (a relative change of about 1e-7).
    """
    if weight.dim() < 2:
        raise NetworkError(module_key, f"dora_scale needs a Linear or conv layer, the layer shape is {_shape(weight)}")
    out_ch, in_ch, extra = weight.shape[0], weight.shape[1], weight.dim() - 2
    m = _f32(dora_scale, weight.device)
    per_in = (1, in_ch, *[1] * extra)
    per_out = (out_ch, 1, *[1] * extra)
    # Trailing singleton axes may be missing (e.g. [out, 1] for a conv), so look at the first two only.
    lead = tuple(m.shape[:2]) if m.dim() >= 2 else None
    if m.numel() == in_ch and (lead == (1, in_ch) or m.dim() == 1):
        axis = 1
    elif m.numel() == out_ch and (lead == (out_ch, 1) or m.dim() == 1):
        axis = 0
    else:
        raise NetworkError(
            module_key,
            f"dora_scale shape {tuple(dora_scale.shape)} does not fit the model's layer shape {_shape(weight)}",
        )
    base = _f32(weight, weight.device)
    merged = base + delta
    other_axes = [d for d in range(merged.dim()) if d != axis]
    norm = torch.linalg.vector_norm(merged, dim=other_axes, keepdim=True) + torch.finfo(torch.float32).eps
    m = m.reshape(per_in if axis == 1 else per_out)
    return merged * (m / norm) - base


def updown(
    tensors: Mapping[str, Tensor], weight: Tensor, bias: Tensor | None, module_key: str
) -> tuple[Tensor, Tensor | None]:
    """(delta for `weight`, delta for `bias` or None) at multiplier 1, in float32 on `weight`'s device.

    The weight delta is shaped like `weight` and includes the alpha / rank scale (A1111 `calc_scale`) and, when
    `dora_scale` is present, the DoRA rescale (so the caller's `W + multiplier * delta` matches A1111's
    `finalize_updown`). The bias delta (full `diff_b`, norm `b_norm`; not alpha-scaled, as in A1111) is shaped
    like `bias`, or [out] when the layer has no bias. Raises NetworkError on an unknown key set or a delta that
    does not fit the layer.
    """
    name = algorithm_of(tensors, module_key)
    raw, raw_bias, rank = _BUILDERS[name](tensors, weight, module_key)
    delta = _fit(raw, weight, name, module_key) * _scale(tensors, rank)
    if "dora_scale" in tensors:
        delta = _weight_decompose(delta, weight, tensors["dora_scale"], module_key)
    return delta, _fit_bias(raw_bias, weight, bias, name, module_key)
