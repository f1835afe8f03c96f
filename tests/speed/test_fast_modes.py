"""Opt-in fast modes (NGMS, DeepCache, ToMe): off by default, exact when off, each checked against a
reference implementation when on, recorded in the infotext and parsed back, validated at every front end."""

import numpy as np
import pytest
import torch
from speed_helpers import difusi_pixels, euler_params

from difusi import cli
from difusi.errors import ParamError
from difusi.infotext import format_infotext, parse_infotext, recipe_from_infotext
from difusi.models import load_model
from difusi.params import GenerationParams
from difusi.pipeline import _denoiser, _encode
from difusi.samplers import build_sigmas, get_sampler
from difusi.samplers.denoiser import CFGDenoiser, DiscreteNoiseTable
from difusi.server import a1111
from difusi.speed.cfg_cutoff import skip_uncond
from difusi.speed.deepcache import deepcache
from difusi.speed.tome import bipartite_merge, token_merging
from difusi.vae import decode_latents

MODES = {
    "s_min_uncond": (3.0, "NGMS: 3"),
    "token_merging_ratio": (0.5, "Token merging ratio: 0.5"),
    "deepcache_interval": (2, "DeepCache interval: 2"),
}


@pytest.fixture(scope="module")
def model(tiny_file):
    return load_model(tiny_file("sd1"))


# ----------------------------------------------------------------------------- params, infotext, front ends


@pytest.mark.parametrize(("field", "value", "message"), [
    ("s_min_uncond", -0.5, "must be in [0, 100], got -0.5"),
    ("s_min_uncond", float("nan"), "must be a number in [0, 100], got NaN"),
    ("token_merging_ratio", 0.8, "must be in [0, 0.75], got 0.8"),
    ("deepcache_interval", 0, "must be in [1, 50], got 0"),
    ("deepcache_interval", 51, "must be in [1, 50], got 51"),
])
def test_out_of_range_mode_values_name_the_field(field, value, message):
    with pytest.raises(ParamError) as caught:
        GenerationParams(prompt="x", width=64, height=64, **{field: value}).validated()
    assert caught.value.field == field and message in str(caught.value)


def test_non_integer_deepcache_interval_from_a_mapping_is_rejected():
    with pytest.raises(ParamError) as caught:
        GenerationParams.from_mapping({"deepcache_interval": 2.5})
    assert caught.value.field == "deepcache_interval"


@pytest.mark.parametrize(("flags", "message"), [
    (["--deepcache-interval", "0"], "--deepcache-interval: must be in [1, 50], got 0"),
    (["--token-merging-ratio", "0.9"], "--token-merging-ratio: must be in [0, 0.75], got 0.9"),
    (["--s-min-uncond", "-1"], "--s-min-uncond: must be in [0, 100], got -1"),
    (["--deepcache-interval", "x"], "--deepcache-interval: must be an integer, got 'x'"),
])
def test_cli_rejects_bad_mode_values_in_one_line(flags, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["generate", "a cat", *flags])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [f"difusi: error: {message}"]


def test_http_request_fields_map_to_the_modes():
    request = a1111.Txt2ImgRequest.model_validate({"prompt": "x", "s_min_uncond": 2.5, "token_merging_ratio": 0.25,
                                                   "deepcache_interval": 3})
    params = a1111.to_txt2img_job(request).params
    assert (params.s_min_uncond, params.token_merging_ratio, params.deepcache_interval) == (2.5, 0.25, 3)
    overridden = a1111.to_txt2img_job(a1111.Txt2ImgRequest.model_validate(
        {"prompt": "x", "override_settings": {"s_min_uncond": 1.5, "token_merging_ratio": 0.2}})).params
    assert (overridden.s_min_uncond, overridden.token_merging_ratio) == (1.5, 0.2)  # A1111 sends them as options too
    bad = a1111.to_txt2img_job(a1111.Txt2ImgRequest.model_validate({"prompt": "x", "token_merging_ratio": 2}))
    with pytest.raises(ParamError) as caught:
        bad.params.validated(native_size=64)
    assert caught.value.field == "token_merging_ratio"


