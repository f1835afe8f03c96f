"""The web UI's X/Y/Z plot script (issue 16): pick the script, fill three axes, Generate; the request goes to
/difusi/v1/xyz with the axes in `TYPE=VALUES` form and the grid is shown first. Real chromium, real server."""

from __future__ import annotations

import json

from test_browser import ARTIFACTS, browser, page, pytestmark  # noqa: F401  (shared fixtures and skip marks)


def test_xyz_script_posts_axes_and_shows_the_grid(page):  # noqa: F811
    assert page.is_hidden("#xyz-axes")
    page.select_option("#script", "xyz")
    assert page.is_visible("#xyz-axes")
    types = page.eval_on_selector_all("#x-type option", "os => os.map(o => o.textContent)")
    assert {"Nothing", "Sampling steps", "CFG scale", "Sampling method", "Prompt S/R", "Checkpoint name"} <= set(types)
    page.fill("#prompt", "a red circle on a blue background")
    page.fill("#steps", "1")
    page.fill("#seed", "21")
    page.select_option("#x-type", "sampler_name")
    page.fill("#x", "Euler a, Euler")
    page.select_option("#y-type", "steps")
    page.fill("#y", "1-2")
    page.select_option("#z-type", "Prompt S/R")
    page.fill("#z", "red, green")
    with page.expect_request(lambda r: r.url.endswith("/difusi/v1/xyz") and r.method == "POST") as sent:
        page.click("#generate")
    body = json.loads(sent.value.post_data)
    assert (body["x"], body["y"], body["z"]) == ("sampler_name=Euler a, Euler", "steps=1-2", "Prompt S/R=red, green")
    assert body["prompt"] == "a red circle on a blue background" and body["seed"] == 21
    page.wait_for_function("document.querySelector('#infotext').textContent.includes('Script: X/Y/Z plot')")
    page.wait_for_function("(() => { const img = document.querySelector('#main-image'); "
                           "return img.complete && img.naturalWidth > 0; })()")
    width, height = page.eval_on_selector("#main-image", "img => [img.naturalWidth, img.naturalHeight]")
    assert width > 2 * 64 and height > 2 * 64  # a labelled grid of grids, not one 64 px cell
    assert page.locator("#results img").count() == 1 + 8  # the grid of grids, then the 8 cells (no sub grids)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "xyz-plot.png"), full_page=True)


def test_xyz_bad_axis_marks_its_input(page):  # noqa: F811
    page.select_option("#script", "xyz")
    page.fill("#prompt", "a cat")
    page.select_option("#x-type", "steps")
    page.fill("#x", "0, 5")
    page.click("#generate")
    page.wait_for_selector("#error:not([hidden])")
    assert "X axis" in page.text_content("#error") and "'0'" in page.text_content("#error")
    assert "invalid" in page.get_attribute("#x", "class")
