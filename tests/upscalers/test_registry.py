"""The upscaler list and A1111's `Upscaler.upscale` semantics."""

from __future__ import annotations

import pytest
from PIL import Image

from difusi.budget import Budget, set_budget
from difusi.errors import ParamError
from difusi.upscalers import LATENT_UPSCALE_MODES, destination_size, get_upscaler, list_upscalers


def _gradient(width: int, height: int) -> Image.Image:
    image = Image.linear_gradient("L").resize((width, height)).convert("RGB")
    return image


def test_list_is_a1111s_order_and_skips_files_that_are_no_upscaler(models):
    infos = list_upscalers(models)
    assert [info.name for info in infos] == ["None", "Lanczos", "Nearest", "4x_old", "compact-x4",
                                             "RealESRGAN_x2plus", "RealESRGAN_x4plus"]
    by_name = {info.name: info for info in infos}
    assert by_name["RealESRGAN_x2plus"].scale == 2 and by_name["4x_old"].scale == 4
    item = by_name["compact-x4"].to_a1111()
    assert set(item) == {"name", "model_name", "model_path", "model_url", "scale"}
    assert item["model_path"].endswith("compact-x4.safetensors") and "SRVGGNetCompact" in item["model_name"]


def test_latent_modes_are_a1111s():
    assert LATENT_UPSCALE_MODES == {
        "Latent": ("bilinear", False), "Latent (antialiased)": ("bilinear", True),
        "Latent (bicubic)": ("bicubic", False), "Latent (bicubic antialiased)": ("bicubic", True),
        "Latent (nearest)": ("nearest", False), "Latent (nearest-exact)": ("nearest-exact", False)}


@pytest.mark.parametrize(("size", "scale", "dest"), [((100, 75), 2, (200, 144)), ((64, 64), 1.5, (96, 96)),
                                                     ((513, 300), 0.5, (256, 144))])
def test_destination_is_rounded_down_to_multiples_of_8(size, scale, dest):
    assert destination_size(*size, scale) == dest
    image = get_upscaler("Lanczos").upscale(_gradient(*size), scale)
    assert image.size == dest


def test_model_runs_until_the_size_is_reached_then_lanczos(models):
    # x2 model, factor 3: two passes (40 -> 80 -> 160 px), then Lanczos down to int(40 * 3) // 8 * 8 = 120.
    upscaler = get_upscaler("RealESRGAN_x2plus", models)
    calls = []
    original = upscaler.do_upscale

    def counting(image, scale):
        calls.append(image.size)
        return original(image, scale)

    upscaler.do_upscale = counting
    out = upscaler.upscale(_gradient(40, 32), 3)
    assert calls == [(40, 32), (80, 64)] and out.size == (120, 96)


def test_nearest_matches_pil_and_none_only_resizes():
    image = _gradient(32, 24)
    assert get_upscaler("Nearest").upscale(image, 2).tobytes() == \
        image.resize((64, 48), Image.Resampling.NEAREST).tobytes()
    assert get_upscaler("None").upscale(image, 2).tobytes() == \
        image.resize((64, 48), Image.Resampling.LANCZOS).tobytes()


def test_unknown_name_lists_the_choices(models):
    with pytest.raises(ParamError) as caught:
        get_upscaler("R-ESRGAN 4x+", models)
    assert caught.value.field == "hr_upscaler"
    assert "choose one of: None, Lanczos, Nearest, 4x_old" in caught.value.message
    with pytest.raises(ParamError) as caught:
        get_upscaler("nope", models, field="upscaler_1")
    assert caught.value.field == "upscaler_1"


def test_a_misfiled_lora_is_named_as_no_upscaler(models):
    with pytest.raises(ParamError, match="not-an-upscaler.safetensors is not an upscaler model: .*LoRA"):
        get_upscaler("not-an-upscaler", models)


@pytest.mark.parametrize("scale", [0, -1, 8.5, float("nan"), True, "2"])
def test_scale_out_of_range_is_refused(scale):
    with pytest.raises(ParamError) as caught:
        get_upscaler("Lanczos").upscale(_gradient(16, 16), scale, field="upscaling_resize")
    assert caught.value.field == "upscaling_resize"


def test_result_over_the_pixel_budget_is_refused_before_work():
    set_budget(Budget(max_pixels=128 * 128, max_batch_pixels=128 * 128))
    try:
        with pytest.raises(ParamError, match="over the budget"):
            get_upscaler("Lanczos").upscale(_gradient(100, 100), 2)
    finally:
        set_budget(None)
