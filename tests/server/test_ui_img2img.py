"""The web UI's img2img / inpaint / Extras tabs and the hires-fix panel, end to end (issue 15, item 6).

Playwright drives Debian's chromium (headless) against the real loopback server; the mask tests read the mask the
server received from the request itself and decode it with PIL.
"""

from __future__ import annotations

import base64
import io
import math
from pathlib import Path

from PIL import Image
from test_browser import TIMEOUT_MS, browser, page, pytestmark, shot  # noqa: F401  (shared fixtures and skip marks)

NATURAL = "sel => { const img = document.querySelector(sel); return img && img.complete ? [img.naturalWidth, img.naturalHeight] : null; }"


def write_png(path: Path, size: tuple[int, int], colour=(40, 120, 200)) -> Path:
    picture = Image.new("RGB", size, colour)
    picture.paste((230, 230, 40), (size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2))
    picture.save(path)
    return path


def decode(data: str) -> Image.Image:
    if data.startswith("data:"):
        data = data.split(",", 1)[1]
    return Image.open(io.BytesIO(base64.b64decode(data)))


def natural_size(page, selector: str) -> list[int]:  # noqa: F811  (the page fixture's object)
    page.wait_for_function(f"({NATURAL})({selector!r}) !== null && ({NATURAL})({selector!r})[0] > 0")
    return page.evaluate(f"({NATURAL})({selector!r})")


def open_img2img(page, picture: Path) -> None:  # noqa: F811  (the page fixture's object)
    page.click("#tab-img2img")
    page.set_input_files("#i2i-file", str(picture))
    page.wait_for_selector("#i2i-picture:not([hidden])")
    page.fill("#i2i-steps", "1")
    page.fill("#i2i-prompt", "a red circle")
    page.fill("#i2i-seed", "11")


def stroke(page, points: list[tuple[float, float]], size: tuple[int, int]) -> None:  # noqa: F811  (the page fixture's object)
    """Drag the mouse over the mask canvas through `points`, given in picture pixels."""
    box = page.locator("#i2i-mask").bounding_box()

    def screen(x: float, y: float) -> tuple[float, float]:
        return box["x"] + x * box["width"] / size[0], box["y"] + y * box["height"] / size[1]

    page.mouse.move(*screen(*points[0]))
    page.mouse.down()
    for point in points[1:]:
        page.mouse.move(*screen(*point), steps=8)
    page.mouse.up()


def submit_img2img(page, wait_done: bool = True) -> dict:  # noqa: F811  (the page fixture's object)
    with page.expect_request(lambda r: r.url.endswith("/difusi/v1/img2img") and r.method == "POST") as sent:
        page.click("#i2i-generate")
    body = sent.value.post_data_json
    if wait_done:
        page.wait_for_function("document.querySelector('#progress-text').textContent === 'Done'")
    return body


def white(mask: Image.Image, x: int, y: int) -> bool:
    return mask.getpixel((x, y)) == (255, 255, 255)


def black(mask: Image.Image, x: int, y: int) -> bool:
    return mask.getpixel((x, y)) == (0, 0, 0)


