"""Extra networks work in every picture mode (issue 15): a LoRA tag and an embedding-free prompt through img2img,
inpainting and the hires fix merge the same weights as txt2img, and say so in the infotext."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from difusi.errors import ParamError
from difusi.networks.job import check_job, library_for
from difusi.params import GenerationParams
from difusi.pipeline import img2img, txt2img

LORA = "<lora:difusi-mini-pink:1>"


@pytest.fixture(scope="module")
def picture(mini):
    return txt2img(mini, GenerationParams(prompt="a blue square on a white background", seed=11, steps=6)).images[0].image


def _pixels(result) -> np.ndarray:
    return np.asarray(result.images[0].image, dtype=np.int16)


@pytest.mark.parametrize("mode", ["img2img", "inpaint", "hires"])
def test_a_lora_tag_acts_and_is_recorded_in_every_mode(mini, picture, mode):
    mask = Image.new("L", picture.size)
    ImageDraw.Draw(mask).rectangle((10, 10, 54, 54), fill=255)

    def run(prompt: str):
        fields = {"prompt": prompt, "seed": 4, "steps": 6, "denoising_strength": 0.8}
        if mode == "hires":
            return txt2img(mini, GenerationParams(**fields, enable_hr=True, hr_scale=1.5))
        return img2img(mini, GenerationParams(**fields), [picture], mask if mode == "inpaint" else None)

    plain, with_lora = run("a pink circle"), run(f"a pink circle {LORA}")
    assert 'Lora hashes: "difusi-mini-pink: ' in with_lora.infotexts[0]
    assert "Lora hashes" not in plain.infotexts[0]
    assert np.abs(_pixels(with_lora) - _pixels(plain)).max() > 10  # the merged weights changed the picture
    again = run("a pink circle")  # and were taken out again, bit for bit
    assert np.array_equal(_pixels(again), _pixels(plain))


def test_an_unknown_hires_upscaler_fails_before_any_work():
    with pytest.raises(ParamError) as caught:
        check_job(GenerationParams(prompt="x", enable_hr=True, hr_upscaler="4x-nope"), library_for(None))
    assert caught.value.field == "hr_upscaler" and "Latent (bicubic)" in caught.value.message
    check_job(GenerationParams(prompt="x", enable_hr=True, hr_upscaler="Latent (nearest-exact)"), library_for(None))
    check_job(GenerationParams(prompt="x", enable_hr=False, hr_upscaler="4x-nope"), library_for(None))  # not used
