"""Text conditioning against references: diffusers' own ``encode_prompt`` (SD and SDXL) on tiny
random CLIP models, the models' raw hidden states, and A1111's emphasis rule written out."""

import pytest
import torch

from difusi.errors import ParamError
from difusi.prompts.conditioning import (
    ClipTextEncoder,
    Conditioning,
    conditioning_at,
    encode_prompt,
    encode_prompt_schedule,
    encode_texts,
    pad_to_same_length,
    sdxl_time_ids,
)

from .tiny_text_models import BOS, EOS, sd_pipeline, sdxl_pipeline, text_model, tokenizer, truncated_copy

PROMPT = "an astronaut riding a horse on the moon"
LONG_PROMPT = " ".join(["a tall green tree near a quiet blue lake under the evening sky"] * 10)


@pytest.fixture(scope="module")
def sd1():
    model, tok = text_model(32, 4, seed=0), tokenizer()
    return model, tok, ClipTextEncoder(model, tok, EOS)


@pytest.fixture(scope="module")
def sd1_pipeline(sd1):
    model, tok, _ = sd1
    return sd_pipeline(model, tok)


@pytest.fixture(scope="module")
def sdxl():
    clip_l, tok_l = text_model(32, 4, seed=1), tokenizer()
    big_g, tok_g = text_model(48, 3, seed=2, projection=True), tokenizer("!")
    encoders = [
        ClipTextEncoder(clip_l, tok_l, EOS, hidden_layer=-2, final_layer_norm=False),
        ClipTextEncoder(big_g, tok_g, 0, hidden_layer=-2, final_layer_norm=False, pooled=True),
    ]
    return sdxl_pipeline(clip_l, tok_l, big_g, tok_g), encoders


def _ids(tok, text, pad=EOS):
    body = tok(text, add_special_tokens=False).input_ids
    return torch.tensor([[BOS, *body, EOS] + [pad] * (75 - len(body))])


# ---------------------------------------------------------------- equality with diffusers


@pytest.mark.parametrize("prompt", [PROMPT, ""])
def test_sd1_matches_diffusers_encode_prompt(sd1, sd1_pipeline, prompt):
    _, _, encoder = sd1
    reference, _ = sd1_pipeline.encode_prompt(prompt, "cpu", 1, False)
    ours = encode_prompt([encoder], prompt)
    assert ours.context.shape == (1, 77, 32) and ours.pooled is None
    torch.testing.assert_close(ours.context, reference, atol=1e-5, rtol=0)


