"""difusi's own CLIP text encoder (`difusi.models.clip`) and BPE tokenizer (`difusi.prompts.bpe`) against
transformers 5's `CLIPTextModel` / `CLIPTextModelWithProjection` / `CLIPTokenizer`.

Models: for the same config the module trees, state-dict keys (in order), shapes and buffers are transformers';
on the same weights (strict `load_state_dict`) every output field difusi reads agrees within 1e-5. Tokenizer: the
same ids on a few hundred prompts and on every assigned Basic Multilingual Plane character.
"""

from __future__ import annotations

import random
import subprocess
import sys
import unicodedata

import pytest
import torch

import difusi  # noqa: F401  (sets HF_HUB_OFFLINE before any Hugging Face import)
from difusi.mini.model import TEXT_CONFIG as MINI_TEXT_CONFIG
from difusi.models.clip import CLIPTextModel, CLIPTextModelWithProjection, text_model_class
from difusi.models.synthetic import sd15_configs, sdxl_configs, tiny_configs
from difusi.models.text_encoders import TOKENIZER_DIR
from difusi.prompts.bpe import ClipTokenizer

ATOL = 1e-5
BOS, EOS = 49406, 49407

TINY = {
    "clip-l-like": (tiny_configs("sd1")[2][0], False),  # quick_gelu
    "openclip-like": (tiny_configs("sd2")[2][0], False),  # gelu
    "bigg-like": (tiny_configs("sdxl")[2][1], True),  # gelu + projection
    "sdxl-clip-l": (tiny_configs("sdxl")[2][0], False),
    "mini": (dict(MINI_TEXT_CONFIG), False),
}


# ----------------------------------------------------------------------------- helpers


def _reference_class(with_projection: bool):
    from transformers import CLIPTextModel as Reference
    from transformers import CLIPTextModelWithProjection as ReferenceWithProjection

    return ReferenceWithProjection if with_projection else Reference


def _reference(config: dict, with_projection: bool):
    from transformers import CLIPTextConfig

    return _reference_class(with_projection)(CLIPTextConfig(**config))


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Move every parameter off its init (LayerNorm scales/biases too) so swapped or unused weights show."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * (0.1 if param.ndim <= 1 else 0.05))


def _pair(config: dict, with_projection: bool, seed: int = 0):
    torch.manual_seed(seed)
    reference = _reference(config, with_projection).eval()
    _randomize(reference, seed + 1)
    mine = text_model_class(with_projection)(config).eval()
    mine.load_state_dict(reference.state_dict(), strict=True)
    return reference, mine


def _same_structure(reference: torch.nn.Module, mine: torch.nn.Module) -> None:
    ref, got = reference.state_dict(), mine.state_dict()
    assert list(got) == list(ref)  # same keys, same order
    assert {k: tuple(v.shape) for k, v in got.items()} == {k: tuple(v.shape) for k, v in ref.items()}
    assert [n for n, _ in mine.named_modules()] == [n for n, _ in reference.named_modules()]
    assert [n for n, _ in mine.named_buffers()] == [n for n, _ in reference.named_buffers()]
    assert [n for n, _ in mine.named_parameters()] == [n for n, _ in reference.named_parameters()]
    for (name, a), (_, b) in zip(reference.named_modules(), mine.named_modules(), strict=True):
        for kind in (torch.nn.Linear, torch.nn.LayerNorm, torch.nn.Embedding, torch.nn.ModuleList):
            assert isinstance(a, kind) == isinstance(b, kind), name  # LoRA targets are found by these types
        if isinstance(a, torch.nn.LayerNorm):
            assert a.eps == b.eps, name
        if isinstance(a, torch.nn.Linear):
            assert (a.bias is None) == (b.bias is None), name


