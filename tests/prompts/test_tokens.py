"""Tokens and 77-token chunks. References: the transformers CLIP tokenizer's own padding, the
known CLIP ids, and A1111's chunk rules (75 tokens + BOS/EOS; break after a comma within the
last 20 tokens; BREAK starts a new chunk)."""

from importlib import resources

import pytest
from transformers import CLIPTokenizer

from difusi.prompts.tokens import (
    CHUNK_TOKENS,
    SpecialTokens,
    chunk_tokens,
    load_clip_tokenizer,
    tokenize_prompt,
)

BOS, EOS = 49406, 49407
COMMA = 267  # ",</w>"


@pytest.fixture(scope="module")
def tokenizer():
    return load_clip_tokenizer()


def test_known_ids_for_a_photo_of_a_cat(tokenizer):
    (chunk,) = tokenize_prompt("a photo of a cat", tokenizer, EOS)
    assert list(chunk.ids[:7]) == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(chunk.ids) == len(chunk.weights) == 77
    assert chunk.weights == (1.0,) * 77


@pytest.mark.parametrize(("pad_token", "pad_id"), [("<|endoftext|>", EOS), ("!", 0)])
def test_single_chunk_matches_tokenizer_max_length_padding(tokenizer, pad_token, pad_id):
    # diffusers pads with the tokenizer's pad token: EOS for SD1's, "!" (id 0) for SD2/SDXL-bigG's.
    folder = resources.files("difusi") / "assets" / "tokenizers" / "clip"
    reference = CLIPTokenizer(
        vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"), pad_token=pad_token, model_max_length=77
    )
    prompt = "an astronaut riding a horse, oil painting"
    expected = reference(prompt, padding="max_length", max_length=77, truncation=True).input_ids
    (chunk,) = tokenize_prompt(prompt, tokenizer, pad_id)
    assert list(chunk.ids) == expected


def test_empty_prompt_is_one_padded_chunk(tokenizer):
    chunks = tokenize_prompt("", tokenizer, 0)
    assert [list(c.ids) for c in chunks] == [[BOS, EOS] + [0] * 75]


def _ids_without_specials(tokenizer, text):
    return tokenizer(text, add_special_tokens=False, truncation=False, verbose=False).input_ids


def test_long_prompt_without_commas_splits_every_75_tokens(tokenizer):
    text = " ".join(["tall green tree near a quiet lake"] * 25)
    ids = _ids_without_specials(tokenizer, text)
    assert len(ids) > 2 * CHUNK_TOKENS
    chunks = tokenize_prompt(text, tokenizer, EOS)
    assert len(chunks) == -(-len(ids) // CHUNK_TOKENS)
    for index, chunk in enumerate(chunks):
        body = ids[index * CHUNK_TOKENS : (index + 1) * CHUNK_TOKENS]
        assert list(chunk.ids) == [BOS, *body, EOS] + [EOS] * (CHUNK_TOKENS - len(body))


@pytest.mark.parametrize(("count", "chunk_count"), [(75, 1), (76, 2), (150, 2), (151, 3)])
def test_chunk_boundaries(count, chunk_count):
    special = SpecialTokens(bos=BOS, eos=EOS, pad=0, comma=COMMA)
    chunks = chunk_tokens([(list(range(1, count + 1)), 1.0)], special)
    assert len(chunks) == chunk_count
    assert [t for c in chunks for t in c.ids if t not in (BOS, EOS, 0)] == list(range(1, count + 1))
    assert all(len(c.ids) == 77 for c in chunks)


def _tokens_with_comma_at(comma_position, total):
    return [COMMA if i == comma_position else 1000 + i for i in range(total)]


def test_comma_within_last_20_tokens_moves_the_tail_to_the_next_chunk():
    special = SpecialTokens(bos=BOS, eos=EOS, pad=EOS, comma=COMMA)
    tokens = _tokens_with_comma_at(60, 90)  # comma is 75 - 60 = 15 tokens from the chunk end
    first, second = chunk_tokens([(tokens, 1.0)], special)
    assert list(first.ids) == [BOS, *tokens[:61], EOS] + [EOS] * (75 - 61)
    assert list(second.ids) == [BOS, *tokens[61:], EOS] + [EOS] * (75 - 29)


def test_comma_further_back_than_20_tokens_does_not_move_anything():
    special = SpecialTokens(bos=BOS, eos=EOS, pad=EOS, comma=COMMA)
    tokens = _tokens_with_comma_at(50, 90)  # 25 tokens from the end: beyond the 20-token limit
    first, second = chunk_tokens([(tokens, 1.0)], special)
    assert list(first.ids) == [BOS, *tokens[:75], EOS]
    assert list(second.ids[1:16]) == tokens[75:]


def test_comma_backtrack_can_be_disabled():
    special = SpecialTokens(bos=BOS, eos=EOS, pad=EOS, comma=COMMA)
    tokens = _tokens_with_comma_at(60, 90)
    first, _ = chunk_tokens([(tokens, 1.0)], special, comma_backtrack=0)
    assert list(first.ids[1:76]) == tokens[:75]


def test_real_comma_separated_prompt_breaks_after_a_comma(tokenizer):
    text = ", ".join(f"detailed {word}" for word in ["castle", "forest", "river", "mountain", "dragon", "knight"] * 8)
    chunks = tokenize_prompt(text, tokenizer, EOS)
    assert len(chunks) >= 2
    first_body = [t for t in chunks[0].ids[1:] if t != EOS]
    assert first_body[-1] == COMMA  # the chunk ends on a comma, not mid-phrase
    # nothing is lost or reordered
    ids = _ids_without_specials(tokenizer, text)
    assert [t for c in chunks for t in c.ids if t not in (BOS, EOS)] == ids


def test_weights_follow_their_fragments(tokenizer):
    (chunk,) = tokenize_prompt("a (red:1.5) [cat]", tokenizer, EOS)
    red, cat = _ids_without_specials(tokenizer, "red")[0], _ids_without_specials(tokenizer, "cat")[0]
    weights = dict(zip(chunk.ids[1:4], chunk.weights[1:4], strict=True))
    assert weights[red] == 1.5
    assert weights[cat] == pytest.approx(1 / 1.1)
    assert weights[320] == 1.0  # "a"
    assert chunk.weights[0] == 1.0 and set(chunk.weights[4:]) == {1.0}


def test_break_starts_a_new_chunk(tokenizer):
    chunks = tokenize_prompt("a cat BREAK a dog", tokenizer, 0)
    cat, dog = 2368, _ids_without_specials(tokenizer, "dog")[0]
    assert [list(c.ids[:5]) for c in chunks] == [[BOS, 320, cat, EOS, 0], [BOS, 320, dog, EOS, 0]]


def test_break_edge_cases(tokenizer):
    assert len(tokenize_prompt("BREAK", tokenizer, 0)) == 1
    assert len(tokenize_prompt("a BREAK", tokenizer, 0)) == 1
    assert len(tokenize_prompt("a BREAK BREAK b", tokenizer, 0)) == 3  # the middle chunk is empty
    assert len(tokenize_prompt("a break b", tokenizer, 0)) == 1  # lowercase is a word


def test_pad_only_after_the_first_eos():
    special = SpecialTokens(bos=BOS, eos=EOS, pad=0, comma=COMMA)
    (chunk,) = chunk_tokens([([5, 6], 1.0)], special)
    assert list(chunk.ids) == [BOS, 5, 6, EOS] + [0] * 73
