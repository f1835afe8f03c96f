"""`CheckpointFile`'s safetensors read path: the same tensors, bit for bit, as safetensors' own `load_file`.

Covers the plain read (one `readinto` per tensor) and the cast-while-reading path (a reused scratch buffer,
converted piece by piece straight into the final tensor), including tensors larger than one piece, odd sizes,
empty and integer tensors, and a file truncated or cut short after it was opened.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

import difusi.models.files as files
from difusi.errors import CheckpointError
from difusi.models.files import CheckpointFile

DTYPES = [torch.float16, torch.float32, torch.bfloat16]


def _tensors(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    chunk_elements = files._CAST_CHUNK_BYTES // torch.empty((), dtype=dtype).element_size()

    def rand(*shape: int) -> torch.Tensor:
        # wide range, subnormals and values that round differently in fp16 / bf16
        return (torch.randn(*shape, generator=generator, dtype=torch.float64) * 300).to(dtype)

    return {
        "big": rand(chunk_elements * 2 + 17),  # three pieces, the last one short
        "exact": rand(chunk_elements),
        "matrix": rand(37, 53),
        "conv": rand(8, 3, 3, 3),
        "scalar": rand(1).reshape(()),
        "tiny": torch.tensor([1e-8, -1e-7, 6.1e-5, 65504.0, 70000.0], dtype=torch.float64).to(dtype),
        "empty": torch.empty(0, dtype=dtype),
        "ids": torch.arange(77, dtype=torch.int64).reshape(1, 77),
        "mask": torch.tensor([True, False, True]),
    }


@pytest.fixture(params=DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def stored(request, tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file(_tensors(request.param), str(path))
    return path, request.param


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (NaN payloads and -0.0 included)."""
    return a.dtype == b.dtype and a.shape == b.shape and \
        torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def test_plain_read_matches_load_file(stored):
    path, _ = stored
    reference = load_file(str(path))
    reader = CheckpointFile(path)
    try:
        assert set(reader.keys()) == set(reference)
        for key, value in reference.items():
            got = reader.tensor(key)
            assert _same(got, value), key
            assert got.data_ptr() % 64 == 0 or got.numel() == 0, key  # own aligned buffer, not a map offset
    finally:
        reader.close()


@pytest.mark.parametrize("target", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_cast_while_reading_matches_load_file_then_to(stored, target):
    path, _ = stored
    reference = load_file(str(path))
    reader = CheckpointFile(path)
    try:
        for key, value in reference.items():
            expected = value.to(target) if value.is_floating_point() else value
            got = reader.tensor(key, target)
            assert _same(got, expected), key
            assert got.is_contiguous(), key
    finally:
        reader.close()


def test_cast_results_do_not_share_the_scratch_buffer(stored):
    path, dtype = stored
    target = torch.float32 if dtype != torch.float32 else torch.float16
    reader = CheckpointFile(path)
    try:
        first = reader.tensor("matrix", target)
        kept = first.clone()
        reader.tensor("big", target)  # reuses the scratch buffer
        assert torch.equal(first, kept)
    finally:
        reader.close()


def test_truncated_file_is_a_checkpoint_error(stored, tmp_path):
    path, _ = stored
    cut = tmp_path / "cut.safetensors"
    data = path.read_bytes()
    cut.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        CheckpointFile(cut)


@pytest.mark.parametrize("cast", [False, True])
def test_file_cut_short_after_opening_is_a_checkpoint_error(stored, cast):
    path, dtype = stored
    reader = CheckpointFile(path)
    try:
        start, _ = reader._entries["big"]["data_offsets"]
        with path.open("r+b") as handle:  # the file shrinks under an open reader (replaced while loading)
            handle.truncate(reader._data_start + start + 1000)
        target = (torch.float32 if dtype != torch.float32 else torch.float16) if cast else None
        with pytest.raises(CheckpointError, match="'big' is cut short"):
            reader.tensor("big", target)
    finally:
        reader.close()


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_reading_many_tensors_in_threads_matches_load_file(stored, threads):
    path, dtype = stored
    reference = load_file(path)
    wanted = {key: (torch.float32 if index % 2 else None) for index, key in enumerate(reference)}
    reader = CheckpointFile(path)
    try:
        got = reader.tensors(wanted, threads=threads)
    finally:
        reader.close()
    assert list(got) == list(wanted)
    for key, want in wanted.items():
        expected = reference[key] if want is None or not reference[key].is_floating_point() else reference[key].to(want)
        assert _same(got[key], expected), key