def _ids(config: dict, batch: int = 5, length: int = 77, pad: int = EOS, seed: int = 3) -> torch.Tensor:
    """BOS, random tokens, EOS at varied positions, then padding (EOS or 0), as difusi's chunks look."""
    generator = torch.Generator().manual_seed(seed)
    vocab = config["vocab_size"]
    ids = torch.randint(0, vocab - 2, (batch, length), generator=generator)
    ids[:, 0] = BOS
    for row, end in enumerate([1, length - 1, 5, length // 2, 2][:batch]):
        ids[row, end] = EOS
        ids[row, end + 1 :] = pad
    return ids


def _assert_outputs(reference, mine, ids: torch.Tensor, **kwargs) -> None:
    with torch.no_grad():
        want = reference(input_ids=ids, output_hidden_states=True, **kwargs)
        got = mine(input_ids=ids, output_hidden_states=True, **kwargs)
    torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, atol=ATOL, rtol=0)
    assert len(got.hidden_states) == len(want.hidden_states) == mine.config.num_hidden_layers + 1
    for a, b in zip(got.hidden_states, want.hidden_states, strict=True):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    assert got.keys() == list(want.keys())
    for a, b in zip(got.to_tuple()[:2], want.to_tuple()[:2], strict=True):  # `out[0]` as diffusers reads it
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    if isinstance(mine, CLIPTextModelWithProjection):
        torch.testing.assert_close(got.text_embeds, want.text_embeds, atol=ATOL, rtol=0)
        pooled = reference.text_model(input_ids=ids, **kwargs).pooler_output
        torch.testing.assert_close(got.pooler_output, pooled, atol=ATOL, rtol=0)
    else:
        torch.testing.assert_close(got.pooler_output, want.pooler_output, atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------- models


@pytest.mark.parametrize("name", list(TINY))
def test_structure_matches_transformers(name):
    config, projection = TINY[name]
    reference, mine = _pair(config, projection)
    _same_structure(reference, mine)
    assert mine.config.num_hidden_layers == reference.config.num_hidden_layers
    assert mine.config.hidden_size == reference.config.hidden_size
    assert mine.config._attn_implementation == reference.config._attn_implementation == "sdpa"
    assert mine.get_input_embeddings() is mine.get_submodule(
        "text_model.embeddings.token_embedding" if projection else "embeddings.token_embedding")
    assert mine.dtype == torch.float32 and mine.device == torch.device("cpu")


@pytest.mark.parametrize("configs, index, projection", [(sd15_configs, 0, False), (sdxl_configs, 0, False),
                                                        (sdxl_configs, 1, True)], ids=["clip-l", "sdxl-l", "bigg"])
def test_full_size_structure_on_meta(configs, index, projection):
    config = configs()[2][index]
    with torch.device("meta"):
        reference = _reference(config, projection)
        mine = text_model_class(projection)(config)
    _same_structure(reference, mine)


@pytest.mark.parametrize("name", list(TINY))
@pytest.mark.parametrize("pad", [EOS, 0])
def test_outputs_match_transformers(name, pad):
    config, projection = TINY[name]
    reference, mine = _pair(config, projection)
    _assert_outputs(reference, mine, _ids(config, pad=pad))
    _assert_outputs(reference, mine, _ids(config, batch=2, length=9, pad=pad))  # shorter than 77 positions


def test_without_hidden_states_and_with_padding_mask():
    config, _ = TINY["clip-l-like"]
    reference, mine = _pair(config, False)
    ids = _ids(config)
    with torch.no_grad():
        got, want = mine(input_ids=ids), reference(input_ids=ids)
    assert got.hidden_states is None
    torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, atol=ATOL, rtol=0)
    mask = torch.ones_like(ids)
    mask[2, 30:] = 0  # right padding: no row is fully masked
    mask[4, 60:] = 0
    _assert_outputs(reference, mine, ids, attention_mask=mask)


def test_legacy_eos_token_id_2_pools_at_the_largest_id():
    config = {**TINY["clip-l-like"][0], "eos_token_id": 2}
    reference, mine = _pair(config, False)
    ids = _ids(config, pad=0)
    _assert_outputs(reference, mine, ids)
    with torch.no_grad():
        out = mine(input_ids=ids)
    torch.testing.assert_close(out.pooler_output, out.last_hidden_state[torch.arange(5), ids.argmax(-1)])


def test_mini_trained_text_encoder():
    from difusi.models import default_model_path, load_model

    path = default_model_path()
    if not path.exists():
        pytest.skip(f"difusi-mini weights not found at {path}")
    reference = load_model(path, device="cpu").text_encoders[0].model
    config = reference.config.to_dict()
    mine = text_model_class(False)(config).eval()
    mine.load_state_dict(reference.state_dict(), strict=True)
    _same_structure(reference, mine)
    _assert_outputs(reference, mine, _ids(config))


def test_embedding_hook_sees_the_token_embeddings():
    """Textual-inversion fixes: a forward hook on `get_input_embeddings()` changes the output the same way."""
    config, projection = TINY["bigg-like"]
    reference, mine = _pair(config, projection)
    ids = _ids(config)
    replacement = torch.randn(3, config["hidden_size"])

    def hook(_module, _args, output):
        output = output.clone()
        output[:, 1:4] = replacement
        return output

    handles = [model.get_input_embeddings().register_forward_hook(hook) for model in (reference, mine)]
    try:
        _assert_outputs(reference, mine, ids)
        with torch.no_grad():
            hooked = mine(input_ids=ids).last_hidden_state
    finally:
        for handle in handles:
            handle.remove()
    with torch.no_grad():
        plain = mine(input_ids=ids).last_hidden_state
    assert not torch.allclose(hooked, plain)


def test_loader_path_build_without_init_and_adopt():
    """The loader's route: build with the initialisers off, strict assign-load of the converted state dict."""
    from difusi.models.loader import _adopt, _fit_text_state, _no_weight_init

    for name in ("clip-l-like", "bigg-like"):
        config, projection = TINY[name]
        reference, _ = _pair(config, projection)
        state = {k.removeprefix("text_model."): v.clone() for k, v in reference.state_dict().items()}
        with _no_weight_init():
            mine = text_model_class(projection)(config)
        _adopt(mine, _fit_text_state(mine, state), name)
        mine.eval()
        assert not any(t.is_meta for t in (*mine.parameters(), *mine.buffers()))
        _assert_outputs(reference, mine, _ids(config))


def test_offload_blocks_are_the_same_modules():
    from difusi.models.offload import _blocks, _text_entries

    for name in ("clip-l-like", "bigg-like"):
        config, projection = TINY[name]
        reference, mine = _pair(config, projection)

        def paths(model, modules):
            names = {id(m): n for n, m in model.named_modules()}
            return [names[id(m)] for m in modules]

        assert paths(mine, _blocks(mine)) == paths(reference, _blocks(reference))
        assert paths(mine, _text_entries(mine)) == paths(reference, _text_entries(reference))


def test_clip_text_encoder_wrapper_end_to_end():
    """difusi's ClipTextEncoder on (own model, own tokenizer) vs (transformers model, transformers tokenizer)."""
    from difusi.models.text_encoders import reference_tokenizer
    from difusi.prompts.conditioning import ClipTextEncoder

    ours = _own_tokenizer()
    for name, pad, layer, final_norm in (("clip-l-like", EOS, -1, True), ("bigg-like", 0, -2, False),
                                         ("openclip-like", 0, -2, True)):
        config, projection = TINY[name]
        reference, mine = _pair(config, projection)
        kwargs = {"hidden_layer": layer, "final_layer_norm": final_norm, "pooled": projection}
        want_encoder = ClipTextEncoder(reference, reference_tokenizer(), pad, **kwargs)
        got_encoder = ClipTextEncoder(mine, ours, pad, **kwargs)
        prompt = "a (red:1.3) circle, [blue] square BREAK masterpiece, " + "very " * 80 + "long"
        for clip_skip in (1, 2):
            want = want_encoder.encode_batch([want_encoder.tokenize(prompt)], clip_skip)
            got = got_encoder.encode_batch([got_encoder.tokenize(prompt)], clip_skip)
            torch.testing.assert_close(got[0], want[0], atol=ATOL, rtol=0)
            if projection:
                torch.testing.assert_close(got[1], want[1], atol=ATOL, rtol=0)


def test_config_accepts_objects_and_unknown_keys():
    config = {**TINY["clip-l-like"][0], "dropout": 0.0, "model_type": "clip_text_model"}
    model = CLIPTextModel(config)
    assert model.config.model_type == "clip_text_model"
    again = CLIPTextModel(model.config.to_dict())
    assert again.config.to_dict() == model.config.to_dict()
    assert CLIPTextModel(_reference(TINY["clip-l-like"][0], False).config).config.hidden_size == 64
    with pytest.raises(ValueError, match="hidden_act"):
        CLIPTextModel({**config, "hidden_act": "swiglu"})


# ----------------------------------------------------------------------------- tokenizer


def _own_tokenizer(**kwargs) -> ClipTokenizer:
    return ClipTokenizer(TOKENIZER_DIR / "vocab.json", TOKENIZER_DIR / "merges.txt", **kwargs)


@pytest.fixture(scope="module")
def tokenizers():
    from difusi.models.text_encoders import reference_tokenizer

    return reference_tokenizer(), _own_tokenizer()


HANDWRITTEN = [
    "", " ", "   ", "\n", "\t\t", "a", "A", "a red circle", "A Red CIRCLE", "a  red   circle", "  leading", "trailing  ",
    "masterpiece, best quality, (ultra-detailed:1.2), 1girl, solo, long hair, looking at viewer",
    "((masterpiece)), [[low quality]], (blue eyes:1.35), {curly braces}, \\(escaped\\)",
    "a photo of a cat BREAK a photo of a dog", "BREAK", "break BREAK Break", "a [cat:dog:10] in the [rain|snow]",
    "<lora:add_detail:0.8> <hypernet:style:1> photo", "embedding:easynegative, EasyNegative, bad-hands-5",
    "portrait, 85mm, f/1.8, 4k, 8K UHD, 1920x1080, 3.14159, 1,000,000 $100 50% #1 @user",
    "don't stop, it's fine, we're here, they've gone, I'm ok, you'll see, he'd go, DON'T, IT'S", "'s 't 're '",
    "café naïve façade résumé Ångström", "e\u0301 (decomposed) vs é", "straße STRASSE ß ẞ", "ΟΔΟΣ ΣΑΣ σας ς",
    "İstanbul ıi I", "ǅungla ǈ ǋ", "ﬁnance ﬂow", "東京タワー 夜景", "한국어 프롬프트", "Привет мир", "مرحبا بالعالم",
    "שלום עולם", "हिन्दी", "ไทย", "😀 🤗🤗 👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 ❤️", "emoji:🔥fire🔥", "zero\u200bwidth", "nb\u00a0sp",
    "line\u2028sep", "ideographic\u3000space", "ctrl\x1c\x1d\x1e\x1fchars", "nul\x00char", "bell\x07", "del\x7f",
    "tab\tnew\nline\r\nend", "<|endoftext|>", "<|startoftext|>a<|endoftext|>", "x <|endoftext|> y", "<|ENDOFTEXT|>",
    "<|endoftext", "|>", "a<|startoftext|><|endoftext|>b", "###", "# # #", "##hashtag", "…", "...", "!!!", "?!?!",
    "——", "–", "~~~", "^_^", ":-)", "<3", "->", "=>", "a_b_c", "snake_case and camelCase and PascalCase",
    "https://example.com/path?q=1&r=2", "user@example.com", "C:\\path\\to\\file.png", "2024-01-01T12:00:00Z",
    "(((((((deep)))))))", "[[[[[shallow]]]]]", "(a:1.1)(b:0.9)", "score_9, score_8_up, score_7_up", "rating:safe",
    "1girl, 2boys, 3others", "①②③ Ⅳ ¼ ½ ²³", "٣٤٥ ৫৬", "𝔣𝔯𝔞𝔨𝔱𝔲𝔯 𝓈𝒸𝓇𝒾𝓅𝓉", "ｆｕｌｌｗｉｄｔｈ ＡＢＣ １２３", "ＢＲＥＡＫ",
    "a" * 200, "ab" * 150, "word " * 100, "very, " * 60, "🙂" * 30, "1234567890" * 8,
    "an astronaut riding a horse on mars, trending on artstation, by greg rutkowski and alphonse mucha",
    "(worst quality, low quality:1.4), (monochrome:1.1), lowres, bad anatomy, bad hands, text, error",
    "photo of a (beautiful:1.2) woman, [smiling:laughing:0.5], AND a dog :0.7",
]


def _generated_prompts(count: int = 300, seed: int = 7) -> list[str]:
    """Random A1111-style prompts from tag, punctuation, number, unicode and whitespace pieces."""
    rng = random.Random(seed)
    tags = ["masterpiece", "best quality", "1girl", "solo", "red hair", "blue eyes", "looking at viewer", "outdoors",
            "sunset", "city", "cyberpunk", "watercolor", "oil painting", "portrait", "landscape", "highres", "cat",
            "dog", "EasyNegative", "BREAK", "AND", "score_9", "ultra-detailed", "8k", "f/2.8", "café", "東京",
            "Привет", "😀", "🤗", "👍🏽", "ß", "ΣΟΦΙΑ", "don't", "it's", "<|endoftext|>", "ﬁ", "…", "½", "２０２４"]
    seps = [", ", ",", " ", "  ", "\n", "\t", " | ", ". ", "; ", ""]

    def fragment() -> str:
        tag = rng.choice(tags)
        if rng.random() < 0.2:
            tag = tag.upper() if rng.random() < 0.5 else tag.title()
        roll = rng.random()
        if roll < 0.15:
            return f"({tag}:{rng.uniform(0.1, 2):.{rng.randint(1, 3)}f})"
        if roll < 0.25:
            return "(" * rng.randint(1, 3) + tag + ")" * rng.randint(1, 3)
        if roll < 0.32:
            return f"[{tag}]"
        if roll < 0.37:
            return f"[{tag}:{rng.choice(tags)}:{rng.randint(1, 20)}]"
        if roll < 0.41:
            return f"<lora:{tag.replace(' ', '_')}:{rng.uniform(0, 1):.2f}>"
        if roll < 0.45:
            return str(rng.randint(0, 10**rng.randint(1, 8)))
        return tag

    prompts = []
    for _ in range(count):
        parts = [fragment() for _ in range(rng.randint(0, 25))]
        text = "".join(p + rng.choice(seps) for p in parts)
        if rng.random() < 0.1:
            text = "  " + text + "   "
        prompts.append(text)
    return prompts


PROMPTS = HANDWRITTEN + _generated_prompts()


def test_tokenizer_ids_match_transformers(tokenizers):
    reference, mine = tokenizers
    assert len(PROMPTS) >= 300
    want = reference(PROMPTS, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
    got = mine(PROMPTS, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
    for prompt, a, b in zip(PROMPTS, got, want, strict=True):
        assert a == b, repr(prompt)
    assert got == [mine.encode(p, add_special_tokens=False) for p in PROMPTS]  # cached BPE gives the same ids


def test_tokenizer_special_tokens_and_vocab(tokenizers):
    reference, mine = tokenizers
    assert (mine.bos_token_id, mine.eos_token_id, mine.pad_token_id) == (
        reference.bos_token_id, reference.eos_token_id, reference.pad_token_id) == (BOS, EOS, EOS)
    assert mine.model_max_length == reference.model_max_length == 77
    assert mine.get_vocab() == reference.get_vocab()
    assert mine.get_vocab().get(",</w>") == reference.get_vocab().get(",</w>")
    openclip = _own_tokenizer(pad_token="!")
    from transformers import CLIPTokenizer

    openclip_ref = CLIPTokenizer(vocab=str(TOKENIZER_DIR / "vocab.json"), merges=str(TOKENIZER_DIR / "merges.txt"),
                                 pad_token="!", model_max_length=77)
    assert openclip.pad_token_id == openclip_ref.pad_token_id == 0


def test_tokenizer_call_variants(tokenizers):
    """Special tokens, truncation, padding and tensors as difusi-mini's training code asks for them."""
    reference, mine = tokenizers
    sample = PROMPTS[:40] + ["word " * 100]
    assert mine(sample)["input_ids"] == reference(sample)["input_ids"]
    assert mine("a red circle")["input_ids"] == reference("a red circle")["input_ids"]
    kwargs = {"padding": "max_length", "max_length": 77, "truncation": True, "return_tensors": "pt"}
    want, got = reference(sample, **kwargs), mine(sample, **kwargs)
    assert torch.equal(got.input_ids, want.input_ids)
    assert torch.equal(got.attention_mask, want.attention_mask)
    assert mine.decode(mine("a red circle")["input_ids"], skip_special_tokens=True) == "a red circle"


def test_tokenizer_every_assigned_bmp_character(tokenizers):
    """Each assigned BMP code point between letters, doubled and before a digit (whitespace, letters, marks,
    digits, punctuation, case and NFC all show). Characters unassigned in Python's Unicode tables are skipped:
    there the `regex` package's and transformers' (Oniguruma / Rust) Unicode versions may disagree."""
    reference, mine = tokenizers
    chars = [chr(c) for c in range(0x10000)
             if not 0xD800 <= c < 0xE000 and unicodedata.category(chr(c)) != "Cn"]
    chars += list("😀🤗👍🏽𝔣𝓈𠀀𠀁🂡🀄𝟘𝟙")  # a few astral ones
    texts = ["".join(f"a{c}b {c}{c}X{c}1 " for c in chars[i : i + 64]) for i in range(0, len(chars), 64)]
    want = reference(texts, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
    got = mine(texts, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
    for text, a, b in zip(texts, got, want, strict=True):
        assert a == b, repr(text)


def test_chunking_with_own_tokenizer_matches(tokenizers):
    from difusi.prompts.tokens import tokenize_prompt

    reference, mine = tokenizers
    for prompt in PROMPTS[::3]:
        for pad in (EOS, 0):
            assert tokenize_prompt(prompt, mine, pad) == tokenize_prompt(prompt, reference, pad), repr(prompt)


# ----------------------------------------------------------------------------- import cost


def test_importing_own_clip_needs_no_transformers():
    code = ("import sys, difusi.models.clip, difusi.prompts.bpe; "
            "bad = [m for m in ('transformers', 'tokenizers', 'scipy', 'diffusers') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