def test_infotext_records_enabled_modes_and_parses_back():
    params = GenerationParams(prompt="a cat", seed=5, width=64, height=64, s_min_uncond=2.5, token_merging_ratio=0.3,
                              deepcache_interval=4)
    text = format_infotext(params, seed=5, subseed=None, model_name="m", model_hash="0123456789")
    fields, unknown = parse_infotext(text)
    assert (fields["NGMS"], fields["Token merging ratio"], fields["DeepCache interval"]) == ("2.5", "0.3", "4")
    assert unknown == []
    back, _ = GenerationParams.from_mapping(recipe_from_infotext(text).values)
    assert (back.s_min_uncond, back.token_merging_ratio, back.deepcache_interval) == (2.5, 0.3, 4)
    plain = format_infotext(GenerationParams(prompt="a cat", width=64, height=64), seed=5, subseed=None,
                            model_name="m", model_hash="0123456789")
    assert not any(key in plain for key in ("NGMS", "Token merging", "DeepCache"))


# ----------------------------------------------------------------------------- pipeline: off is exact, on is recorded


def test_modes_at_their_off_values_give_the_exact_image(model):
    exact, _ = difusi_pixels(model, euler_params())
    off, result = difusi_pixels(model, euler_params(s_min_uncond=0.0, token_merging_ratio=0.0, deepcache_interval=1))
    assert np.array_equal(exact, off)
    assert not any(key in result.infotexts[0] for key in ("NGMS", "Token merging", "DeepCache"))


@pytest.mark.parametrize("field", list(MODES))
def test_each_mode_changes_the_image_only_when_enabled_and_says_so(model, field):
    value, infotext = MODES[field]
    exact, _ = difusi_pixels(model, euler_params())
    fast, result = difusi_pixels(model, euler_params(**{field: value}))
    assert np.abs(fast - exact).max() > 1e-4
    assert infotext in result.infotexts[0]
    assert getattr(result.images[0].params, field) == value
    again, _ = difusi_pixels(model, euler_params(**{field: value}))
    assert np.array_equal(fast, again), "a fast mode is deterministic"
    assert "forward" not in vars(model.unet), "the UNet is restored after the job"


# ----------------------------------------------------------------------------- NGMS


def test_skip_uncond_rule():
    assert not skip_uncond(0.0, 0.5, 1, 7.0)  # off
    assert not skip_uncond(5.0, 0.5, 1, 1.0)  # no guidance to skip
    assert not skip_uncond(5.0, 0.5, 2, 7.0)  # even steps keep the uncond pass (A1111 alternates)
    assert skip_uncond(5.0, 0.5, 3, 7.0)
    assert not skip_uncond(5.0, 5.0, 3, 7.0)  # strictly below the threshold


