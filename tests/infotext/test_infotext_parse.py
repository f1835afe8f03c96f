"""Parsing real-world A1111 infotexts. Expected values are read off the text by the A1111 format's rules
(last line = settings when it has >= 3 `key: value` pairs; quoted values are JSON; "WxH" splits)."""

from __future__ import annotations

import pytest

from difusi.infotext import parse_infotext, quote, recipe_from_infotext, unquote

ANIME_HIRES = (
    "masterpiece, best quality, (1girl:1.2), ((red hair)), [smile], looking at viewer, <lora:add_detail:0.6>\n"
    "Negative prompt: (worst quality, low quality:1.4), EasyNegative, bad-hands-5\n"
    "Steps: 28, Sampler: DPM++ 2M Karras, CFG scale: 7.5, Seed: 2847562301, Size: 512x768, "
    "Model hash: 7f96a1a9ca, Model: AnythingV5_v5PrtRE, Denoising strength: 0.45, Clip skip: 2, ENSD: 31337, "
    "Hires upscale: 2, Hires steps: 15, Hires upscaler: R-ESRGAN 4x+ Anime6B, "
    'Lora hashes: "add_detail: 7c6bad76eb54", TI hashes: "EasyNegative: c74b4e810b03, bad-hands-5: aa7651be154c", '
    "Version: v1.6.0"
)

SDXL_QUOTED_MODEL = (
    "a photo of an astronaut riding a horse on mars, 8k, highly detailed\n"
    "Steps: 30, Sampler: Euler a, Schedule type: Automatic, CFG scale: 6, Seed: 1234, Size: 1024x1024, "
    'Model hash: 31e35c80fc, Model: "sd_xl_base_1.0, refined: v2", VAE hash: 235745af8d, VAE: sdxl_vae.safetensors, '
    "Version: v1.10.1"
)

ADETAILER = (
    "portrait of a woman, (freckles:0.8), soft light\n"
    "Negative prompt: blurry\n"
    "Steps: 25, Sampler: DPM++ SDE, Schedule type: Karras, CFG scale: 5.5, Seed: 99, Size: 640x960, "
    "Model hash: e6bb9ea85b, Model: realisticVisionV60B1_v51VAE, ADetailer model: face_yolov8n.pt, "
    "ADetailer confidence: 0.3, ADetailer dilate erode: 4, ADetailer mask blur: 4, "
    "ADetailer denoising strength: 0.4, ADetailer inpaint only masked: True, ADetailer inpaint padding: 32, "
    "ADetailer version: 24.1.2, Version: v1.7.0"
)

MULTILINE_VARIATION = (
    "a castle on a hill\n"
    "BREAK\n"
    "sunset, dramatic sky\n"
    "Negative prompt: lowres,\n"
    "text, watermark\n"
    "Steps: 20, Sampler: Euler, CFG scale: 7, Seed: 42, Size: 512x512, Model hash: cc6cb27103, "
    "Model: v1-5-pruned-emaonly, Variation seed: 77, Variation seed strength: 0.25, Seed resize from: 768x768, "
    "Version: v1.9.4"
)

OLD_STYLE_ESCAPES = (
    "(((cat))), [dog:cat:10], \\(literal parens\\)\n"
    "Steps: 50, Sampler: LMS, CFG scale: 11, Seed: 3, Size: 512x512, Model hash: 925997e9, "
    'Model: "my \\"best\\", model", Eta: 0.67, Sigma noise: 0.9'
)

UNICODE = (
    "猫 🐱, 桜の木の下で, «quoted»\n"
    "Negative prompt: 醜い\n"
    'Steps: 12, Sampler: Euler, CFG scale: 4.5, Seed: 0, Size: 256x320, Model: "モデル: v2", Version: v1.8.0'
)


