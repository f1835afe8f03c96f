"""Philox-4x32-10 and the CUDA randn emulation of A1111's "NV" noise source (difusi.philox)."""

import math

import numpy as np
import pytest

from difusi.philox import PhiloxGenerator, box_muller, cuda_randn, philox4x32

# Random123's tests/kat_vectors (DEShawResearch/random123), the three "philox4x32 10" lines:
# counter (4 words), key (2 words) -> output (4 words).
KAT = [
    ((0x00000000, 0x00000000, 0x00000000, 0x00000000), (0x00000000, 0x00000000),
     (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF),
     (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]

# torch.randn(3, 4) on CUDA after manual_seed(0), as printed in A1111's modules/rng_philox.py docstring;
# our team measured the first row on CUDA too.
CUDA_SEED0_3X4 = [
    [-0.92466259, -0.42534415, -2.6438457, 0.14518388],
    [-0.12086647, -0.57972564, -0.62285122, -0.32838709],
    [-1.07454231, -0.36314407, -1.67105067, 2.26550497],
]


def column(words):
    return np.array(words, dtype=np.uint32).reshape(4, 1)


@pytest.mark.parametrize(("counter", "key", "expected"), KAT, ids=["zeros", "ones", "pi"])
def test_philox_known_answers(counter, key, expected):
    assert philox4x32(column(counter), key)[:, 0].tolist() == list(expected)


def test_philox_is_vectorised_and_leaves_its_input_alone():
    counters = np.array([counter for counter, _, _ in KAT], dtype=np.uint32).T.copy()
    before = counters.copy()
    # One key for all columns, so check each column against the single-counter result under that key.
    key = KAT[2][1]
    together = philox4x32(counters, key)
    for i in range(3):
        assert together[:, i].tolist() == philox4x32(counters[:, i:i + 1], key)[:, 0].tolist()
    assert np.array_equal(counters, before)


def test_cuda_known_answer_seed_0():
    assert np.allclose(cuda_randn(0, (3, 4))[0], CUDA_SEED0_3X4[0], rtol=0, atol=1e-6)
    assert np.allclose(cuda_randn(0, (3, 4)), CUDA_SEED0_3X4, rtol=0, atol=1e-6)
    assert cuda_randn(0, (3, 4)).dtype == np.float32


def test_box_muller_is_the_double_precision_formula_rounded_once():
    words = philox4x32(np.stack([np.zeros(8), np.zeros(8), np.arange(8), np.zeros(8)]).astype(np.uint32), (9, 0))
    c = float(np.float32(2.0**-32))
    c_2pi = float(np.float32(2.3283064e-10 * 6.2831855))
    for x, y, z in zip(words[0].tolist(), words[1].tolist(), box_muller(words[0], words[1]).tolist(), strict=True):
        expected = math.sqrt(-2 * math.log(x * c + c / 2)) * math.sin(y * c_2pi + c_2pi / 2)
        assert z == float(np.float32(expected))


def test_element_index_is_the_flat_index():
    flat = cuda_randn(5, (24,))
    assert np.array_equal(cuda_randn(5, (4, 6)).ravel(), flat)
    assert np.array_equal(cuda_randn(5, (2, 3, 4)).ravel(), flat)
    assert np.array_equal(cuda_randn(5, (10,)), flat[:10])  # a smaller draw is a prefix


def test_offset_k_is_the_kth_draw_after_seeding():
    generator = PhiloxGenerator(7)
    shapes = [(2, 3), (5,), (2, 3), (1, 4, 2, 2)]  # torch CUDA advances one offset per call, whatever its size
    for k, shape in enumerate(shapes):
        assert generator.offset == k
        assert np.array_equal(generator.randn(shape), cuda_randn(7, shape, offset=k))
    assert not np.array_equal(cuda_randn(7, (6,), offset=0), cuda_randn(7, (6,), offset=1))


def test_seed_and_offset_use_both_32_bit_words():
    seed = 2**32 + 5  # key = (low, high) = (5, 1)
    counter = np.stack([np.zeros(3), np.zeros(3), np.arange(3), np.zeros(3)]).astype(np.uint32)
    words = philox4x32(counter, (5, 1))
    assert np.array_equal(cuda_randn(seed, (3,)), box_muller(words[0], words[1]))
    assert not np.array_equal(cuda_randn(seed, (3,)), cuda_randn(5, (3,)))
    offset = 2**32 + 3  # counter words 0 and 1 = (3, 1)
    counter[0], counter[1] = 3, 1
    words = philox4x32(counter, (5, 0))
    assert np.array_equal(cuda_randn(5, (3,), offset=offset), box_muller(words[0], words[1]))


def test_draws_are_standard_normal():
    z = cuda_randn(123, (200_000,)).astype(np.float64)
    assert abs(z.mean()) < 5 / math.sqrt(z.size)
    assert abs(z.std() - 1) < 5 / math.sqrt(2 * z.size)
    assert np.isfinite(z).all()


def test_seed_outside_64_bits_is_refused():
    with pytest.raises(ValueError, match="seed"):
        PhiloxGenerator(-1)
    with pytest.raises(ValueError, match="seed"):
        cuda_randn(2**64, (2,))