def test_sd2_penultimate_layer_matches_diffusers_on_the_truncated_model(sd1):
    # diffusers' SD2 text encoder is the OpenCLIP model minus its last layer; difusi keeps the
    # full model and reads hidden layer -2 through the final LayerNorm. Both must agree.
    model, _, _ = sd1
    tok = tokenizer("!")
    reference, _ = sd_pipeline(truncated_copy(model, 3), tok).encode_prompt(PROMPT, "cpu", 1, False)
    ours = encode_prompt([ClipTextEncoder(model, tok, 0, hidden_layer=-2, final_layer_norm=True)], PROMPT)
    torch.testing.assert_close(ours.context, reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("prompt", [PROMPT, ""])
def test_sdxl_matches_diffusers_encode_prompt(sdxl, prompt):
    pipeline, encoders = sdxl
    context, _, pooled, _ = pipeline.encode_prompt(
        prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False
    )
    ours = encode_prompt(encoders, prompt)
    assert ours.context.shape == (1, 77, 32 + 48)
    torch.testing.assert_close(ours.context, context, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.pooled, pooled, atol=1e-5, rtol=0)


def test_sdxl_time_ids_match_diffusers(sdxl):
    pipeline, _ = sdxl
    expected = pipeline._get_add_time_ids(
        (768, 1024), (16, 32), (512, 640), dtype=torch.float32, text_encoder_projection_dim=16
    )
    torch.testing.assert_close(sdxl_time_ids((768, 1024), (16, 32), (512, 640)), expected, atol=0, rtol=0)
    assert sdxl_time_ids((64, 96)).tolist() == [[64.0, 96.0, 0.0, 0.0, 64.0, 96.0]]


@pytest.mark.parametrize("bad", [{"original_size": (0, 64)}, {"crop_coords": (-1, 0)}, {"target_size": (64,)}])
def test_sdxl_time_ids_reject_bad_sizes(bad):
    args = {"original_size": (64, 64), "crop_coords": (0, 0), "target_size": (64, 64)} | bad
    with pytest.raises(ParamError) as error:
        sdxl_time_ids(**args)
    assert error.value.field == next(iter(bad))


# ---------------------------------------------------------------- clip skip


@pytest.mark.parametrize("clip_skip", [2, 3])
def test_clip_skip_sd1_is_hidden_state_minus_n_with_final_layer_norm(sd1, clip_skip):
    model, tok, encoder = sd1
    ids = _ids(tok, PROMPT)
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[-clip_skip]
        expected = model.final_layer_norm(hidden)
    torch.testing.assert_close(encode_prompt([encoder], PROMPT, clip_skip=clip_skip).context, expected)


def test_clip_skip_without_final_layer_norm_moves_back_from_the_penultimate_layer(sdxl):
    _, encoders = sdxl
    clip_l = encoders[0]
    ids = _ids(clip_l.tokenizer, PROMPT)
    with torch.no_grad():
        expected = clip_l.model(input_ids=ids, output_hidden_states=True).hidden_states[-3]
    torch.testing.assert_close(encode_prompt([clip_l], PROMPT, clip_skip=2).context, expected)


@pytest.mark.parametrize("clip_skip", [0, 5, -1, 1.5])
def test_clip_skip_out_of_range_is_a_param_error(sd1, clip_skip):
    _, _, encoder = sd1
    with pytest.raises(ParamError) as error:
        encode_prompt([encoder], PROMPT, clip_skip=clip_skip)
    assert error.value.field == "clip_skip"
    assert "1 to 4" in error.value.message


# ---------------------------------------------------------------- emphasis


def test_emphasis_multiplies_then_restores_the_mean(sd1):
    model, tok, encoder = sd1
    # "a (cat:1.5) [on] mat" tokenizes like "a cat on mat", one token per word
    ids = _ids(tok, "a cat on mat")
    weights = torch.ones(1, 77)
    weights[0, 2] = 1.5
    weights[0, 3] = 1 / 1.1
    with torch.no_grad():
        plain = model(input_ids=ids).last_hidden_state
    scaled = plain * weights[..., None]
    expected = scaled * (plain.mean() / scaled.mean())
    ours = encode_prompt([encoder], "a (cat:1.5) [on] mat").context
    torch.testing.assert_close(ours, expected)
    torch.testing.assert_close(ours.mean(), plain.mean())


def test_emphasis_mean_is_shared_by_the_texts_of_one_schedule(sd1):
    # A1111 encodes all schedule texts of a prompt as one batch, so one mean rescales them all.
    model, tok, encoder = sd1
    texts = ["a cat", "a cat", "a dog"]
    ids = torch.cat([_ids(tok, text) for text in texts])
    weights = torch.ones(3, 77)
    weights[2, 2] = 1.4  # "(dog:1.4)"
    with torch.no_grad():
        plain = model(input_ids=ids).last_hidden_state
    scaled = plain * weights[..., None]
    expected = scaled * (plain.mean() / scaled.mean())
    encoded = encode_texts([encoder], ["a cat", "a cat", "a (dog:1.4)"])
    assert encoded[0] is encoded[1]  # each distinct text encoded once
    torch.testing.assert_close(encoded[0].context, expected[0:1])
    torch.testing.assert_close(encoded[2].context, expected[2:3])


# ---------------------------------------------------------------- chunks, BREAK, padding


def test_long_prompt_is_encoded_chunk_by_chunk(sd1):
    model, tok, encoder = sd1
    body = tok(LONG_PROMPT, add_special_tokens=False).input_ids
    assert 75 < len(body) <= 150 and tok.get_vocab()[",</w>"] not in body
    ours = encode_prompt([encoder], LONG_PROMPT)
    assert ours.chunks == 2 and ours.context.shape == (1, 154, 32)
    for index in range(2):
        part = body[75 * index : 75 * (index + 1)]
        ids = torch.tensor([[BOS, *part, EOS] + [EOS] * (75 - len(part))])
        with torch.no_grad():
            expected = model(input_ids=ids).last_hidden_state
        torch.testing.assert_close(ours.context[:, 77 * index : 77 * (index + 1)], expected)


def test_break_encodes_each_side_as_its_own_chunk(sd1):
    model, tok, encoder = sd1
    ours = encode_prompt([encoder], "a red cat BREAK a blue dog")
    assert ours.chunks == 2
    for index, text in enumerate(["a red cat", "a blue dog"]):
        with torch.no_grad():
            expected = model(input_ids=_ids(tok, text)).last_hidden_state
        torch.testing.assert_close(ours.context[:, 77 * index : 77 * (index + 1)], expected)


def test_sdxl_pooled_comes_from_the_first_chunk(sdxl):
    _, encoders = sdxl
    big_g = encoders[1]
    body = big_g.tokenizer(LONG_PROMPT, add_special_tokens=False).input_ids
    ids = torch.tensor([[BOS, *body[:75], EOS]])
    with torch.no_grad():
        expected = big_g.model(input_ids=ids).text_embeds
    ours = encode_prompt(encoders, LONG_PROMPT)
    assert ours.chunks == 2 and ours.context.shape == (1, 154, 80)
    torch.testing.assert_close(ours.pooled, expected)


def test_pad_to_same_length_appends_empty_prompt_encodings(sd1):
    model, tok, encoder = sd1
    cond = encode_prompt([encoder], LONG_PROMPT + " BREAK more BREAK and more")
    uncond = encode_prompt([encoder], "ugly")
    assert (cond.chunks, uncond.chunks) == (4, 1)
    padded_cond, padded_uncond = pad_to_same_length(cond, uncond)
    assert padded_cond is cond
    assert padded_uncond.context.shape == cond.context.shape
    with torch.no_grad():
        empty = model(input_ids=_ids(tok, "")).last_hidden_state
    torch.testing.assert_close(padded_uncond.context[:, :77], uncond.context)
    for index in range(1, 4):
        torch.testing.assert_close(padded_uncond.context[:, 77 * index : 77 * (index + 1)], empty)
    # symmetric
    again_uncond, again_cond = pad_to_same_length(uncond, cond)
    torch.testing.assert_close(again_uncond.context, padded_uncond.context)


def test_pad_without_empty_encoding_is_an_error():
    a = Conditioning(torch.zeros(1, 154, 8))
    b = Conditioning(torch.zeros(1, 77, 8))
    with pytest.raises(ValueError, match="empty_chunk"):
        pad_to_same_length(a, b)


def test_repeat_makes_a_batch(sdxl):
    _, encoders = sdxl
    single = encode_prompt(encoders, PROMPT)
    batch = single.repeat(3)
    assert batch.context.shape == (3, 77, 80) and batch.pooled.shape == (3, 16)
    torch.testing.assert_close(batch.context[2], single.context[0])


def test_zeros_like_keeps_shapes_and_padding(sdxl):
    _, encoders = sdxl
    zero = encode_prompt(encoders, LONG_PROMPT).zeros_like()
    assert zero.context.shape == (1, 154, 80) and zero.pooled.shape == (1, 16)
    assert not zero.context.any() and not zero.pooled.any()
    _, padded = pad_to_same_length(encode_prompt(encoders, LONG_PROMPT + " BREAK x"), zero)
    assert padded.context.shape[1] == 231 and padded.context[:, 154:].abs().sum() > 0


# ---------------------------------------------------------------- schedules


def test_schedule_encodes_each_text_and_switches_at_a1111_steps(sd1):
    _, _, encoder = sd1
    schedule = encode_prompt_schedule([encoder], "a [cat:dog:0.5] on a mat", 6)
    assert [end for end, _ in schedule] == [3, 6]
    for (_, conditioning), text in zip(schedule, ["a cat on a mat", "a dog on a mat"], strict=True):
        torch.testing.assert_close(conditioning.context, encode_prompt([encoder], text).context)
    # 0-based sampler step i uses the first entry with i <= end_step (A1111 reconstruct_cond_batch)
    picked = [conditioning_at(schedule, step) for step in range(6)]
    assert [p is schedule[0][1] for p in picked] == [True, True, True, True, False, False]


def test_alternation_shares_one_encoding_per_text(sd1):
    _, _, encoder = sd1
    calls = []
    hook = encoder.model.register_forward_hook(lambda module, args, output: calls.append(1))
    try:
        schedule = encode_prompt_schedule([encoder], "[cat|dog] in a field", 6)
    finally:
        hook.remove()
    assert len(schedule) == 6
    assert len({id(conditioning) for _, conditioning in schedule}) == 2
    assert schedule[0][1] is schedule[2][1] and schedule[1][1] is schedule[3][1]
    assert len(calls) <= 2  # one batched pass for the texts (+ the cached empty prompt at most once)


def test_bad_when_surfaces_as_param_error(sd1):
    _, _, encoder = sd1
    with pytest.raises(ParamError) as error:
        encode_prompt_schedule([encoder], "[cat:dog:-1]", 10)  # a non-number `when` is text, as A1111
    assert error.value.field == "prompt"
