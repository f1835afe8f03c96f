"""img2img and inpainting on every family difusi runs (tiny random checkpoints): SD2 v-prediction, SDXL (its size
conditioning follows the init picture) and 9-channel inpainting UNets of SD1 and SDXL. Outside the blurred mask the
result is the original exactly, whatever the family."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from difusi.models import load_model
from difusi.models.synthetic import write_tiny_checkpoint
from difusi.params import GenerationParams
from difusi.pipeline import img2img, txt2img


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    made = {}
    for name, family, inpainting in (("sd2-v", "sd2-v", False), ("sdxl", "sdxl", False),
                                     ("sd1-inpaint", "sd1", True), ("sdxl-inpaint", "sdxl", True)):
        made[name] = load_model(write_tiny_checkpoint(root / f"{name}.safetensors", family, inpainting=inpainting).path)
    return made


def _picture() -> Image.Image:
    picture = Image.new("RGB", (64, 64), (30, 60, 200))
    ImageDraw.Draw(picture).ellipse((12, 12, 40, 40), fill=(220, 30, 30))
    return picture


@pytest.mark.parametrize("name", ["sd2-v", "sdxl", "sd1-inpaint", "sdxl-inpaint"])
def test_inpainting_keeps_the_outside_exactly(models, name):
    model = models[name]
    assert model.inpainting == name.endswith("inpaint")
    picture = _picture()
    mask = Image.new("L", picture.size)
    ImageDraw.Draw(mask).rectangle((32, 32, 63, 63), fill=255)
    params = GenerationParams(prompt="a cat", seed=1, steps=3, width=64, height=64, mask_blur=0, cfg_scale=5.0)
    result = img2img(model, params, [picture], mask)
    out = np.asarray(result.images[0].image)
    original = np.asarray(picture)
    assert np.array_equal(out[:32], original[:32]) and np.array_equal(out[:, :32], original[:, :32])
    assert np.abs(out[40:, 40:].astype(int) - original[40:, 40:]).mean() > 1  # the masked corner was redrawn


@pytest.mark.parametrize("name", ["sd1-inpaint", "sdxl-inpaint"])
def test_txt2img_on_an_inpainting_checkpoint(models, name):
    result = txt2img(models[name], GenerationParams(prompt="a cat", seed=2, steps=2, width=64, height=64))
    assert result.images[0].image.size == (64, 64)
    assert np.asarray(result.images[0].image).std() > 0


def test_sdxl_size_conditioning_follows_the_init_picture(models, monkeypatch):
    import difusi.pipeline as pipeline

    seen = []
    real = pipeline.sdxl_time_ids

    def spy(original, crop, target):
        seen.append((tuple(original), tuple(target)))
        return real(original, crop, target)

    monkeypatch.setattr(pipeline, "sdxl_time_ids", spy)
    picture = _picture().resize((96, 80))
    img2img(models["sdxl"], GenerationParams(prompt="x", seed=3, steps=2, width=64, height=64), [picture])
    assert seen == [((80, 96), (64, 64))]
    seen.clear()
    txt2img(models["sdxl"], GenerationParams(prompt="x", seed=3, steps=2, width=64, height=64))
    assert seen == [((64, 64), (64, 64))]


def test_v_prediction_img2img_at_low_strength_stays_near_the_picture(models):
    picture = _picture()
    low = img2img(models["sd2-v"], GenerationParams(prompt="x", seed=5, steps=10, denoising_strength=0.05,
                                                    width=64, height=64), [picture])
    high = img2img(models["sd2-v"], GenerationParams(prompt="x", seed=5, steps=10, denoising_strength=1.0,
                                                     width=64, height=64), [picture])
    through_vae = img2img(models["sd2-v"], GenerationParams(prompt="x", seed=5, steps=10, denoising_strength=0.0,
                                                            width=64, height=64), [picture])
    base = np.asarray(through_vae.images[0].image, dtype=float)
    assert np.abs(np.asarray(low.images[0].image) - base).mean() < np.abs(np.asarray(high.images[0].image) - base).mean()
    assert torch.isfinite(torch.tensor(np.asarray(high.images[0].image), dtype=torch.float32)).all()


def test_outpainting_takes_one_picture_and_makes_its_own_mask(models):
    from difusi.errors import ParamError

    picture = _picture()
    params = GenerationParams(prompt="x", seed=1, steps=2, width=64, height=64, outpaint_pixels=16)
    for pictures, mask in (([picture, picture], None), ([picture], Image.new("L", picture.size, 255))):
        with pytest.raises(ParamError) as caught:
            img2img(models["sd2-v"], params, pictures, mask)
        assert caught.value.field == "outpaint_pixels"
    transparent = picture.convert("RGBA")
    transparent.putalpha(Image.new("L", picture.size, 0).point(lambda _: 128))  # a half-transparent picture
    result = img2img(models["sd2-v"], params, [transparent])  # its alpha is no mask when outpainting
    assert result.images[0].image.size == (128, 128)