def test_mask_brush_sends_the_painted_mask_at_the_pictures_size(page, tmp_path):  # noqa: F811
    size = (96, 64)  # not square and shown scaled: the mouse is mapped to picture pixels
    open_img2img(page, write_png(tmp_path / "init.png", size))
    assert natural_size(page, "#i2i-image") == list(size)
    assert page.evaluate("[document.querySelector('#i2i-mask').width, document.querySelector('#i2i-mask').height]") == list(size)
    shown = page.locator("#i2i-mask").bounding_box()
    assert shown["width"] > 2 * size[0]  # really displayed scaled

    page.fill("#brush-size", "6")
    stroke(page, [(16, 32), (80, 32)], size)  # a horizontal stroke along y = 32 from x = 16 to 80
    assert "inpaint" in page.text_content("#mask-state")
    body = submit_img2img(page)
    assert body["init_images"] and decode(body["init_images"][0]).size == size
    mask = decode(body["mask"]).convert("RGBA")
    assert mask.size == size and mask.getextrema()[3] == (255, 255)  # opaque
    mask = mask.convert("RGB")
    assert set(mask.tobytes()) <= {0, 255}
    for x in range(16, 81, 4):  # on the path, and within the brush's radius of it
        assert white(mask, x, 32) and white(mask, x, 30) and white(mask, x, 34), x
    for x, y in [(5, 32), (90, 32), (48, 20), (48, 44), (0, 0), (95, 63), (48, 5)]:  # away from it
        assert black(mask, x, y), (x, y)
    assert body["prompt"] == "a red circle" and body["steps"] == 1 and body["seed"] == 11
    assert body["denoising_strength"] == 0.75 and body["inpainting_fill"] == 1 and body["mask_blur"] == 4
    assert body["outpaint_pixels"] == 0 and body["outpaint_directions"] == "left,right,up,down"
    assert "enable_hr" not in body and "hr_scale" not in body  # txt2img-only fields stay on their tab
    page.wait_for_selector("#main-image", state="visible")
    assert natural_size(page, "#main-image") == list(size)
    assert "Denoising strength: 0.75" in page.text_content("#infotext")
    shot(page, "img2img-mask")

    # The eraser removes the middle of the stroke; the ends stay.
    page.click("#mask-eraser")
    page.fill("#brush-size", "16")
    stroke(page, [(48, 20), (48, 44)], size)
    mask = decode(submit_img2img(page)["mask"]).convert("RGB")
    assert all(black(mask, x, 32) for x in range(42, 55, 2))
    assert white(mask, 20, 32) and white(mask, 76, 32) and black(mask, 5, 32)

    # Invert swaps painted and unpainted.
    page.click("#mask-invert")
    mask = decode(submit_img2img(page, wait_done=False)["mask"]).convert("RGB")
    assert black(mask, 20, 32) and black(mask, 76, 32) and white(mask, 48, 32) and white(mask, 5, 5)
    page.wait_for_function("document.querySelector('#progress-text').textContent === 'Done'")

    # Clear: no mask at all, plain img2img.
    page.click("#mask-clear")
    assert page.text_content("#mask-state").startswith("No mask")
    body = submit_img2img(page)
    assert "mask" not in body and len(body["init_images"]) == 1
    page.wait_for_selector("#main-image", state="visible")


def test_dropped_picture_becomes_the_init_picture_and_outpaint_directions_are_checkboxes(page, tmp_path):  # noqa: F811
    picture = write_png(tmp_path / "drop.png", (64, 72))
    page.click("#tab-img2img")
    page.evaluate(
        """b64 => {
            const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
            const data = new DataTransfer();
            data.items.add(new File([bytes], "drop.png", {type: "image/png"}));
            document.querySelector('#i2i-stage').dispatchEvent(new DragEvent("drop", {dataTransfer: data, bubbles: true, cancelable: true}));
        }""",
        base64.b64encode(picture.read_bytes()).decode(),
    )
    assert natural_size(page, "#i2i-image") == [64, 72]
    assert page.is_hidden("#pnginfo")  # not taken for a PNG-info drop
    page.fill("#i2i-steps", "1")
    page.click("#i2i-group-outpaint summary")
    page.fill("#i2i-outpaint_pixels", "16")
    page.uncheck("#i2i-outpaint_directions-up")
    page.uncheck("#i2i-outpaint_directions-down")
    body = submit_img2img(page)
    assert body["outpaint_pixels"] == 16 and body["outpaint_directions"] == "left,right" and "mask" not in body
    page.wait_for_selector("#main-image", state="visible")
    # 16 px more on the left and on the right, rounded up to 64 px as A1111's poor man's outpainting does
    assert natural_size(page, "#main-image") == [math.ceil((64 + 2 * 16) / 64) * 64, math.ceil(72 / 64) * 64]


def test_server_error_is_shown_next_to_the_img2img_field(page, tmp_path):  # noqa: F811
    open_img2img(page, write_png(tmp_path / "init.png", (64, 64)))
    page.fill("#i2i-steps", "0")
    page.click("#i2i-generate")
    page.wait_for_selector("#i2i-error:not([hidden])")
    assert "steps" in page.text_content("#i2i-error")
    assert "invalid" in page.get_attribute("#i2i-steps", "class")