def test_hires_lora_ti_infotext():
    fields, unknown = parse_infotext(ANIME_HIRES)
    assert fields["Prompt"] == (
        "masterpiece, best quality, (1girl:1.2), ((red hair)), [smile], looking at viewer, <lora:add_detail:0.6>"
    )
    assert fields["Negative prompt"] == "(worst quality, low quality:1.4), EasyNegative, bad-hands-5"
    assert fields["Steps"] == "28"
    assert fields["Sampler"] == "DPM++ 2M Karras"
    assert fields["CFG scale"] == "7.5"
    assert fields["Seed"] == "2847562301"
    assert (fields["Size-1"], fields["Size-2"]) == ("512", "768")
    assert fields["Model hash"] == "7f96a1a9ca"
    assert fields["Model"] == "AnythingV5_v5PrtRE"
    assert fields["Clip skip"] == "2"
    assert fields["Lora hashes"] == "add_detail: 7c6bad76eb54"
    assert fields["TI hashes"] == "EasyNegative: c74b4e810b03, bad-hands-5: aa7651be154c"
    assert fields["Hires upscaler"] == "R-ESRGAN 4x+ Anime6B"
    assert fields["Version"] == "v1.6.0"
    assert unknown == ["ENSD"]  # the hires keys are honoured (difusi.hires); "Lora hashes" and "TI hashes" describe
    # the files the prompt names (difusi.networks): known, not ignored
    recipe = recipe_from_infotext(ANIME_HIRES)
    assert recipe.values["enable_hr"] == "true" and recipe.values["hr_upscaler"] == "R-ESRGAN 4x+ Anime6B"
    params = recipe.params()
    assert (params.enable_hr, params.hr_scale, params.hr_second_pass_steps, params.denoising_strength) == (
        True, float(fields["Hires upscale"]), int(fields["Hires steps"]), float(fields["Denoising strength"]))


def test_model_name_with_comma_and_colon_is_unquoted():
    fields, unknown = parse_infotext(SDXL_QUOTED_MODEL)
    assert fields["Prompt"] == "a photo of an astronaut riding a horse on mars, 8k, highly detailed"
    assert fields["Negative prompt"] == ""
    assert fields["Model"] == "sd_xl_base_1.0, refined: v2"
    assert fields["Schedule type"] == "Automatic"
    assert fields["Sampler"] == "Euler a"
    assert (fields["Size-1"], fields["Size-2"]) == ("1024", "1024")
    assert unknown == []  # "VAE" sets sd_vae, "VAE hash" describes that file


def test_adetailer_keys_are_reported():
    fields, unknown = parse_infotext(ADETAILER)
    assert fields["Schedule type"] == "Karras"
    assert fields["CFG scale"] == "5.5"
    assert fields["ADetailer inpaint only masked"] == "True"
    assert unknown == [
        "ADetailer model",
        "ADetailer confidence",
        "ADetailer dilate erode",
        "ADetailer mask blur",
        "ADetailer denoising strength",
        "ADetailer inpaint only masked",
        "ADetailer inpaint padding",
        "ADetailer version",
    ]


def test_multiline_prompts_and_variation_seed():
    fields, unknown = parse_infotext(MULTILINE_VARIATION)
    assert fields["Prompt"] == "a castle on a hill\nBREAK\nsunset, dramatic sky"
    assert fields["Negative prompt"] == "lowres,\ntext, watermark"
    assert fields["Variation seed"] == "77"
    assert fields["Variation seed strength"] == "0.25"
    assert (fields["Seed resize from-1"], fields["Seed resize from-2"]) == ("768", "768")
    assert unknown == ["Seed resize from"]


def test_escaped_quotes_and_defaults():
    fields, unknown = parse_infotext(OLD_STYLE_ESCAPES)
    assert fields["Prompt"] == "(((cat))), [dog:cat:10], \\(literal parens\\)"
    assert fields["Model"] == 'my "best", model'
    assert fields["Model hash"] == "925997e9"
    assert fields["Eta"] == "0.67"
    assert fields["Sigma noise"] == "0.9"
    # A1111's defaults for keys it omits when they have their default value.
    assert fields["Clip skip"] == "1"
    assert fields["Schedule type"] == "Automatic"
    assert unknown == []


def test_unicode_and_emoji():
    fields, unknown = parse_infotext(UNICODE)
    assert fields["Prompt"] == "猫 🐱, 桜の木の下で, «quoted»"
    assert fields["Negative prompt"] == "醜い"
    assert fields["Model"] == "モデル: v2"
    assert (fields["Size-1"], fields["Size-2"]) == ("256", "320")
    assert unknown == []


