"""Textual-inversion embeddings. Reference: diffusers' own textual-inversion path
(``TextualInversionLoaderMixin.load_textual_inversion`` + ``encode_prompt``) on the same random weights,
for every file layout; A1111's chunking rules (``sd_hijack_clip.py tokenize_line``) for positions."""

from __future__ import annotations

import hashlib
import os
import pickle
from importlib import resources
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from difusi.errors import NetworkError
from difusi.models import load_model
from difusi.models.synthetic import build_modules, write_tiny_checkpoint
from difusi.networks.embeddings import (
    EmbeddingDatabase,
    attach,
    embedding_set,
    embeddings_response,
    format_ti_hashes,
    list_embeddings,
    load_embedding,
    scan_embeddings,
)
from difusi.prompts.conditioning import encode_prompt, encode_prompt_schedule
from difusi.prompts.tokens import PLACEHOLDER_ID

WIDTH = 64  # the tiny checkpoints' text encoders (SD1: one, SDXL: CLIP-L and bigG)
PROMPT = "a photo of {name} on a table"


# ----------------------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    path = tmp_path_factory.mktemp("sd1") / "tiny-sd1.safetensors"
    write_tiny_checkpoint(path, family="sd1", seed=0)
    return load_model(path, device="cpu")


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    path = tmp_path_factory.mktemp("sdxl") / "tiny-sdxl.safetensors"
    write_tiny_checkpoint(path, family="sdxl", seed=0)
    return load_model(path, device="cpu")


def _vectors(count: int, width: int = WIDTH, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, width, generator=generator) * 0.5


def _write(path: Path, layout: str, vectors: torch.Tensor) -> Path:
    """One embedding file in the named on-disk layout."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if layout == "a1111-pt":
        torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": "inner-name",
                    "step": 1500, "sd_checkpoint": "abcdef0123", "sd_checkpoint_name": "trained-on"}, path)
    elif layout == "diffusers-bin":
        torch.save({"<concept>": vectors[0] if vectors.shape[0] == 1 else vectors}, path)
    elif layout == "emb-params-safetensors":
        save_file({"emb_params": vectors.contiguous()}, str(path))
    elif layout == "emb-params-pt":
        torch.save({"emb_params": vectors}, path)
    else:
        raise ValueError(layout)
    return path


def _write_sdxl(path: Path, clip_l: torch.Tensor, clip_g: torch.Tensor) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"clip_l": clip_l.contiguous(), "clip_g": clip_g.contiguous()}, str(path))
    return path


def _fresh_tokenizer(pad_token: str = "<|endoftext|>"):
    # diffusers adds tokens to the tokenizer it is given: never hand it difusi's cached one.
    from transformers import CLIPTokenizer

    folder = resources.files("difusi") / "assets" / "tokenizers" / "clip"
    return CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"),
                         pad_token=pad_token, model_max_length=77)


def _diffusers_sd1_pipeline(files: list[tuple[Path, str]]):
    """A diffusers SD pipeline on the sd1 fixture's weights with the embeddings loaded its own way."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    unet, vae, texts = build_modules("sd1", "tiny", 0)  # the same weights the sd1 fixture wrote
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=texts[0], tokenizer=_fresh_tokenizer(), unet=unet,
                                   scheduler=EulerDiscreteScheduler(steps_offset=1), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    for path, token in files:
        pipe.load_textual_inversion(str(path), token=token)
    return pipe


def _diffusers_sd1(files: list[tuple[Path, str]], prompt: str, negative: str | None = None):
    """diffusers' prompt embeddings (and negative ones) with its own textual-inversion loading."""
    pipe = _diffusers_sd1_pipeline(files)
    with torch.no_grad():
        return pipe.encode_prompt(prompt, "cpu", 1, negative is not None, negative_prompt=negative)


