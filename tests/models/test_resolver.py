"""The one checkpoint resolver: every A1111 naming form, ties, misses, and the server's request-side refusals.

`find_checkpoint` is shared by the Python API (`resolve_checkpoint`), the CLI (`--model`, `--from`/`--infotext`)
and the server (`Engine`), so each front end is checked here for its own error type on the same folder.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from difusi.errors import CheckpointError, ParamError
from difusi.models import (
    AmbiguousCheckpointError,
    CheckpointNotFoundError,
    default_model_path,
    find_checkpoint,
    known_checkpoints,
    list_checkpoints,
    resolve_checkpoint,
)
from difusi.models.catalog import find_by_hash


@pytest.fixture(autouse=True)
def private_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFUSI_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def folder(tmp_path, checkpoint_factory) -> Path:
    """alpha; a.safetensors + a.ckpt (one bare name, two files); sub/beta.ckpt + other/beta.safetensors (one stem in
    two sub-folders); a diffusers folder; a symlink out of the folder; and a checkpoint outside it."""
    root = tmp_path / "models"
    for sub in ("sub", "other"):
        (root / sub).mkdir(parents=True)
    shutil.copy(checkpoint_factory("sd1").path, root / "alpha.safetensors")
    shutil.copy(checkpoint_factory("sd1", seed=1).path, root / "a.safetensors")
    shutil.copy(checkpoint_factory("sd1", "ckpt").path, root / "a.ckpt")
    shutil.copy(checkpoint_factory("sd1", "ckpt", seed=2).path, root / "sub" / "beta.ckpt")
    shutil.copy(checkpoint_factory("sd1", seed=3).path, root / "other" / "beta.safetensors")
    shutil.copytree(checkpoint_factory("sd2-v", "diffusers").path, root / "gamma")
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(checkpoint_factory("sd1", seed=4).path, outside / "secret.safetensors")
    (root / "link-out.safetensors").symlink_to(outside / "secret.safetensors")
    return root


def _info(folder: Path, relative: str):
    return next(info for info in list_checkpoints(folder) if info.path == folder / relative)


def test_every_a1111_naming_form(folder):
    alpha = _info(folder, "alpha.safetensors")
    beta = _info(folder, "sub/beta.ckpt")
    a_ckpt = _info(folder, "a.ckpt")
    mini = default_model_path()
    table = {
        str(folder / "alpha.safetensors"): alpha.path,          # a path
        "alpha.safetensors": alpha.path,                          # file name with extension
        "alpha": alpha.path,                                      # without
        alpha.title: alpha.path,                                  # "name [hash]"
        f"alpha.safetensors [{alpha.short_hash}]": alpha.path,    # A1111's title form with the extension
        alpha.short_hash: alpha.path,                             # 10-hex short hash
        alpha.short_hash.upper(): alpha.path,
        f"[{alpha.short_hash}]": alpha.path,
        alpha.sha256: alpha.path,                                 # full sha256
        "alpha [0123456789]": alpha.path,                         # stale hash in a title: the name still counts
        "sub/beta.ckpt": beta.path,                               # sub-folder path with extension
        "sub/beta": beta.path,                                    # ... and without
        "sub\\beta.ckpt": beta.path,                              # Windows separators (A1111 titles from Windows)
        "beta.ckpt": beta.path,                                   # a file name inside a sub-folder, unique
        beta.title: beta.path,
        "a.ckpt": a_ckpt.path,                                    # exact file name beats the shared bare name "a"
        a_ckpt.title: a_ckpt.path,                                # so does the title
        "a.safetensors": folder / "a.safetensors",
        "gamma": folder / "gamma",                                # diffusers folder
        "difusi-mini": mini,                                      # the shipped model is always a candidate
        "difusi-mini.safetensors": mini,
        _info(mini.parent, "difusi-mini.safetensors").short_hash: mini,
    }
    for query, expected in table.items():
        assert resolve_checkpoint(query, folder) == expected, query
    assert beta.name == "sub/beta" and beta.title == f"sub/beta [{beta.short_hash}]" and beta.filename == "sub/beta.ckpt"


def test_ties_are_errors_that_list_the_candidates(folder):
    with pytest.raises(CheckpointError) as raised:
        resolve_checkpoint("a", folder)
    assert type(raised.value) is CheckpointError  # the API's documented type, exactly
    tie = raised.value.__cause__
    assert isinstance(tie, AmbiguousCheckpointError)
    assert {info.path.name for info in tie.candidates} == {"a.ckpt", "a.safetensors"}
    message = str(raised.value)
    assert message.startswith("checkpoint 'a' is ambiguous: it names ")
    assert "(a.ckpt)" in message and "(a.safetensors)" in message and "[" in message
    with pytest.raises(AmbiguousCheckpointError, match=r"sub/beta.ckpt.*other/beta.safetensors|other/beta.*sub/beta"):
        find_checkpoint("beta", list_checkpoints(folder))


def test_same_bytes_twice_is_not_a_tie(folder):
    shutil.copy(folder / "alpha.safetensors", folder / "sub" / "alpha-copy.safetensors")
    alpha = _info(folder, "alpha.safetensors")
    assert resolve_checkpoint(alpha.short_hash, folder).name in ("alpha.safetensors", "alpha-copy.safetensors")


def test_unknown_name_lists_what_exists(folder):
    with pytest.raises(CheckpointError) as missing:
        resolve_checkpoint("zeta", folder)
    assert type(missing.value) is CheckpointError and isinstance(missing.value.__cause__, CheckpointNotFoundError)
    message = str(missing.value)
    assert message.startswith(f"checkpoint 'zeta' not found in {folder}; available: ")
    assert "alpha [" in message and "difusi-mini [" in message and "sub/beta [" in message


def test_old_and_partial_hashes_never_match(folder):
    alpha = _info(folder, "alpha.safetensors")
    for query in (alpha.sha256[:8], alpha.sha256[:9], alpha.sha256[:12], alpha.sha256[:63]):
        with pytest.raises(CheckpointError, match="not found"):
            resolve_checkpoint(query, folder)
        assert find_by_hash(query, list_checkpoints(folder)) is None
    assert find_by_hash(alpha.short_hash, list_checkpoints(folder)) == alpha


def test_without_a_models_folder_only_paths_and_the_shipped_model(tmp_path):
    assert resolve_checkpoint("difusi-mini") == default_model_path()
    with pytest.raises(CheckpointError, match=r"nope\.safetensors: no such checkpoint file"):
        resolve_checkpoint(tmp_path / "nope.safetensors")
    assert [info.name for info in known_checkpoints(None)] == ["difusi-mini"]


def test_listing_order_and_the_shipped_model_first(folder):
    known = known_checkpoints(folder)
    assert known[0].path == default_model_path() and known[0].family == "sd1"
    assert {info.filename for info in known[1:]} >= {"alpha.safetensors", "sub/beta.ckpt", "gamma", "a.ckpt"}


# -- request side: only listed checkpoints inside the folder --------------------------------------------------------


def test_a_listing_never_resolves_paths(folder, tmp_path):
    inside = [info for info in list_checkpoints(folder) if info.path.resolve().is_relative_to(folder.resolve())]
    for query in (str(tmp_path / "outside" / "secret.safetensors"), "../outside/secret", "sub/../alpha",
                  "../models/alpha", "/etc/passwd", "link-out", "a\x00b", ""):
        with pytest.raises(CheckpointNotFoundError):
            find_checkpoint(query, inside)


@pytest.fixture
def engine(folder, tmp_path):
    from difusi.server.engine import Engine

    return Engine(models_dir=folder, outputs_dir=tmp_path / "outputs")


def test_server_resolves_listed_names_and_refuses_the_rest(engine, folder, tmp_path):
    alpha = _info(folder, "alpha.safetensors")
    assert engine.resolve_title("alpha") == alpha.title
    assert engine.resolve_title(alpha.short_hash) == alpha.title
    assert engine.resolve_title("sub/beta.ckpt") == _info(folder, "sub/beta.ckpt").title
    assert engine.current_title().startswith("difusi-mini [")  # the shipped default
    for query in (str(tmp_path / "outside" / "secret.safetensors"), "../outside/secret", "link-out", "/etc/passwd"):
        with pytest.raises(ParamError) as refused:
            engine.resolve_title(query)
        assert refused.value.field == "sd_model_checkpoint" and f"unknown model {query!r}" in refused.value.message
    with pytest.raises(ParamError) as tie:
        engine.resolve_title("a")
    assert tie.value.field == "sd_model_checkpoint" and "is ambiguous" in tie.value.message
    listed = {Path(m["filename"]).resolve() for m in engine.sd_models()}
    assert (tmp_path / "outside" / "secret.safetensors").resolve() not in listed  # the symlink out is not listed


def test_operator_model_may_be_a_path_outside(folder, tmp_path):
    from difusi.server.engine import Engine

    outside = tmp_path / "outside" / "secret.safetensors"
    engine = Engine(models_dir=folder, outputs_dir=tmp_path / "outputs", checkpoint=str(outside))
    assert engine.current_title().startswith("secret [")
    assert engine.resolve_title("secret") == engine.current_title()  # listed now that the operator chose it


# -- CLI: one line, exit 2 --------------------------------------------------------------------------------------------


def test_cli_model_flag_errors_are_one_line(folder, tmp_path, capsys, monkeypatch):
    from difusi import cli

    monkeypatch.setenv("DIFUSI_CONFIG", str(tmp_path / "none.json"))
    base = ["generate", "a cat", "--models-dir", str(folder), "--outputs-dir", str(tmp_path / "o")]
    for model, expected in (("a", "--model: checkpoint 'a' is ambiguous: it names "),
                            ("zeta", "--model: checkpoint 'zeta' not found in ")):
        with pytest.raises(SystemExit) as exit_info:
            cli.main([*base, "--model", model])
        err = capsys.readouterr().err.splitlines()
        assert exit_info.value.code == 2 and len(err) == 1 and err[0].startswith(f"difusi: error: {expected}"), err
    assert cli._resolve_model_flag("sub/beta", folder) == (folder / "sub" / "beta.ckpt").resolve()


def test_cli_recipe_model_by_hash_then_name(folder, capsys):
    from difusi import cli

    alpha = _info(folder, "alpha.safetensors")
    args = SimpleNamespace(from_image=None)
    assert cli._find_recipe_model(alpha.short_hash, "whatever", folder, args) == alpha.path
    assert capsys.readouterr().err == ""
    # an old 8-hex hash cannot match; the name still finds the model, with a note
    assert cli._find_recipe_model(alpha.sha256[:8], "alpha", folder, args) == alpha.path
    assert "no model with hash" in capsys.readouterr().err
    with pytest.raises(cli.UsageError, match=r"--infotext: model with hash 0000000000 \(lost\) not found in "):
        cli._find_recipe_model("0000000000", "lost", folder, args)
    with pytest.raises(cli.UsageError, match=r"--from: checkpoint 'a' is ambiguous"):
        cli._find_recipe_model(None, "a", folder, SimpleNamespace(from_image="x.png"))