def test_hires_fix_panel_sends_the_hr_fields_and_makes_the_hires_size(page):  # noqa: F811
    assert page.is_hidden("#hr_scale")  # the hires fields show only while Hires. fix is on
    page.click("#t2i-group-hires summary")
    assert page.is_hidden("#hr_scale")
    page.check("#enable_hr")
    assert page.is_visible("#hr_scale") and page.is_visible("#denoising_strength")
    upscalers = page.eval_on_selector_all("#hr_upscaler option", "os => os.map(o => o.value)")
    assert upscalers[0] == "Latent" and {"Lanczos", "Nearest", "None"} <= set(upscalers)
    assert upscalers.index("Latent (nearest-exact)") < upscalers.index("None")  # latent modes first, as A1111
    page.fill("#hr_scale", "2")
    page.fill("#hr_second_pass_steps", "1")
    page.fill("#steps", "1")
    page.fill("#width", "64")
    page.fill("#height", "64")
    page.fill("#seed", "5")
    page.fill("#prompt", "hires test")
    with page.expect_request(lambda r: r.url.endswith("/difusi/v1/jobs") and r.method == "POST") as sent:
        page.click("#generate")
    body = sent.value.post_data_json
    assert body["enable_hr"] is True and body["hr_scale"] == 2 and body["hr_second_pass_steps"] == 1
    assert body["hr_upscaler"] == "Latent" and body["denoising_strength"] == 0.75
    assert "hr_sampler_name" not in body  # "Same as first pass"
    page.wait_for_function("document.querySelector('#infotext').textContent.includes('Hires upscale: 2')")
    assert natural_size(page, "#main-image") == [128, 128]
    shot(page, "hires")


def test_send_to_img2img_and_inpaint_from_a_txt2img_result(page):  # noqa: F811
    page.fill("#prompt", "send me over")
    page.fill("#negative_prompt", "dull")
    for name, value in {"steps": "1", "width": "72", "height": "64", "seed": "321"}.items():
        page.fill(f"#{name}", value)
    page.click("#generate")
    page.wait_for_function("document.querySelector('#infotext').textContent.includes('Seed: 321,')")
    assert natural_size(page, "#main-image") == [72, 64]
    page.click("#send-img2img")
    page.wait_for_selector("#img2img:not([hidden])")
    assert natural_size(page, "#i2i-image") == [72, 64]
    assert page.input_value("#i2i-prompt") == "send me over" and page.input_value("#i2i-negative_prompt") == "dull"
    assert page.input_value("#i2i-seed") == "321"
    page.click("#tab-txt2img")
    page.click("#send-inpaint")
    page.wait_for_selector("#img2img:not([hidden])")
    assert page.get_attribute("#mask-brush", "aria-pressed") == "true"
    assert page.evaluate("document.activeElement.id") == "i2i-mask"
    assert page.evaluate("[document.querySelector('#i2i-mask').width, document.querySelector('#i2i-mask').height]") == [72, 64]
    # And from the history: the card's buttons send its picture.
    card = page.locator(".card", has_text="send me over").first
    card.wait_for()
    card.locator("button.send-extras").click()
    page.wait_for_selector("#extras:not([hidden])")
    assert natural_size(page, "#extras-image") == [72, 64]


def test_extras_upscales_by_two_with_lanczos(page, tmp_path):  # noqa: F811
    page.click("#tab-extras")
    page.set_input_files("#extras-file", str(write_png(tmp_path / "small.png", (44, 32))))
    page.wait_for_selector("#extras-image:not([hidden])")
    page.fill("#extras-upscaling_resize", "2")
    page.select_option("#extras-upscaler_1", "Lanczos")
    with page.expect_request(lambda r: r.url.endswith("/sdapi/v1/extra-single-image")) as sent:
        page.click("#extras-run")
    body = sent.value.post_data_json
    assert body["upscaler_1"] == "Lanczos" and body["upscaling_resize"] == 2 and decode(body["image"]).size == (44, 32)
    page.wait_for_function("document.querySelector('#infotext').textContent.includes('Lanczos')")
    assert natural_size(page, "#main-image") == [88, 64]  # doubled (A1111 rounds down to 8 px: these are exact)
    shot(page, "extras")