def _diffusers_sdxl(name: str, clip_l: torch.Tensor, clip_g: torch.Tensor, prompt: str):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    unet, vae, texts = build_modules("sdxl", "tiny", 0)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=texts[0], text_encoder_2=texts[1],
                                     tokenizer=_fresh_tokenizer(), tokenizer_2=_fresh_tokenizer("!"), unet=unet,
                                     scheduler=EulerDiscreteScheduler(steps_offset=1), force_zeros_for_empty_prompt=False)
    pipe.load_textual_inversion(clip_l, token=name, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(clip_g, token=name, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
    return embeds, pooled


def _encode(model, embeddings, text: str):
    with attach(model, embeddings) as use:
        conditioning = encode_prompt(model.text_encoders, text)
    return conditioning, use


# ----------------------------------------------------------------------------- loading


@pytest.mark.parametrize(("layout", "suffix", "count"), [
    ("a1111-pt", ".pt", 3),
    ("diffusers-bin", ".bin", 1),
    ("diffusers-bin", ".bin", 2),
    ("emb-params-safetensors", ".safetensors", 2),
    ("emb-params-pt", ".pt", 1),
])
def test_load_embedding_reads_every_layout(tmp_path, layout, suffix, count):
    vectors = _vectors(count)
    path = _write(tmp_path / f"my-style{suffix}", layout, vectors)
    embedding = load_embedding(path)
    assert embedding.name == "my-style"  # the file stem, not the "name" stored inside (A1111)
    assert embedding.vector_count == count and embedding.shape == WIDTH and not embedding.is_sdxl
    assert torch.equal(embedding.vectors[""], vectors)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert embedding.sha256 == digest and embedding.shorthash == digest[:12]
    if layout == "a1111-pt":
        assert (embedding.step, embedding.sd_checkpoint, embedding.sd_checkpoint_name) == (1500, "abcdef0123", "trained-on")
    else:
        assert embedding.step is None and embedding.sd_checkpoint is None


def test_load_sdxl_embedding(tmp_path):
    path = _write_sdxl(tmp_path / "xl.safetensors", _vectors(2, 768), _vectors(2, 1280, seed=1))
    embedding = load_embedding(path)
    assert embedding.is_sdxl and embedding.shape is None and embedding.vector_count == 2
    assert embedding.widths() == {"clip_l": 768, "clip_g": 1280} and embedding.a1111_shape == 2048


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))  # unpickling this would create the marker file


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_pickle_that_needs_code_is_refused_without_running(tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    payload = {"string_to_param": {"*": _RunsCode(marker)}, "name": "evil"}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    assert not marker.exists()
    with pytest.raises(NetworkError, match="would run code.*refused") as caught:
        load_embedding(path)
    assert caught.value.name == "evil"
    assert not marker.exists()
    scan = scan_embeddings([tmp_path])
    assert scan.embeddings == () and [f.name for f in scan.failed] == ["evil"]
    assert not marker.exists()


def test_truncated_files_raise_network_error_naming_the_file(tmp_path):
    good = _write(tmp_path / "good.safetensors", "emb-params-safetensors", _vectors(2))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-40])
    with pytest.raises(NetworkError, match="cut.safetensors.*truncated or corrupt"):
        load_embedding(cut)
    torch_file = _write(tmp_path / "full.pt", "a1111-pt", _vectors(2))
    cut_pt = tmp_path / "cut.pt"
    cut_pt.write_bytes(torch_file.read_bytes()[: len(torch_file.read_bytes()) // 2])
    with pytest.raises(NetworkError, match="cut.pt.*truncated or corrupt"):
        load_embedding(cut_pt)


def test_unknown_layouts_are_errors(tmp_path):
    two = tmp_path / "two.safetensors"
    save_file({"a": _vectors(1), "b": _vectors(1)}, str(two))
    with pytest.raises(NetworkError, match="neither a textual inversion embedding"):
        load_embedding(two)
    with pytest.raises(NetworkError, match="not an embedding file"):
        load_embedding(tmp_path / "x.preview.png")


def test_list_embeddings_recursive_sorted_and_cached(tmp_path):
    _write(tmp_path / "b" / "Zeta.pt", "a1111-pt", _vectors(1))
    _write(tmp_path / "alpha.bin", "diffusers-bin", _vectors(1))
    _write(tmp_path / "nested" / "deeper" / "beta.safetensors", "emb-params-safetensors", _vectors(1))
    (tmp_path / "alpha.preview.png").write_bytes(b"\x89PNG not an embedding")
    (tmp_path / "empty.pt").write_bytes(b"")  # A1111 skips empty files silently
    _write(tmp_path / "z" / "alpha.pt", "a1111-pt", _vectors(1))  # same name as alpha.bin
    scan = scan_embeddings([tmp_path])
    assert [e.name for e in scan.embeddings] == ["alpha", "beta", "Zeta"]
    assert [(f.name, f.path.name) for f in scan.failed] == [("alpha", "alpha.pt")]
    assert [e.name for e in list_embeddings([tmp_path, tmp_path / "missing"])] == ["alpha", "beta", "Zeta"]
    first = scan.embeddings[1]
    assert scan_embeddings([tmp_path]).embeddings[1] is first  # unchanged file: from the cache
    beta = tmp_path / "nested" / "deeper" / "beta.safetensors"
    _write(beta, "emb-params-safetensors", _vectors(3))
    os.utime(beta, ns=(beta.stat().st_atime_ns, beta.stat().st_mtime_ns + 10**9))
    again = scan_embeddings([tmp_path]).embeddings[1]
    assert again is not first and again.vector_count == 3


# ----------------------------------------------------------------------------- model fit


def test_width_mismatch_and_sdxl_files_are_skipped_with_a_reason(tmp_path, sd1, sdxl):
    _write(tmp_path / "fits.pt", "a1111-pt", _vectors(2))
    _write(tmp_path / "narrow.pt", "a1111-pt", _vectors(1, 32))
    _write_sdxl(tmp_path / "xl.safetensors", _vectors(1), _vectors(1, seed=1))
    database = EmbeddingDatabase([tmp_path])

    on_sd1 = database.for_model(sd1)
    assert list(on_sd1.loaded) == ["fits"]
    assert set(on_sd1.skipped) == {"narrow", "xl"}
    assert "width 32 does not fit" in on_sd1.skipped["narrow"].reason
    assert "clip_l 64 + clip_g 64 does not fit" in on_sd1.skipped["xl"].reason

    on_sdxl = database.for_model(sdxl)
    assert list(on_sdxl.loaded) == ["xl"] and set(on_sdxl.skipped) == {"fits", "narrow"}

    response = embeddings_response(on_sd1)
    assert response["loaded"] == {"fits": {"step": 1500, "sd_checkpoint": "abcdef0123",
                                           "sd_checkpoint_name": "trained-on", "shape": 64, "vectors": 2}}
    assert response["skipped"]["xl"] == {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                                         "shape": 128, "vectors": 1}


# ----------------------------------------------------------------------------- against diffusers


@pytest.mark.parametrize(("layout", "suffix", "count"), [
    ("a1111-pt", ".pt", 1),
    ("a1111-pt", ".pt", 3),
    ("diffusers-bin", ".bin", 1),
    ("diffusers-bin", ".bin", 3),
    ("emb-params-safetensors", ".safetensors", 2),
    ("emb-params-pt", ".pt", 2),
])
def test_sd1_conditioning_matches_diffusers_textual_inversion(tmp_path, sd1, layout, suffix, count):
    name = "mystyle"
    path = _write(tmp_path / f"{name}{suffix}", layout, _vectors(count, seed=count))
    embeddings = embedding_set([load_embedding(path)], sd1.text_encoders)
    prompt = PROMPT.format(name=name)
    conditioning, use = _encode(sd1, embeddings, prompt)
    reference, _ = _diffusers_sd1([(path, name)], prompt)
    assert conditioning.context.shape == reference.shape == (1, 77, WIDTH)
    torch.testing.assert_close(conditioning.context, reference, atol=1e-5, rtol=0)
    assert [e.name for e in use.used] == [name]
    # the embedding did something: without it the name is plain BPE tokens
    plain = encode_prompt(sd1.text_encoders, prompt).context
    assert not torch.allclose(plain, conditioning.context, atol=1e-3)


def test_sd1_clip_skip_2_matches_diffusers_penultimate_layer(tmp_path, sd1):
    # diffusers' encode_prompt(clip_skip=1) reads `text_encoder.text_model`, gone in transformers 5; so its
    # steps are taken here: its prompt conversion and tokenizer, penultimate layer, final LayerNorm
    path = _write(tmp_path / "skipper.bin", "diffusers-bin", _vectors(2, seed=5))
    embeddings = embedding_set([load_embedding(path)], sd1.text_encoders)
    prompt = PROMPT.format(name="skipper")
    with attach(sd1, embeddings):
        conditioning = encode_prompt(sd1.text_encoders, prompt, clip_skip=2)
    pipe = _diffusers_sd1_pipeline([(path, "skipper")])
    converted = pipe.maybe_convert_prompt(prompt, pipe.tokenizer)
    assert converted == "a photo of skipper skipper_1 on a table"
    ids = pipe.tokenizer(converted, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        reference = pipe.text_encoder.final_layer_norm(hidden)
    torch.testing.assert_close(conditioning.context, reference, atol=1e-5, rtol=0)


def test_sdxl_clip_l_and_clip_g_match_diffusers(tmp_path, sdxl):
    name = "xlstyle"
    clip_l, clip_g = _vectors(2, seed=3), _vectors(2, seed=4)
    path = _write_sdxl(tmp_path / f"{name}.safetensors", clip_l, clip_g)
    embeddings = embedding_set([load_embedding(path)], sdxl.text_encoders)
    assert list(embeddings.loaded) == [name]
    prompt = PROMPT.format(name=name)
    conditioning, use = _encode(sdxl, embeddings, prompt)
    reference, pooled = _diffusers_sdxl(name, clip_l, clip_g, prompt)
    assert conditioning.context.shape == reference.shape == (1, 77, 2 * WIDTH)
    torch.testing.assert_close(conditioning.context, reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(conditioning.pooled, pooled, atol=1e-5, rtol=0)
    # A1111 notes the embedding once per SDXL encoder
    embedding = embeddings.loaded[name]
    assert [index for index, _ in use.events] == [0, 1]
    assert use.ti_hashes() == f"{name}: {embedding.shorthash}, {name}: {embedding.shorthash}"


def test_negative_prompt_trigger_matches_diffusers(tmp_path, sd1):
    path = _write(tmp_path / "badhands.pt", "a1111-pt", _vectors(2, seed=7))
    embeddings = embedding_set([load_embedding(path)], sd1.text_encoders)
    negative = "blurry, badhands, lowres"
    with attach(sd1, embeddings) as use:
        (_, uncond), = encode_prompt_schedule(sd1.text_encoders, negative, steps=20)
    _, reference = _diffusers_sd1([(path, "badhands")], "a cat", negative=negative)
    torch.testing.assert_close(uncond.context, reference, atol=1e-5, rtol=0)
    assert [e.name for e in use.used] == ["badhands"]


# ----------------------------------------------------------------------------- chunk positions and emphasis


def _plain(count: int) -> str:
    return " ".join(["a"] * count)  # "a</w>" is one token


@pytest.fixture
def three(tmp_path, sd1):
    path = _write(tmp_path / "tri.pt", "a1111-pt", _vectors(3, seed=11))
    return embedding_set([load_embedding(path)], sd1.text_encoders)


def test_multi_vector_embedding_takes_its_real_number_of_positions(sd1, three):
    encoder = sd1.text_encoders[0]
    with attach(sd1, three):
        (chunk,) = encoder.tokenize("a tri a")
    assert chunk.ids[:6] == (encoder.special.bos, 320, PLACEHOLDER_ID, PLACEHOLDER_ID, PLACEHOLDER_ID, 320)
    assert [(fix.offset, fix.embedding.name) for fix in chunk.fixes] == [(1, "tri")]


@pytest.mark.parametrize(("before", "chunk_count", "offset"), [(72, 1, 72), (73, 2, 0)])
def test_embedding_that_does_not_fit_starts_the_next_chunk(sd1, three, before, chunk_count, offset):
    # 72 + 3 = 75 fills the chunk exactly; 73 + 3 > 75 closes it first (A1111 tokenize_line)
    encoder = sd1.text_encoders[0]
    with attach(sd1, three):
        chunks = encoder.tokenize(f"{_plain(before)} tri")
    assert len(chunks) == chunk_count
    last = chunks[-1]
    assert [fix.offset for fix in last.fixes] == [offset]
    assert last.ids[offset + 1 : offset + 4] == (PLACEHOLDER_ID,) * 3
    if chunk_count == 2:
        assert chunks[0].fixes == () and chunks[0].ids[before + 1] == encoder.special.eos


def test_comma_backtrack_leaves_the_fix_in_the_old_chunk_as_a1111(sd1, three):
    # 70 tokens, a comma, the embedding (3) and 5 more: the 75-token chunk fills and its tail after the
    # comma moves on; A1111 moves tokens and multipliers but not chunk.fixes.
    encoder = sd1.text_encoders[0]
    with attach(sd1, three):
        first, second = encoder.tokenize(f"{_plain(70)}, tri {_plain(5)}")
    assert [fix.offset for fix in first.fixes] == [71] and second.fixes == ()
    assert second.ids[1:4] == (PLACEHOLDER_ID,) * 3


def test_emphasis_scales_embedding_positions_like_plain_tokens(sd1, three):
    encoder = sd1.text_encoders[0]
    with attach(sd1, three):
        (weighted,) = encoder.tokenize("a (tri:1.3) a")
        plain_states = encode_prompt(sd1.text_encoders, "a tri a").context
        emphasised = encode_prompt(sd1.text_encoders, "a (tri:1.3) a").context
    assert weighted.weights[:6] == (1.0, 1.0, 1.3, 1.3, 1.3, 1.0)
    # A1111 "Original" emphasis, computed here from the unweighted states
    multipliers = torch.ones(1, 77, 1)
    multipliers[0, 2:5] = 1.3
    expected = plain_states * multipliers
    expected = expected * (plain_states.mean() / expected.mean())
    torch.testing.assert_close(emphasised, expected, atol=1e-6, rtol=1e-6)


def test_no_embedding_in_the_prompt_is_bit_identical(sd1, three):
    text = "a photo of (a cat:1.2), [blue] sky BREAK triangle"  # "triangle" is its own token, not "tri"
    before = encode_prompt(sd1.text_encoders, text).context
    with attach(sd1, three) as use:
        during = encode_prompt(sd1.text_encoders, text).context
    assert torch.equal(before, during) and use.events == []
    assert sd1.text_encoders[0].embeddings is None
    assert not sd1.text_encoders[0].model.get_input_embeddings()._forward_hooks


def test_attach_restores_the_encoders_after_an_error(sd1, three):
    with pytest.raises(RuntimeError), attach(sd1, three):
        assert sd1.text_encoders[0].embeddings is not None
        raise RuntimeError("job failed")
    assert sd1.text_encoders[0].embeddings is None


def test_attach_refuses_a_set_built_for_another_model(sd1, sdxl, three):
    with pytest.raises(ValueError, match="encoder widths"), attach(sdxl, three):
        pass


def test_ti_hashes_follow_a1111_accumulation(tmp_path, sd1):
    pos = load_embedding(_write(tmp_path / "po:s,x.pt", "a1111-pt", _vectors(1)))
    neg = load_embedding(_write(tmp_path / "neg.pt", "a1111-pt", _vectors(1, seed=2)))
    # A1111 encodes uc (negative) first, then c; each call puts its names before the earlier ones
    assert format_ti_hashes([[neg], [pos]]) == f"posx: {pos.shorthash}, neg: {neg.shorthash}"
    assert format_ti_hashes([]) is None and format_ti_hashes([[]]) is None