def test_last_line_needs_three_pairs_to_be_settings():
    fields, _ = parse_infotext("a cat\nSteps: 20, Seed: 3")
    assert fields["Prompt"] == "a cat\nSteps: 20, Seed: 3"
    assert "Steps" not in fields and "Seed" not in fields


def test_prompt_only_text():
    fields, unknown = parse_infotext("just a prompt, with a comma")
    assert fields["Prompt"] == "just a prompt, with a comma"
    assert fields["Negative prompt"] == ""
    assert unknown == []


def test_recipe_maps_fields_to_generation_params():
    recipe = recipe_from_infotext(MULTILINE_VARIATION)
    params = recipe.params()
    assert params.prompt == "a castle on a hill\nBREAK\nsunset, dramatic sky"
    assert params.negative_prompt == "lowres,\ntext, watermark"
    assert (params.steps, params.seed, params.width, params.height) == (20, 42, 512, 512)
    assert params.cfg_scale == 7.0
    assert (params.subseed, params.subseed_strength) == (77, 0.25)
    assert params.clip_skip == 1
    assert recipe.model_hash == "cc6cb27103"
    assert recipe.model_name == "v1-5-pruned-emaonly"
    assert recipe.ignored == ["Seed resize from"]


def test_recipe_eta_and_sigma_noise():
    params = recipe_from_infotext(OLD_STYLE_ESCAPES).params()
    assert params.eta == 0.67
    assert params.s_noise == 0.9
    assert params.cfg_scale == 11.0


def test_recipe_overrides_only_named_fields_of_a_base():
    from difusi.params import GenerationParams

    base = GenerationParams(prompt="base", steps=3, batch_size=4)
    params = recipe_from_infotext("x\nSteps: 9, Sampler: Euler, Seed: 5").params(base)
    assert (params.prompt, params.steps, params.seed, params.batch_size) == ("x", 9, 5, 4)


def test_bad_number_in_infotext_names_the_field():
    from difusi.errors import ParamError

    with pytest.raises(ParamError) as info:
        recipe_from_infotext("x\nSteps: twenty, Sampler: Euler, Seed: 5").params()
    assert info.value.field == "steps"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("plain", "plain"),
        ("a, b", '"a, b"'),
        ("k: v", '"k: v"'),
        ("two\nlines", '"two\\nlines"'),
        ('"quoted"', '"\\"quoted\\""'),
        ("ünï", "ünï"),
    ],
)
def test_quote_matches_json_and_unquote_inverts(value, expected):
    assert quote(value) == expected
    assert unquote(quote(value)) == value


def test_legacy_sampler_name_splits_into_sampler_and_schedule():
    recipe = recipe_from_infotext(ANIME_HIRES)
    assert (recipe.values["sampler_name"], recipe.values["scheduler"]) == ("DPM++ 2M", "Karras")
    params = recipe.params()
    assert (params.steps, params.cfg_scale, params.seed) == (28, 7.5, 2847562301)
    assert (params.width, params.height, params.clip_skip) == (512, 768, 2)
    assert params.negative_prompt == "(worst quality, low quality:1.4), EasyNegative, bad-hands-5"


def test_explicit_schedule_wins_over_legacy_name():
    recipe = recipe_from_infotext("x\nSteps: 5, Sampler: DPM++ 2M Karras, Schedule type: Exponential, Seed: 1")
    assert (recipe.values["sampler_name"], recipe.values["scheduler"]) == ("DPM++ 2M", "Exponential")


def test_comfyui_and_alias_sampler_names_become_a1111_names():
    assert recipe_from_infotext("x\nSteps: 5, Sampler: k_euler_a, Seed: 1").values["sampler_name"] == "Euler a"
    assert recipe_from_infotext("x\nSteps: 5, Sampler: dpmpp_2m, Seed: 1").values["sampler_name"] == "DPM++ 2M"


def test_unknown_sampler_is_kept_for_validation_to_report():
    from difusi.errors import ParamError

    recipe = recipe_from_infotext("x\nSteps: 5, Sampler: Magic Sampler 9000, Seed: 1")
    assert recipe.values["sampler_name"] == "Magic Sampler 9000"
    with pytest.raises(ParamError) as info:
        recipe.params().validated(native_size=64)
    assert info.value.field == "sampler_name"
