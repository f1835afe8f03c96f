"""Properties of img2img, inpainting and outpainting on difusi-mini (issue 15, "Prove it"), and bad input.

Every expected region is computed here from A1111's published rules, not read back from difusi: the mask as
A1111's `create_binary_mask` reads it (an RGBA alpha thresholded at 128, any other mask's luminance as it is), its
Gaussian blur (two `cv2.GaussianBlur` calls of `2 * int(2.5 * sigma + 0.5) + 1` taps, OpenCV's bit-exact 8-bit
path and default BORDER_REFLECT_101, written here with scipy's `mirror` convolution and pinned to OpenCV's own
output by `test_mask_blur_is_opencvs_bit_for_bit`), doubled for the "whole picture" overlay. Where that overlay
mask is 0, the result must be the original picture pixel for pixel.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFile
from scipy.ndimage import convolve1d

from difusi.errors import ParamError
from difusi.images.load import MAX_SIDE
from difusi.init_images import encode_batch, prepare_picture
from difusi.params import GenerationParams
from difusi.pipeline import img2img

SEED = 4321


def _params(**changes) -> GenerationParams:
    base = dict(prompt="a red circle on a plain background", negative_prompt="", seed=SEED, sampler_name="Euler",
                steps=4, cfg_scale=5.0, width=64, height=64, denoising_strength=0.75)
    return GenerationParams(**{**base, **changes})


def _picture(width: int = 64, height: int = 64, seed: int = 0) -> Image.Image:
    rng = np.random.RandomState(seed)
    y, x = np.mgrid[0:height, 0:width]
    array = np.stack([x * 255.0 / width, y * 255.0 / height, np.full(x.shape, 90.0)], axis=-1)
    array[height // 5 : height // 2, width // 4 : width // 2] = (30, 200, 60)
    array += rng.normal(0, 10, array.shape)
    return Image.fromarray(np.clip(array, 0, 255).astype(np.uint8))


def _rect_mask(size: tuple[int, int], box: tuple[int, int, int, int]) -> Image.Image:
    mask = Image.new("L", size, 0)
    mask.paste(255, box)
    return mask


def _opencv_kernel(sigma: float) -> np.ndarray:
    """OpenCV's bit-exact 8-bit Gaussian taps (smooth.dispatch.cpp, `getGaussianKernelFixedPoint_ED`): the
    normalised Gaussian times 2^8, rounded with error diffusion from the outermost tap in, the centre tap 256 minus
    the others."""
    size = 2 * int(2.5 * sigma + 0.5) + 1  # A1111's kernel size
    exact = np.exp(-((np.arange(size) - size // 2) ** 2) / (2 * sigma * sigma))
    exact = exact / exact.sum() * 256
    taps, carry = [], 0.0
    for value in exact[: size // 2]:
        taps.append(int(np.rint(value + carry)))
        carry += value - taps[-1]
    return np.array(taps + [256 - 2 * sum(taps)] + taps[::-1], dtype=np.int64)


def _a1111_blur(binary: np.ndarray, sigma_x: float, sigma_y: float) -> np.ndarray:
    """A1111's mask blur: `cv2.GaussianBlur(m, (k, 1), sigma_x)` then `(1, k), sigma_y`, each an 8-bit image from
    OpenCV's fixed-point path (sum + 128 >> 8), BORDER_REFLECT_101 (scipy's "mirror")."""
    out = binary.astype(np.int64)
    for axis, sigma in ((1, sigma_x), (0, sigma_y)):
        if sigma > 0:
            out = np.clip((convolve1d(out, _opencv_kernel(sigma), axis=axis, mode="mirror") + 128) >> 8, 0, 255)
    return out.astype(np.uint8)


def _golden_masks():
    first = Image.new("L", (48, 40), 0)
    ImageDraw.Draw(first).rectangle((10, 8, 30, 25), fill=255)
    second = Image.new("L", (64, 33), 0)
    ImageDraw.Draw(second).ellipse((5, 3, 50, 28), fill=255)
    ImageDraw.Draw(second).rectangle((40, 0, 63, 6), fill=128)
    return first, second


GOLDEN = [
    # (mask, sigma_x, sigma_y, sha256 of cv2.GaussianBlur's two calls' output bytes, a row or column of it)
    (0, 4, 4, "baecdea68d1783c3749d8bb5acfd890de4bb23c7c288462740476aade1d9cc63",
     ("row", 16, [2, 3, 7, 12, 21, 32, 47, 66, 89, 113, 138, 162, 185, 204, 220, 230, 239, 244, 248, 250, 251, 250,
                  248, 244, 239, 230, 220, 204, 185, 162, 138, 113, 89, 66, 47, 32, 21, 12, 7, 3, 1, 0, 0, 0, 0, 0,
                  0, 0])),
    (1, 8, 2, "e5fb78e18ee38c95688507b874396a6c19c731839b80b8a8b34e30467a2e870d",
     ("column", 40, [82, 87, 102, 124, 147, 167, 181, 192, 201, 208, 214, 220, 224, 228, 230, 231, 231, 230, 228,
                     224, 220, 213, 205, 192, 175, 153, 125, 94, 64, 37, 18, 8, 4])),
    (1, 1, 0, "f03fdfe2a3bfc1b92ac20132c65982ffdc65e74a50343aa5d03050cb158fe06e", None),
]
"""Made with opencv-python-headless 5.0.0 (OpenCV's 8-bit Gaussian is bit-exact by design, the same in 4.x),
exactly as A1111's `StableDiffusionProcessingImg2Img.init` calls it."""


@pytest.mark.parametrize("case", GOLDEN, ids=["rect-4-4", "ellipse-grey-8-2", "x-only-1"])
def test_mask_blur_is_opencvs_bit_for_bit(case):
    """The reference blur of these tests, and difusi's, give OpenCV's exact bytes (a float blur rounded once is up
    to 2 levels off and moves the edge of the area kept exactly)."""
    import hashlib

    from difusi.images.masks import gaussian_blur

    index, sigma_x, sigma_y, digest, line = case
    mask = _golden_masks()[index]
    ours = np.asarray(gaussian_blur(mask, sigma_x, sigma_y))
    reference = _a1111_blur(np.asarray(mask), sigma_x, sigma_y)
    assert hashlib.sha256(reference.tobytes()).hexdigest() == digest
    assert np.array_equal(ours, reference)
    if line is not None:
        kind, at, values = line
        assert (reference[at] if kind == "row" else reference[:, at]).tolist() == values


def _blurred(mask: Image.Image, blur: int, invert: bool = False) -> np.ndarray:
    """A1111's blurred mask for an L mask (read as it is: `create_binary_mask` thresholds only an RGBA alpha)."""
    binary = np.asarray(mask.convert("L")).astype(np.int64)
    if invert:
        binary = 255 - binary
    return _a1111_blur(binary, blur, blur)


def _kept_region(mask: Image.Image, blur: int, invert: bool = False) -> np.ndarray:
    """Where A1111's overlay mask is 0 (both inpaint areas: doubling keeps zeros at zero)."""
    return _blurred(mask, blur, invert) == 0


def _array(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


# ----------------------------------------------------------------------------- outside the mask: the original


@pytest.mark.parametrize(
    ("size", "box", "changes"),
    [
        ((64, 64), (20, 16, 44, 40), {}),  # whole picture
        ((96, 96), (28, 30, 52, 54), {"inpaint_full_res": True, "inpaint_full_res_padding": 8}),  # only masked
    ],
    ids=["whole-picture", "only-masked"],
)
def test_outside_the_blurred_mask_is_the_original_exactly(mini, size, box, changes):
    picture = _picture(*size)
    mask = _rect_mask(size, box)
    out = img2img(mini, _params(mask_blur=4, **changes), [picture], mask).images[0].image
    assert out.size == size
    kept = _kept_region(mask, 4)
    assert 0.2 < kept.mean() < 0.9  # a real border: the blur reaches 10 px beyond the box
    original, result = _array(picture), _array(out)
    assert np.array_equal(result[kept], original[kept])
    # ... and the region is tight: on the rim where the blurred mask is 1 the result already blends in the
    # redrawn picture (an overlay from an unblurred or wrongly blurred mask would keep more).
    rim = _blurred(mask, 4) == 1
    assert rim.sum() > 100 and (np.abs(result - original).max(-1)[rim] > 0).mean() > 0.8
    inside = np.zeros(kept.shape, bool)
    inside[box[1] : box[3], box[0] : box[2]] = True
    assert np.abs(result[inside] - original[inside]).max() > 20  # the masked box was redrawn
    if changes:
        # "Only masked" crops the blurred mask's box + padding: far from the mask (outside the crop) nothing moved,
        # and just outside the kept region the paste-back blends, so some pixels there differ.
        assert not np.array_equal(result[~kept], original[~kept])


def test_inpainting_mask_invert_swaps_the_areas(mini):
    picture = _picture(seed=2)
    box = (8, 8, 56, 56)
    mask = _rect_mask((64, 64), box)
    out = _array(img2img(mini, _params(mask_blur=2, inpainting_mask_invert=1), [picture], mask).images[0].image)
    original = _array(picture)
    kept = _kept_region(mask, 2, invert=True)  # the inside of the box, away from its edge
    assert kept[20:44, 20:44].all() and not kept[:4].any()
    assert np.array_equal(out[kept], original[kept])
    assert np.abs(out[:6] - original[:6]).max() > 20  # the outside (unmasked in the upload) was redrawn
    # Not inverted, the same mask keeps the outside instead.
    normal = _array(img2img(mini, _params(mask_blur=2), [picture], mask).images[0].image)
    kept_normal = _kept_region(mask, 2)
    assert np.array_equal(normal[kept_normal], original[kept_normal])
    assert np.abs(normal[24:40, 24:40] - original[24:40, 24:40]).max() > 20


def test_rgba_alpha_is_the_mask_for_a_single_picture(mini):
    """A1111's upload convention: transparent pixels are redrawn; the visible ones outside the blur are kept."""
    picture = _picture(seed=6)
    alpha = Image.new("L", (64, 64), 255)
    alpha.paste(0, (16, 16, 40, 40))
    rgba = picture.copy()
    rgba.putalpha(alpha)
    out = _array(img2img(mini, _params(mask_blur=3, steps=3), [rgba]).images[0].image)
    kept = _kept_region(_rect_mask((64, 64), (16, 16, 40, 40)), 3)
    # Transparent pixels are flattened onto white before anything else (A1111), so compare with that.
    flattened = Image.new("RGBA", (64, 64), "white")
    flattened.alpha_composite(rgba)
    assert np.array_equal(out[kept], _array(flattened)[kept])
    assert np.abs(out[20:36, 20:36] - 255).max() > 20


def test_masks_are_read_as_a1111_reads_them():
    """`create_binary_mask`: an RGBA mask with transparency is its alpha, thresholded at x > 128; any other mask is
    its luminance unchanged (an uploaded grey mask stays soft)."""
    from difusi.images.masks import binary_mask

    grey = _rect_mask((16, 16), (4, 4, 12, 12)).point(lambda v: 100 if v else 0)
    assert np.array_equal(np.asarray(binary_mask(grey)), np.asarray(grey))
    rgba = Image.new("RGBA", (3, 1))
    rgba.putdata([(0, 0, 0, 128), (0, 0, 0, 129), (255, 255, 255, 0)])
    assert list(binary_mask(rgba).getdata()) == [0, 255, 0]
    opaque = Image.new("RGBA", (2, 1), (200, 200, 200, 255))
    assert list(binary_mask(opaque).getdata()) == [200, 200]


def test_a_soft_mask_blends_and_keeps_the_outside(mini):
    """A grey (100) uploaded mask: A1111 keeps it soft, so it is no all-black mask; the latent mask rounds to 0
    (nothing redrawn) while the doubled overlay (200) lets the VAE's round trip show through inside the box."""
    picture = _picture(seed=11)
    mask = _rect_mask((64, 64), (16, 16, 48, 48)).point(lambda v: 100 if v else 0)
    out = _array(img2img(mini, _params(mask_blur=2, steps=3), [picture], mask).images[0].image)
    original = _array(picture)
    kept = _blurred(mask, 2) == 0
    assert np.array_equal(out[kept], original[kept])
    assert not np.array_equal(out[24:40, 24:40], original[24:40, 24:40])


# ----------------------------------------------------------------------------- strength 0, batches, cycling


def test_strength_zero_is_the_picture_through_the_vae(mini):
    picture = _picture(seed=1)
    result = img2img(mini, _params(denoising_strength=0.0), [picture]).images[0].image
    x = torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255.0).permute(2, 0, 1)[None] * 2 - 1
    with torch.inference_mode():
        latents = mini.vae.encode(x).latent_dist.mean * mini.scaling_factor
        decoded = mini.vae.decode(latents / mini.scaling_factor).sample
    expected = np.round((decoded / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    assert np.array_equal(np.asarray(result), expected)
    assert not np.array_equal(np.asarray(result), np.asarray(picture))  # the VAE is not the identity


def _assert_same_but_for_batched_rounding(batched: Image.Image, alone: Image.Image, what: str) -> None:
    """Image i of a batch vs its seed alone. Not bit-identical on the CPU: batched convolutions round differently
    (measured on difusi-mini: VAE encode 3e-6, UNet 2e-6, VAE decode 2e-5 apart in float32), which moves a
    handful of pixels (2-5 of 12288 values) by one 8-bit level. The bound: at most 1 level, on < 0.5 % of values."""
    difference = np.abs(_array(batched) - _array(alone))
    assert difference.max() <= 1, f"{what}: {difference.max()} levels"
    assert (difference > 0).mean() < 0.005, f"{what}: {(difference > 0).sum()} values differ"


def test_image_i_of_a_batch_equals_its_seed_alone(mini):
    picture = _picture(seed=3)
    params = _params(denoising_strength=0.5)
    batch = img2img(mini, params.replace(batch_size=3), [picture])
    assert batch.seeds == [SEED, SEED + 1, SEED + 2]
    for index, generated in enumerate(batch.images):
        alone = img2img(mini, params.replace(seed=SEED + index), [picture]).images[0].image
        _assert_same_but_for_batched_rounding(generated.image, alone, f"image {index}")
    assert not np.array_equal(np.asarray(batch.images[0].image), np.asarray(batch.images[1].image))


def test_several_init_pictures_are_cycled(mini):
    """Image i starts from picture i % n (A1111): 3 images from 2 pictures use pictures 0, 1, 0."""
    first, second = _picture(seed=3), _picture(seed=9).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    params = _params(denoising_strength=0.5)
    batch = img2img(mini, params.replace(batch_size=3), [first, second]).images
    for index, picture in enumerate([first, second, first]):
        alone = img2img(mini, params.replace(seed=SEED + index), [picture]).images[0].image
        _assert_same_but_for_batched_rounding(batch[index].image, alone, f"image {index}")
    wrong = img2img(mini, params.replace(seed=SEED + 1), [first]).images[0].image
    assert np.abs(_array(batch[1].image) - _array(wrong)).max() > 20


# ----------------------------------------------------------------------------- masked content (fill modes)


def test_fill_modes_change_only_the_masked_latents(mini):
    """Latent noise (2) puts the seed's unit noise, latent nothing (3) zeros, into the redrawn latents; the kept
    latents are the filled picture's, as for "fill" (0). The latent mask is A1111's: the blurred mask resized
    (bicubic) to the latent size, rounded."""
    picture, mask = _picture(seed=5), _rect_mask((64, 64), (12, 20, 40, 52))
    blurred = Image.fromarray(_blurred(mask, 4))
    h = w = 64 // mini.vae_scale_factor
    hole = torch.from_numpy(np.around(np.asarray(blurred.resize((w, h)), dtype=np.float32) / 255.0))
    assert 0 < float(hole.mean()) < 0.6
    noise = torch.randn((1, mini.latent_channels, h, w), generator=torch.Generator().manual_seed(SEED))

    def latents(fill):
        params = _params(inpainting_fill=fill, mask_blur=4).validated()
        prepared = prepare_picture(params, picture, mask)
        return prepared, encode_batch(mini, params, [prepared], noise, torch.device("cpu"))

    _, original = latents(1)
    _, filled_pixels = latents(0)
    keep = hole == 0
    assert torch.equal(original.keep[0, 0], 1.0 - hole)
    for fill, expected_hole in ((2, noise[0]), (3, torch.zeros_like(noise[0]))):
        _, filled = latents(fill)
        # A1111 fills the picture for every mode but "original" (`if self.inpainting_fill != 1: masking.fill`), so
        # the kept latents are those of the filled picture: near the hole they differ from "original"'s.
        assert torch.equal(filled.latents[0][:, keep], filled_pixels.latents[0][:, keep])
        assert not torch.equal(filled.latents[0][:, keep], original.latents[0][:, keep])
        assert torch.equal(filled.latents[0][:, ~keep], expected_hole[:, ~keep])
    # Fill (0) works on the pixels: the masked area takes the colours around it, the rest is untouched.
    prepared, _ = latents(0)
    outside = np.asarray(blurred) == 0
    assert np.array_equal(_array(prepared.pixels)[outside], _array(picture)[outside])
    assert np.abs(_array(prepared.pixels)[30:44, 18:34] - _array(picture)[30:44, 18:34]).max() > 10


# ----------------------------------------------------------------------------- outpainting


def test_outpainting_canvas_geometry_is_a1111s():
    """Poor man's outpainting: the canvas grows to a multiple of 64, the growth split between the chosen sides in
    proportion (100x90 + 20 left and up: 128x128, the picture at (28, 38))."""
    from difusi.images.outpaint import outpaint_canvas

    canvas = outpaint_canvas(_picture(100, 90), 20, ("left", "up"), 4)
    assert canvas.image.size == (128, 128)
    assert canvas.box == (28, 38, 128, 128)
    assert np.array_equal(_array(canvas.image)[38:, 28:], _array(_picture(100, 90)))


def test_outpainting_keeps_the_old_picture_away_from_the_seam(mini):
    picture = _picture(96, 96, seed=7)
    params = _params(width=None, height=None, outpaint_pixels=16, mask_blur=4, inpainting_fill=0,
                     denoising_strength=0.8, steps=3)
    out = img2img(mini, params, [picture]).images[0].image
    assert out.size == (128, 128)  # 96 + 2 * 16 rounded up to 64
    # A1111's script mask: white, black inside the old picture inset by 2 * mask_blur (ImageDraw's inclusive box),
    # blurred with 2 * mask_blur for the job.
    mask = Image.new("L", (128, 128), "white")
    ImageDraw.Draw(mask).rectangle((16 + 8, 16 + 8, 128 - 16 - 8, 128 - 16 - 8), fill="black")
    kept = _kept_region(mask, 8)
    assert kept[60:68, 60:68].all() and not kept[:16].any()
    canvas = np.zeros((128, 128, 3), np.int16)
    canvas[16:112, 16:112] = _array(picture)
    result = _array(out)
    assert np.array_equal(result[kept], canvas[kept])
    assert result[:8].mean() > 20  # the new band was painted, not left black


# ----------------------------------------------------------------------------- bad input


def _png(width: int, height: int, mode: str = "1") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (width, height)).save(buffer, "PNG")
    return buffer.getvalue()


def _declared(png: bytes, width: int, height: int) -> bytes:
    """A PNG whose IHDR declares another size (CRC fixed): a decompression bomb's header on a tiny file."""
    assert png[12:16] == b"IHDR"
    body = b"IHDR" + struct.pack(">II", width, height) + png[24:29]
    return png[:8] + png[8:12] + body + struct.pack(">I", zlib.crc32(body)) + png[33:]


@pytest.fixture()
def no_decoding(monkeypatch):
    """Fail if any picture's pixels are decoded: refusals must come from the header."""

    def refuse(self, *args, **kwargs):
        raise AssertionError(f"pixels of a {self.size} picture were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


def test_not_an_image_is_refused(mini):
    with pytest.raises(ParamError) as error:
        img2img(mini, _params(), [b"this is plain text, not a picture"])
    assert error.value.field == "init_images"


@pytest.mark.parametrize(("width", "height"), [(30000, 30000), (16000, 16000), (17000, 64), (5000, 4000)],
                         ids=["pil-bomb", "pil-bomb-2", "over-max-side", "over-budget"])
def test_a_huge_or_bomb_picture_is_refused_from_its_header(mini, no_decoding, monkeypatch, width, height):
    monkeypatch.setenv("DIFUSI_MAX_PIXELS", str(2048 * 2048))  # the default budget, whatever the machine sets
    bomb = _declared(_png(8, 8), width, height)
    assert len(bomb) < 200
    with pytest.raises(ParamError) as error:
        img2img(mini, _params(), [bomb])
    assert error.value.field == "init_images"
    # PIL's own guard fires first for more than 2 x its MAX_IMAGE_PIXELS; below that difusi's header check does.
    expected = "too large to decode" if width * height > 2 * Image.MAX_IMAGE_PIXELS else f"is {width}x{height} ="
    assert expected in error.value.message


def test_a_real_picture_over_the_pixel_budget_is_refused(mini, monkeypatch):
    """A genuine 1-bit 5000x4000 PNG (20 M pixels, over 4 x the 2048^2 budget) as bytes and as a PIL image."""
    monkeypatch.setenv("DIFUSI_MAX_PIXELS", str(2048 * 2048))
    png = _png(5000, 4000)
    for source in (png, Image.open(io.BytesIO(png))):
        with pytest.raises(ParamError) as error:
            img2img(mini, _params(), [source])
        assert error.value.field == "init_images"
        assert "20000000 pixels" in error.value.message
    assert max(5000, 4000) < MAX_SIDE  # refused for its pixel count, not its side


def test_a_mask_of_another_size_is_refused(mini):
    with pytest.raises(ParamError) as error:
        img2img(mini, _params(), [_picture()], _rect_mask((64, 48), (4, 4, 20, 20)))
    assert error.value.field == "mask"


def test_an_all_black_mask_is_refused(mini):
    with pytest.raises(ParamError) as error:
        img2img(mini, _params(), [_picture()], Image.new("L", (64, 64), 0))
    assert error.value.field == "mask"


def test_an_unreadable_mask_is_refused(mini):
    with pytest.raises(ParamError) as error:
        img2img(mini, _params(), [_picture()], b"GIF89a but not really")
    assert error.value.field == "mask"


@pytest.mark.parametrize("strength", [-0.01, 1.01, float("nan")])
def test_strength_outside_0_1_is_refused(mini, strength):
    with pytest.raises(ParamError) as error:
        img2img(mini, _params(denoising_strength=strength), [_picture()])
    assert error.value.field == "denoising_strength"
