"""DeepCache: reuse the UNet's deep features across sampling steps (Ma, Fang & Wang 2023, arXiv:2312.00858).

Adjacent denoising steps change the UNet's high-level features very little. DeepCache runs the full
network every `interval`-th call and, in between, only the shallowest path: `conv_in`, the first down
block (whose skip connections feed the last up block) and the last up block, taking the input of that
last up block (the output of the deeper up blocks) from the last full call. This is the paper's
uniform schedule with the cache at the outermost skip branch (their `cache_layer_id=0, block_id=0`).

Implemented without touching diffusers' forward: while enabled, the deep blocks (`down_blocks[1:]`,
`mid_block`, `up_blocks[:-1]`) memoise their outputs on full calls and return them on cached calls, so
their compute is skipped and the UNet's own forward wires everything as usual. A cache entry belongs to
one input shape (a batch size change, e.g. under NGMS, starts with a full call); `interval=1` is exact.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

INFOTEXT_KEY = "DeepCache interval"


class _Schedule:
    """Counts UNet calls per input shape and says whether the current call recomputes the deep blocks."""

    def __init__(self, interval: int):
        self.interval = interval
        self.since_full: dict[tuple, int] = {}
        self.shape: tuple | None = None
        self.full = True
        self.outputs: dict[tuple[tuple, int], Any] = {}

    def start_call(self, shape: tuple) -> None:
        self.shape = shape
        count = self.since_full.get(shape)
        self.full = count is None or count + 1 >= self.interval
        self.since_full[shape] = 0 if self.full else count + 1


def _memoised(block: Any, key: int, schedule: _Schedule):
    original = block.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        slot = (schedule.shape, key)
        if schedule.full or slot not in schedule.outputs:
            schedule.outputs[slot] = original(*args, **kwargs)
        return schedule.outputs[slot]

    return forward


@contextmanager
def deepcache(unet: Any, interval: int) -> Iterator[None]:
    """Within the block, `unet` recomputes its deep blocks only every `interval`-th call per input shape."""
    if interval <= 1:
        yield
        return
    schedule = _Schedule(interval)
    deep = [*unet.down_blocks[1:], unet.mid_block, *unet.up_blocks[:-1]]
    original_unet_forward = unet.forward
    previous = vars(unet).get("forward")  # another mode's wrapper, put back on exit

    def unet_forward(sample: Any, *args: Any, **kwargs: Any) -> Any:
        schedule.start_call(tuple(sample.shape))
        return original_unet_forward(sample, *args, **kwargs)

    try:
        for key, block in enumerate(deep):
            if block is not None:
                block.forward = _memoised(block, key, schedule)
        unet.forward = unet_forward
        yield
    finally:
        for block in deep:
            if block is not None and "forward" in vars(block):
                del block.forward
        if previous is not None:
            unet.forward = previous
        elif "forward" in vars(unet):
            del unet.forward
        schedule.outputs.clear()
