"""Philox-4x32-10 and the normal transform of torch's CUDA `randn`, in NumPy (A1111's "NV" noise source).

Philox-4x32-10 is the counter-based generator of Salmon, Moraes, Dror and Shaw, "Parallel random numbers:
as easy as 1, 2, 3" (SC 2011): a 4 x 32-bit counter is encrypted under a 2 x 32-bit key by 10 rounds of
two 32x32->64-bit multiplications, with a Weyl sequence bumping the key between rounds.

torch's CUDA generator (cuRAND's `curandStatePhilox4_32_10_t`) uses it as follows, and A1111's
`modules/rng_philox.py` emulates it on the CPU so images made with A1111's default "GPU" source can be
remade anywhere; this module does the same:

- key = the seed (64 bits), low word first;
- element `i` of a draw uses counter (offset low, offset high, i low, i high) and only the first two
  output words x, y;
- Box-Muller, sine branch: `u = x * 2^-32 + 2^-33`, `v = y * (2^-32 * 2pi) + (2^-32 * 2pi) / 2`,
  `sqrt(-2 ln u) * sin(v)`;
- every `randn` call on the generator advances the offset by one.

This mapping equals CUDA for tensors small enough that torch's kernel gives every element its own thread
(torch launches at most SMs x max-threads-per-SM threads, each producing up to 4 values per offset step).
A single SD/SDXL latent (at most 4 x 128 x 128 = 65,536 values) is far below that on any recent GPU; much
larger tensors use a grid-stride layout on CUDA that depends on the GPU model, which neither A1111 nor we
emulate.

Numerics follow A1111's emulation exactly (which is what difusi must reproduce): the constants are rounded
to float32 like cuRAND's, but NumPy promotes the uint32 x float32 products to float64, so the transform
runs in float64 and only the result is rounded to float32. cuRAND itself computes in float32 with `logf`
and `sinf`; the two agree to a few float32 ulps (see tests/rng).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

PHILOX_M0 = 0xD2511F53  # round multipliers (Salmon et al. 2011, table 2)
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9  # Weyl key increments: golden ratio and sqrt(3) - 1, as 32-bit fractions
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10

_MASK32 = 0xFFFFFFFF
# cuRAND's CURAND_2POW32_INV and CURAND_2POW32_INV_2PI, formed as A1111 forms them (the 2pi one from a
# double product rounded to float32), then widened as NumPy widens them in A1111's Box-Muller.
_TWO_POW32_INV = np.float64(np.float32(2.3283064e-10))
_TWO_POW32_INV_2PI = np.float64(np.float32(2.3283064e-10 * 6.2831855))


def philox4x32(counter: np.ndarray, key: tuple[int, int], rounds: int = PHILOX_ROUNDS) -> np.ndarray:
    """Encrypt counters with Philox-4x32-`rounds` under one key.

    `counter` is a (4, N) uint32 array (N independent counters, word 0 first); `key` two 32-bit words.
    Returns a new (4, N) uint32 array; `counter` is not modified.
    """
    if counter.ndim != 2 or counter.shape[0] != 4:
        raise ValueError(f"counter must have shape (4, N), got {counter.shape}")
    c0, c1, c2, c3 = (np.asarray(word, dtype=np.uint32) for word in counter)
    k0, k1 = int(key[0]) & _MASK32, int(key[1]) & _MASK32
    for round_index in range(rounds):
        if round_index:  # the key is bumped before every round but the first
            k0, k1 = (k0 + PHILOX_W0) & _MASK32, (k1 + PHILOX_W1) & _MASK32
        c0, c1, c2, c3 = _philox_round(c0, c1, c2, c3, k0, k1)
    return np.stack([c0, c1, c2, c3])


def _philox_round(c0: np.ndarray, c1: np.ndarray, c2: np.ndarray, c3: np.ndarray,
                  k0: int, k1: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One Philox-4x32 round: two full 64-bit products (uint64 holds them exactly), their halves mixed."""
    hi0, lo0 = _mulhilo(c0, PHILOX_M0)
    hi1, lo1 = _mulhilo(c2, PHILOX_M1)
    return hi1 ^ c1 ^ np.uint32(k0), lo1, hi0 ^ c3 ^ np.uint32(k1), lo0


def _mulhilo(word: np.ndarray, multiplier: int) -> tuple[np.ndarray, np.ndarray]:
    product = word.astype(np.uint64) * np.uint64(multiplier)
    return (product >> np.uint64(32)).astype(np.uint32), (product & np.uint64(_MASK32)).astype(np.uint32)


def box_muller(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """cuRAND's Box-Muller (sine branch) of two uint32 arrays, with A1111's float64 arithmetic, as float32.

    u lies in (0, 1) (the half-step offset keeps it off 0, so the log is finite).
    """
    u = x.astype(np.float64) * _TWO_POW32_INV + _TWO_POW32_INV / 2
    v = y.astype(np.float64) * _TWO_POW32_INV_2PI + _TWO_POW32_INV_2PI / 2
    return (np.sqrt(-2.0 * np.log(u)) * np.sin(v)).astype(np.float32)


def cuda_randn(seed: int, shape: Sequence[int], offset: int = 0) -> np.ndarray:
    """What `torch.randn(shape, device="cuda")` returns after `manual_seed(seed)` and `offset` earlier draws.

    Element i of the flattened result uses Philox counter (offset, i): the layout of `shape` does not matter.
    """
    seed, offset = _check_u64("seed", seed), _check_u64("offset", offset)
    count = math.prod(int(size) for size in shape)
    index = np.arange(count, dtype=np.uint64)
    counter = np.stack([
        np.full(count, offset & _MASK32, dtype=np.uint32),
        np.full(count, offset >> 32, dtype=np.uint32),
        (index & np.uint64(_MASK32)).astype(np.uint32),
        (index >> np.uint64(32)).astype(np.uint32),
    ])
    words = philox4x32(counter, (seed & _MASK32, seed >> 32))
    return box_muller(words[0], words[1]).reshape(tuple(int(size) for size in shape))


def _check_u64(name: str, value: int) -> int:
    value = int(value)
    if not 0 <= value < 2**64:
        raise ValueError(f"{name} must be in [0, 2^64), got {value}")
    return value


class PhiloxGenerator:
    """A CUDA-like generator: `randn(shape)` returns the next draw and advances `offset` by one
    (A1111's `rng_philox.Generator`)."""

    def __init__(self, seed: int, offset: int = 0):
        self.seed = _check_u64("seed", seed)
        self.offset = _check_u64("offset", offset)

    def randn(self, shape: Sequence[int]) -> np.ndarray:
        """The next float32 draw of `shape`."""
        draw = cuda_randn(self.seed, shape, self.offset)
        self.offset += 1
        return draw

    def __repr__(self) -> str:
        return f"PhiloxGenerator(seed={self.seed}, offset={self.offset})"
