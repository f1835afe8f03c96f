"""ModelCache (no re-read, switching frees), hash cache, checkpoint listing and name resolution."""

from __future__ import annotations

import gc
import hashlib
import os
import shutil
import weakref

import pytest

from difusi.errors import CheckpointError
from difusi.models import ModelCache, hashing, list_checkpoints, resolve_checkpoint
from difusi.models import files as files_module


@pytest.fixture(autouse=True)
def private_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFUSI_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def count_opens(monkeypatch):
    """Counts checkpoint files opened for reading (every load goes through CheckpointFile)."""
    opened: list[str] = []
    original = files_module.CheckpointFile.__init__

    def counting(self, path):
        opened.append(str(path))
        original(self, path)

    monkeypatch.setattr(files_module.CheckpointFile, "__init__", counting)
    return opened


def test_same_file_is_not_read_again(tmp_path, checkpoint_factory, count_opens):
    path = tmp_path / "a.safetensors"
    shutil.copy(checkpoint_factory("sd1").path, path)
    cache = ModelCache()
    first = cache.get(path)
    second = cache.get(str(path))
    assert second is first and len(count_opens) == 1


def test_changed_file_is_reloaded(tmp_path, checkpoint_factory, count_opens):
    path = tmp_path / "a.safetensors"
    shutil.copy(checkpoint_factory("sd1").path, path)
    cache = ModelCache()
    first = cache.get(path)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert cache.get(path) is not first and len(count_opens) == 2


def test_switching_frees_the_previous_model(tmp_path, checkpoint_factory):
    cache = ModelCache()
    first = cache.get(checkpoint_factory("sd1").path)
    unet_ref = weakref.ref(first.unet)
    del first
    second = cache.get(checkpoint_factory("sd2-v").path)
    gc.collect()
    assert unet_ref() is None  # nothing kept the old UNet alive
    assert cache.current is second and second.family == "sd2"


def test_different_dtype_is_a_different_entry(checkpoint_factory):
    import torch

    cache = ModelCache()
    fp32 = cache.get(checkpoint_factory("sd1").path)
    bf16 = cache.get(checkpoint_factory("sd1").path, dtype=torch.bfloat16)
    assert bf16 is not fp32 and next(bf16.unet.parameters()).dtype == torch.bfloat16


def test_missing_file_in_cache_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        ModelCache().get(tmp_path / "gone.safetensors")


def test_hash_is_cached_by_size_and_mtime(tmp_path, monkeypatch, private_cache_dir):
    path = tmp_path / "blob.safetensors"
    path.write_bytes(b"0123456789" * 1000)
    digests: list[int] = []
    original = hashing._digest_files
    monkeypatch.setattr(hashing, "_digest_files", lambda files: digests.append(1) or original(files))
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    assert hashing.file_sha256(path) == expected
    assert hashing.file_sha256(path) == expected
    assert len(digests) == 1 and (private_cache_dir / "hashes.json").is_file()
    path.write_bytes(b"changed")
    assert hashing.file_sha256(path) == hashlib.sha256(b"changed").hexdigest()
    assert len(digests) == 2
    assert hashing.short_hash(expected) == expected[:10]


@pytest.fixture
def models_dir(tmp_path, checkpoint_factory):
    root = tmp_path / "models"
    (root / "sub").mkdir(parents=True)
    shutil.copy(checkpoint_factory("sd1").path, root / "alpha.safetensors")
    shutil.copy(checkpoint_factory("sdxl", "ckpt").path, root / "sub" / "beta.ckpt")
    shutil.copytree(checkpoint_factory("sd2-v", "diffusers").path, root / "gamma")
    (root / "junk.safetensors").write_bytes(b"not a model")
    (root / "notes.txt").write_text("ignored")
    return root


def test_list_checkpoints(models_dir):
    infos = {info.name: info for info in list_checkpoints(models_dir)}
    assert set(infos) == {"alpha", "sub/beta", "gamma", "junk"}
    assert (infos["alpha"].family, infos["sub/beta"].family, infos["gamma"].family) == ("sd1", "sdxl", "sd2")
    assert infos["junk"].family.startswith("unknown: ")
    alpha = infos["alpha"]
    assert alpha.sha256 == hashlib.sha256((models_dir / "alpha.safetensors").read_bytes()).hexdigest()
    assert alpha.short_hash == alpha.sha256[:10] and alpha.title == f"alpha [{alpha.sha256[:10]}]"


def test_resolve_checkpoint_every_way(models_dir):
    alpha = next(i for i in list_checkpoints(models_dir) if i.name == "alpha")
    for query in (alpha.title, "alpha", "alpha.safetensors", alpha.short_hash, f"[{alpha.short_hash}]",
                  str(models_dir / "alpha.safetensors")):
        assert resolve_checkpoint(query, models_dir) == alpha.path, query
    assert resolve_checkpoint("sub/beta", models_dir) == models_dir / "sub" / "beta.ckpt"
    assert resolve_checkpoint("gamma", models_dir) == models_dir / "gamma"


def test_resolve_unknown_lists_what_exists(models_dir):
    with pytest.raises(CheckpointError, match=r"checkpoint 'zeta' not found in .*available: .*alpha \["):
        resolve_checkpoint("zeta", models_dir)