def test_ngms_image_equals_a_hand_written_euler_loop(model):
    """Reference: Euler where odd steps below s_min_uncond use the cond prediction alone (A1111's rule)."""
    params = euler_params(steps=4, s_min_uncond=100.0)
    ours, _ = difusi_pixels(model, params)
    table = DiscreteNoiseTable()
    sigmas = build_sigmas(get_sampler("Euler"), "Karras", params.steps, table).float()
    resolved = params.validated(native_size=model.native_size)
    cond_schedule, uncond_schedule = _encode(model, resolved)
    cond, uncond = cond_schedule[0][1].context, uncond_schedule[0][1].context
    cfg = CFGDenoiser(_denoiser(model, table, GenerationParams(backend="torch"))[0])
    x = torch.randn((1, 4, 32, 32), generator=torch.Generator("cpu").manual_seed(params.seed)) * sigmas[0]
    with torch.inference_mode():
        for i in range(params.steps):
            scale = 1.0 if i % 2 == 1 else params.cfg_scale
            denoised = cfg(x, sigmas[i : i + 1], cond={"context": cond}, uncond={"context": uncond}, cond_scale=scale)
            x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
        decoded = decode_latents(model.vae, x, model.scaling_factor)
    reference = (decoded / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert np.abs(ours - reference).max() <= 1e-5
    exact, _ = difusi_pixels(model, euler_params(steps=4))
    assert np.abs(exact - reference).max() > 1e-3, "the reference differs from plain CFG, so the test can fail"


def test_ngms_below_every_sigma_changes_nothing(model):
    exact, _ = difusi_pixels(model, euler_params())
    cut, _ = difusi_pixels(model, euler_params(s_min_uncond=1e-3))  # every sigma > 0 of the schedule is larger
    assert np.array_equal(exact, cut)


# ----------------------------------------------------------------------------- DeepCache


def _unet_inputs(unet, seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((2, 4, 16, 16), generator=generator)
    context = torch.randn((2, 77, unet.config.cross_attention_dim), generator=generator)
    return x, torch.tensor([600.0, 600.0]), context


def test_deepcache_reuses_the_deep_features_of_the_last_full_call(model):
    """Reference by hooks: the cached call equals the UNet on x2 with up_blocks[-2]'s output taken from x1."""
    unet = model.unet
    x1, t, context = _unet_inputs(unet, 1)
    x2 = x1 + 0.3 * torch.randn(x1.shape, generator=torch.Generator().manual_seed(2))
    captured = {}
    deep_calls = []
    with torch.inference_mode():
        handle = unet.up_blocks[-2].register_forward_hook(lambda m, a, out: captured.__setitem__("deep", out))
        plain1 = unet(x1, t, encoder_hidden_states=context).sample
        handle.remove()
        handle = unet.up_blocks[-2].register_forward_hook(lambda m, a, out: captured["deep"])
        reference2 = unet(x2, t, encoder_hidden_states=context).sample
        handle.remove()
        plain2 = unet(x2, t, encoder_hidden_states=context).sample
        counter = unet.mid_block.resnets[0].register_forward_hook(lambda *a: deep_calls.append(1))
        with deepcache(unet, interval=2):
            out1 = unet(x1, t, encoder_hidden_states=context).sample
            calls_after_full = len(deep_calls)
            out2 = unet(x2, t, encoder_hidden_states=context).sample
            calls_after_cached = len(deep_calls)
            out3 = unet(x2, t, encoder_hidden_states=context).sample  # third call: full again
        counter.remove()
    assert torch.equal(out1, plain1)
    assert torch.allclose(out2, reference2, atol=1e-6)
    assert not torch.allclose(out2, plain2, atol=1e-4)
    assert calls_after_full == 1 and calls_after_cached == 1, "the cached call skips the deep blocks"
    assert torch.equal(out3, plain2)
    assert "forward" not in vars(unet) and all("forward" not in vars(b) for b in unet.up_blocks)


def test_deepcache_starts_fresh_for_a_new_input_shape(model):
    unet = model.unet
    x, t, context = _unet_inputs(unet, 3)
    with torch.inference_mode():
        single = unet(x[:1], t[:1], encoder_hidden_states=context[:1]).sample
        with deepcache(unet, interval=5):
            unet(x, t, encoder_hidden_states=context)
            got = unet(x[:1], t[:1], encoder_hidden_states=context[:1]).sample  # batch 1: nothing cached yet
    assert torch.equal(got, single)


# ----------------------------------------------------------------------------- ToMe


def _brute_force_merge(x, height, width, r):
    """Token merging written as loops over tokens (one batch element), for comparison."""
    tokens = [(y, xx) for y in range(height) for xx in range(width)]
    dst = [i for i, (y, xx) in enumerate(tokens) if y % 2 == 0 and xx % 2 == 0 and y < height // 2 * 2 and xx < width // 2 * 2]
    src = [i for i in range(len(tokens)) if i not in dst]
    unit = x / x.norm(dim=-1, keepdim=True)
    best = []
    for s in src:
        sims = torch.stack([unit[s] @ unit[d] for d in dst])
        best.append((float(sims.max()), s, dst[int(sims.argmax())]))
    order = sorted(range(len(src)), key=lambda k: -best[k][0])
    merged = {best[k][1]: best[k][2] for k in order[:r]}
    kept = [best[k][1] for k in order[r:]]
    out_dst = []
    for d in dst:
        group = [x[d]] + [x[s] for s, target in merged.items() if target == d]
        out_dst.append(torch.stack(group).mean(0))
    return torch.stack([x[s] for s in kept] + out_dst)


@pytest.mark.parametrize(("height", "width", "r"), [(4, 4, 5), (5, 7, 9), (6, 4, 18)])
def test_bipartite_merge_matches_brute_force(height, width, r):
    x = torch.randn((2, height * width, 8), generator=torch.Generator().manual_seed(height * width + r))
    merge, unmerge = bipartite_merge(x, height, width, r)
    merged = merge(x)
    assert merged.shape == (2, height * width - r, 8)
    for b in range(2):
        assert torch.allclose(merged[b], _brute_force_merge(x[b], height, width, r), atol=1e-6)
    assert unmerge(merged).shape == x.shape


def test_merging_nothing_is_the_identity():
    x = torch.randn((2, 24, 8), generator=torch.Generator().manual_seed(1))
    merge, unmerge = bipartite_merge(x, 6, 4, 0)
    assert torch.equal(merge(x), x) and torch.equal(unmerge(x), x)


def test_merging_duplicate_tokens_loses_nothing():
    """Every source equal to its tile's destination: merging all sources and unmerging is exact."""
    base = torch.randn((1, 3, 3, 8), generator=torch.Generator().manual_seed(0))
    x = base.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2).reshape(1, 36, 8)
    merge, unmerge = bipartite_merge(x, 6, 6, 27)
    merged = merge(x)
    assert merged.shape == (1, 9, 8)
    assert torch.allclose(unmerge(merged), x, atol=1e-6)


def test_token_merging_only_touches_full_resolution_self_attention(model):
    unet = model.unet
    x, t, context = _unet_inputs(unet, 4)
    with torch.inference_mode():
        plain = unet(x, t, encoder_hidden_states=context).sample
        with token_merging(unet, 0.0):
            off = unet(x, t, encoder_hidden_states=context).sample
        with token_merging(unet, 0.5):
            on = unet(x, t, encoder_hidden_states=context).sample
        after = unet(x, t, encoder_hidden_states=context).sample
    assert torch.equal(off, plain) and torch.equal(after, plain)
    assert not torch.allclose(on, plain, atol=1e-5)
    assert (on - plain).abs().mean() < plain.abs().mean(), "merging approximates, it does not scramble"


def test_token_merging_acts_on_sdxl_whose_full_resolution_has_no_attention(tiny_file):
    sdxl = load_model(tiny_file("sdxl")).unet
    assert not getattr(sdxl.down_blocks[0], "attentions", None)
    generator = torch.Generator().manual_seed(5)
    x = torch.randn((1, 4, 16, 16), generator=generator)
    context = torch.randn((1, 77, sdxl.config.cross_attention_dim), generator=generator)
    added = {"text_embeds": torch.randn((1, 32), generator=generator), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    with torch.inference_mode():
        plain = sdxl(x, torch.tensor([500.0]), encoder_hidden_states=context, added_cond_kwargs=added).sample
        with token_merging(sdxl, 0.5):
            merged = sdxl(x, torch.tensor([500.0]), encoder_hidden_states=context, added_cond_kwargs=added).sample
    assert not torch.allclose(merged, plain, atol=1e-5)
