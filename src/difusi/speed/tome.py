"""Token Merging for Stable Diffusion (Bolya & Hoffman 2023, arXiv:2303.17604), self-attention only.

Before each self-attention of the highest-resolution transformer blocks, `r = ratio * N` of the N
tokens are merged into their most similar neighbours (bipartite soft matching, Bolya et al. 2023
"Token Merging: Your ViT but Faster"): the token grid is split into 2x2 tiles, one token per tile is a
destination, every other token (a source) finds its most similar destination by cosine similarity,
and the r sources with the highest similarity are averaged into their destinations. Attention runs
on the N - r remaining tokens; afterwards every merged source takes its destination's output
(unmerge). This is the paper's recommended setting (merge attention only, max_downsample 1, 2x2
strides), like A1111's `token_merging_ratio` (infotext "Token merging ratio"), except that the
destination is always a tile's top-left token instead of a random one: the image then depends only on
the seed, as every other difusi image does. "Highest resolution" means the highest that has
attention: SDXL has none at full latent resolution, so there merging acts at half resolution
(tomesd's max_downsample=1 would silently do nothing on SDXL).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

INFOTEXT_KEY = "Token merging ratio"
MAX_RATIO = 0.75
"""At most every source token (3 of each 2x2 tile) can merge."""


def _split_indices(height: int, width: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(source, destination) token indices of a height x width grid: destinations are tile top-lefts."""
    ys = torch.arange(height, device=device)[:, None]
    xs = torch.arange(width, device=device)[None, :]
    # Only whole 2x2 tiles have a destination; an odd last row/column holds sources only.
    is_dst = ((ys % 2 == 0) & (ys < height // 2 * 2) & (xs % 2 == 0) & (xs < width // 2 * 2)).flatten()
    index = torch.arange(height * width, device=device)
    return index[~is_dst], index[is_dst]


def bipartite_merge(metric: torch.Tensor, height: int, width: int, r: int) -> tuple[Callable, Callable]:
    """Merge/unmerge functions for tokens [B, N, C] on a height x width grid (N = height * width).

    `merge(x)` -> [B, N - r, C]: unmerged sources, then destinations averaged with the sources merged
    into them. `unmerge(y)` -> [B, N, C]: every token gets its own output, merged sources their destination's.
    """
    batch, tokens, _ = metric.shape
    src_idx, dst_idx = _split_indices(height, width, metric.device)
    r = min(r, len(src_idx))
    if r <= 0 or len(dst_idx) == 0:
        return (lambda x: x), (lambda x: x)
    normed = metric / metric.norm(dim=-1, keepdim=True)
    similarity = normed[:, src_idx] @ normed[:, dst_idx].transpose(1, 2)  # [B, S, D]
    best, best_dst = similarity.max(dim=-1)  # each source's most similar destination
    order = best.argsort(dim=-1, descending=True)
    merged, kept = order[:, :r], order[:, r:]  # positions within the source list
    target = best_dst.gather(1, merged)  # destination slot of each merged source

    def merge(x: torch.Tensor) -> torch.Tensor:
        channels = x.shape[-1]
        src, dst = x[:, src_idx], x[:, dst_idx]
        kept_src = src.gather(1, kept[..., None].expand(-1, -1, channels))
        moving = src.gather(1, merged[..., None].expand(-1, -1, channels))
        dst = dst.scatter_reduce(1, target[..., None].expand(-1, -1, channels), moving, reduce="mean", include_self=True)
        return torch.cat([kept_src, dst], dim=1)

    def unmerge(y: torch.Tensor) -> torch.Tensor:
        channels = y.shape[-1]
        kept_out, dst_out = y[:, : kept.shape[1]], y[:, kept.shape[1] :]
        out = y.new_empty(batch, tokens, channels)
        out[:, dst_idx] = dst_out
        src_out = y.new_empty(batch, len(src_idx), channels)
        src_out.scatter_(1, kept[..., None].expand(-1, -1, channels), kept_out)
        src_out.scatter_(1, merged[..., None].expand(-1, -1, channels), dst_out.gather(1, target[..., None].expand(-1, -1, channels)))
        out[:, src_idx] = src_out
        return out

    return merge, unmerge


def _first_attention_level(unet: Any) -> int:
    """Index of the first down block with attention (0 for SD1/SD2, 1 for SDXL)."""
    for level, block in enumerate(unet.down_blocks):
        if getattr(block, "attentions", None):
            return level
    return 0


def _self_attentions(unet: Any) -> list[Any]:
    # By class name: difusi's own transformer block (difusi.models.layers) and diffusers' (a test reference) alike.
    return [block.attn1 for block in unet.modules() if type(block).__name__ == "BasicTransformerBlock"]


@contextmanager
def token_merging(unet: Any, ratio: float) -> Iterator[None]:
    """Within the block, the UNet's highest-resolution self-attentions run on merged tokens."""
    if ratio <= 0:
        yield
        return
    ratio = min(ratio, MAX_RATIO)
    grid: dict[str, int] = {}
    attentions = _self_attentions(unet)
    original_unet_forward = unet.forward
    previous = vars(unet).get("forward")  # another mode's wrapper, put back on exit

    halvings = _first_attention_level(unet)

    def unet_forward(sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        height, width = sample.shape[-2], sample.shape[-1]
        for _ in range(halvings):  # diffusers' stride-2, padding-1 downsamplers round up
            height, width = (height + 1) // 2, (width + 1) // 2
        grid["height"], grid["width"] = height, width
        return original_unet_forward(sample, *args, **kwargs)

    def merged(attention: Any) -> Callable:
        original = attention.forward

        def forward(hidden_states: torch.Tensor, encoder_hidden_states: Any = None, *args: Any, **kwargs: Any) -> Any:
            height, width = grid.get("height", 0), grid.get("width", 0)
            if encoder_hidden_states is not None or hidden_states.ndim != 3 or hidden_states.shape[1] != height * width:
                return original(hidden_states, encoder_hidden_states, *args, **kwargs)
            merge, unmerge = bipartite_merge(hidden_states, height, width, int(hidden_states.shape[1] * ratio))
            return unmerge(original(merge(hidden_states), None, *args, **kwargs))

        return forward

    try:
        for attention in attentions:
            attention.forward = merged(attention)
        unet.forward = unet_forward
        yield
    finally:
        for attention in attentions:
            if "forward" in vars(attention):
                del attention.forward
        _restore_forward(unet, previous)


def _restore_forward(module: Any, previous: Any) -> None:
    if previous is not None:
        module.forward = previous
    elif "forward" in vars(module):
        del module.forward
