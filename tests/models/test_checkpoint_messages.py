"""Issue 19 defect 6: checkpoint errors in difusi's words. A file that is not a checkpoint says what it is; a pickle
that needs code is refused without repeating torch's advice to load it with `weights_only=False`; no message is
torch's text cut off mid-sentence ("Please file an issue ... WeightsUnpickler error:")."""

from __future__ import annotations

import io
import os
import pickle
import warnings
import zipfile
from pathlib import Path

import pytest
import torch

from difusi.errors import CheckpointError
from difusi.models import load_model

TORCH_WORDS = ("weights_only", "Please file an issue", "WeightsUnpickler", "will likely succeed", "add_safe_globals",
               "pytorch.org", "miniz")


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _message(path: Path) -> str:
    with pytest.raises(CheckpointError) as info:
        load_model(path)
    message = str(info.value)
    for words in TORCH_WORDS:
        assert words not in message, message
    assert message.startswith(f"{path}: ") and "\n" not in message and not message.endswith(":")
    return message


def _zip_with(name: str, data: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(name, data)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("random.ckpt", bytes(range(256)) * 64, "not a readable checkpoint: neither a safetensors file nor a torch "
         "pickle that difusi's safe loader can read (16384 bytes; truncated, corrupt, or another kind of file)"),
        ("noise.ckpt", os.urandom(4096), "not a readable checkpoint: neither a safetensors file nor a torch pickle"),
        ("zero.ckpt", b"", "not a readable checkpoint: the file is empty (0 bytes)"),
        ("notes.ckpt", b"these are my notes, not a model\n" * 20, "not a checkpoint: it is a text file"),
        ("page.ckpt", b"<!DOCTYPE html>\n<html><body>Sign in to download</body></html>",
         "not a checkpoint: it is an HTML page (a failed or blocked download?), not model weights"),
        ("lfs.ckpt", b"version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 4265380512\n",
         "not a checkpoint: it is a Git LFS pointer (a small text stub), not the weights; fetch them with "
         "`git lfs pull`"),
        ("archive.ckpt", _zip_with("readme.txt", b"hello"),
         "not a readable checkpoint: it is a zip archive, but not a complete torch checkpoint (truncated or corrupt)"),
        ("plain-pickle.ckpt", pickle.dumps({"w": [1.0, 2.0]}, protocol=4), "not a readable checkpoint"),
    ],
)
def test_not_a_checkpoint_says_what_the_file_is(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_bytes(content)
    assert expected in _message(path)


def test_truncated_torch_zip(tmp_path):
    whole = tmp_path / "whole.ckpt"
    torch.save({"model.diffusion_model.x": torch.zeros(64)}, whole)
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    assert "not a readable checkpoint: it is a zip archive, but not a complete torch checkpoint (truncated or " \
           "corrupt)" in _message(cut)


@pytest.mark.parametrize("legacy", [False, True])
def test_code_pickle_is_refused_without_torch_advice(tmp_path, legacy):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "hook": _Payload(marker)}, path,
               _use_new_zipfile_serialization=not legacy)
    message = _message(path)
    assert not marker.exists()
    assert "refused to load: this pickle asks to run code while loading (posix.system: a function or class, not " \
           "tensor data); it was NOT executed" in message
    assert "get a .safetensors version of this model instead" in message


def test_pickled_module_names_the_class_it_needs(tmp_path):
    path = tmp_path / "module.ckpt"
    torch.save({"net": torch.nn.Linear(1, 1)}, path)
    assert "(torch.nn.modules.linear.Linear: a function or class" in _message(path)


def test_legacy_protocol_4_pickle_gives_no_torch_warning(tmp_path):
    path = tmp_path / "plain.ckpt"
    path.write_bytes(pickle.dumps({"w": 1}, protocol=4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's "Detected pickle protocol 4 ... please file an issue" warning
        _message(path)
