"""The web UI end to end: Playwright drives Debian's chromium (headless) against a real server.

Screenshots are written to test-artifacts/server/ for a human to look at.
"""

from __future__ import annotations

import base64
import json
import os
import re
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "server"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 60_000

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed (tools/setup-chromium.sh)"),
]


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        yield chromium
        chromium.close()


@pytest.fixture()
def page(browser, server):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(server.url + "/")
    page.wait_for_selector("body[data-ready=true]")
    yield page
    context.close()
    assert errors == [], f"JavaScript errors on the page: {errors}"


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def fill_form(page, **values) -> None:
    for name, value in values.items():
        if name in ("sampler_name", "scheduler"):
            page.select_option(f"#{name}", str(value))
        else:
            page.fill(f"#{name}", str(value))


def test_form_lists_models_samplers_and_schedules(page, models):
    model_titles = page.eval_on_selector_all("#model option", "os => os.map(o => o.value)")
    assert any(t.startswith(models.default.stem) for t in model_titles)
    assert any(t.startswith(models.other.stem) for t in model_titles)
    samplers = page.eval_on_selector_all("#sampler_name option", "os => os.map(o => o.value)")
    assert {"Euler", "Euler a", "DPM++ 2M"} <= set(samplers) and page.input_value("#sampler_name") == "DPM++ 2M"
    assert "Karras" in page.eval_on_selector_all("#scheduler option", "os => os.map(o => o.value)")
    # The RNG select is filled from /difusi/v1/rng-sources (app.js CHOICE_SOURCES), defaulting to the table's CPU.
    assert page.eval_on_selector_all("#rng option", "os => os.map(o => o.value)") == ["CPU", "GPU", "NV"]
    assert page.input_value("#rng") == "CPU"


def test_form_has_a_control_for_every_field_of_the_table(page, client):
    """The form is built from GET /difusi/v1/fields: every request field has a control with the table's label,
    range and default, and what the form sends is what the table declares."""
    table = [f for f in client.get("/difusi/v1/fields", params={"kind": "txt2img"}).json()["fields"] if f["http"]]
    for field in table:
        assert page.locator(f"#{field['name']}").count() == 1, field["name"]
        if field["widget"] == "number":
            assert page.get_attribute(f"#{field['name']}", "max") == (None if field["max"] is None else
                                                                    _js_number(field["max"])), field["name"]
    sent = page.evaluate("readForm()")
    defaults = {f["name"]: f["default"] for f in table if f["default"] not in (None, "")}
    assert {name: sent[name] for name in defaults} == defaults
    assert page.text_content("label[for=seed]") == next(f["label"] for f in table if f["name"] == "seed")


def _js_number(value) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def test_generate_shows_images_with_infotext_and_seed_buttons(page):
    fill_form(page, prompt="a red circle on a blue background", negative_prompt="blurry", steps=3, width=64,
              height=64, seed=1234, batch_size=2, n_iter=1, cfg_scale=6, sampler_name="Euler")
    page.click("#generate")
    page.wait_for_function("document.querySelector('#infotext').textContent.includes('Seed: 1234,')")
    page.wait_for_selector("#main-image", state="visible")  # visible once the PNG has loaded
    infotext = page.text_content("#infotext")
    assert infotext.startswith("a red circle on a blue background\nNegative prompt: blurry\nSteps: 3, Sampler: Euler,")
    assert "Size: 64x64" in infotext and "CFG scale: 6" in infotext
    assert page.locator("#results img").count() == 2
    page.locator("#results img").nth(1).click()
    assert "Seed: 1235," in page.text_content("#infotext")
    page.wait_for_function("(() => { const img = document.querySelector('#main-image'); return img.complete && img.naturalWidth > 0; })()")
    natural = page.eval_on_selector("#main-image", "img => [img.naturalWidth, img.naturalHeight]")
    assert natural == [64, 64]
    shot(page, "generate")
    page.click("#reuse-seed")
    assert page.input_value("#seed") == "1235"
    page.click("#random-seed")
    assert page.input_value("#seed") == "-1"


def test_interrupt_with_live_preview(page):
    fill_form(page, prompt="interrupt me", steps=1000, width=64, height=64, n_iter=3, seed=5, sampler_name="Euler")
    page.click("#generate")
    page.wait_for_function("document.querySelector('#progress-text').textContent.startsWith('Step')")
    page.wait_for_selector("#preview:not([hidden])")
    width = page.eval_on_selector("#progress-bar", "bar => parseFloat(bar.style.width)")
    assert 0 <= width < 100
    shot(page, "progress")
    page.click("#interrupt")
    page.wait_for_function("document.querySelector('#progress-text').textContent === 'Interrupted'")
    assert page.is_enabled("#generate") and not page.is_enabled("#interrupt")


def test_server_side_validation_error_names_the_field(page):
    fill_form(page, prompt="x", steps=0, width=64, height=64)
    page.click("#generate")
    page.wait_for_selector("#error:not([hidden])")
    assert re.search(r"steps.*\[1, 1000\]", page.text_content("#error"))
    assert "invalid" in page.get_attribute("#steps", "class")
    shot(page, "error")


def test_reuse_parameters_from_history(page, client):
    body = {"prompt": "history prompt unique", "negative_prompt": "nothing", "seed": 777, "steps": 4,
            "sampler_name": "Euler a", "scheduler": "Karras", "cfg_scale": 6.5, "width": 64, "height": 72}
    assert client.post("/sdapi/v1/txt2img", json=body).status_code == 200
    page.fill("#history-search", "history prompt unique")
    card = page.locator(".card", has_text="history prompt unique").first
    card.wait_for()
    assert card.locator("img").evaluate("img => img.complete && img.naturalWidth") == 64
    shot(page, "history")
    card.locator("button.reuse").click()
    got = {name: page.input_value(f"#{name}") for name in
           ("prompt", "negative_prompt", "seed", "steps", "sampler_name", "scheduler", "cfg_scale", "width", "height")}
    assert got == {"prompt": "history prompt unique", "negative_prompt": "nothing", "seed": "777", "steps": "4",
                   "sampler_name": "Euler a", "scheduler": "Karras", "cfg_scale": "6.5", "width": "64", "height": "72"}


def test_png_info_by_dropping_an_image(page, client):
    body = {"prompt": "dropped image", "seed": 4321, "steps": 3, "sampler_name": "DPM++ 2M", "cfg_scale": 4,
            "width": 64, "height": 64, "save_images": False}
    response = client.post("/sdapi/v1/txt2img", json=body).json()
    infotext = json.loads(response["info"])["infotexts"][0]
    png_b64 = response["images"][0]
    assert base64.b64decode(png_b64)[:4] == b"\x89PNG"
    page.evaluate(
        """b64 => {
            const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
            const data = new DataTransfer();
            data.items.add(new File([bytes], "dropped.png", {type: "image/png"}));
            document.body.dispatchEvent(new DragEvent("drop", {dataTransfer: data, bubbles: true, cancelable: true}));
        }""",
        png_b64,
    )
    page.wait_for_selector("#pnginfo:not([hidden])")
    assert page.text_content("#pnginfo-text") == infotext
    shot(page, "pnginfo")
    page.click("#pnginfo-use")
    assert page.input_value("#prompt") == "dropped image"
    assert page.input_value("#seed") == "4321" and page.input_value("#steps") == "3"
    assert page.input_value("#sampler_name") == "DPM++ 2M" and page.input_value("#cfg_scale") == "4"


def test_api_docs_render_without_a_cdn(browser, server):
    from difusi.server.app import _swagger_ui_folder

    if _swagger_ui_folder() is None:
        pytest.skip("swagger-ui-py is not installed: /docs loads Swagger UI from a CDN")
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    outside: list[str] = []
    page.on("request", lambda request: None if request.url.startswith(server.url) else outside.append(request.url))
    page.goto(server.url + "/docs")
    page.get_by_text("/sdapi/v1/txt2img", exact=True).first.wait_for()
    shot(page, "docs")
    context.close()
    assert outside == []


def test_model_select_switches_the_server_model(page, client, models):
    other = next(t for t in page.eval_on_selector_all("#model option", "os => os.map(o => o.value)")
                 if t.startswith(models.other.stem))
    before = client.get("/sdapi/v1/options").json()["sd_model_checkpoint"]
    try:
        page.select_option("#model", other)
        page.wait_for_function(f"document.querySelector('#server-status').textContent === {json.dumps('Model: ' + other)}")
        assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == other
    finally:
        client.post("/sdapi/v1/options", json={"sd_model_checkpoint": before})


# -- issue 19, defect 11: what a new user hit in the web UI --------------------------------------------------------
def _open(browser, url: str, width: int = 1280, height: int = 900):
    """A page on `url` that records JavaScript errors and failed responses (status >= 400)."""
    context = browser.new_context(viewport={"width": width, "height": height})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(f"JavaScript: {error}"))
    page.on("response", lambda response: problems.append(f"{response.status} {response.url}")
            if response.status >= 400 else None)
    page.goto(url + "/")
    page.wait_for_selector("body[data-ready=true]")
    return context, page, problems


def test_prompt_placeholder_is_a_hint_and_an_empty_prompt_generates_as_in_a1111(page):
    placeholder = page.get_attribute("#prompt", "placeholder")
    assert placeholder.startswith("Prompt (") and "Ctrl+Enter" in placeholder  # reads as a hint, not a prompt
    assert page.input_value("#prompt") == ""
    fill_form(page, steps=1, width=64, height=64, seed=77, sampler_name="Euler")
    page.click("#generate")  # A1111 generates with an empty prompt too (an unconditioned image)
    page.wait_for_function("document.querySelector('#infotext').textContent.includes('Seed: 77,')")
    assert page.text_content("#infotext").startswith("Steps: 1,")  # no prompt line: the prompt really was empty


def test_failed_model_switch_error_goes_away_after_a_successful_switch(page, client, models):
    before = client.get("/sdapi/v1/options").json()["sd_model_checkpoint"]
    other = next(t for t in page.eval_on_selector_all("#model option", "os => os.map(o => o.value)")
                 if t.startswith(models.other.stem))
    page.evaluate("document.querySelector('#model').add(new Option('no-such-model [0123456789]'))")
    try:
        page.select_option("#model", "no-such-model [0123456789]")
        page.wait_for_selector("#error:not([hidden])")
        assert "unknown model" in page.text_content("#error")
        page.select_option("#model", other)
        page.wait_for_function(f"document.querySelector('#server-status').textContent === {json.dumps('Model: ' + other)}")
        assert page.is_hidden("#error") and page.text_content("#error") == ""
        assert "invalid" not in (page.get_attribute("#model", "class") or "")
    finally:
        client.post("/sdapi/v1/options", json={"sd_model_checkpoint": before})


def test_a_new_job_clears_the_previous_result_and_warnings(page):
    fill_form(page, prompt="[red:blue:soon] ball", steps=1, width=64, height=64, seed=31, sampler_name="Euler")
    page.click("#generate")
    page.wait_for_function("document.querySelector('#infotext').textContent.includes('Seed: 31,')")
    assert "is not prompt editing" in page.text_content("#warnings") and page.is_visible("#warnings")
    fill_form(page, prompt="interrupt me", steps=1000, n_iter=1)
    page.click("#generate")
    page.wait_for_function("document.querySelector('#progress-text').textContent.startsWith('Step')")
    assert page.text_content("#infotext") == "" and page.is_hidden("#warnings")  # nothing of the previous job
    assert page.locator("#results img").count() == 0 and page.is_hidden("#main-image")
    page.click("#interrupt")
    page.wait_for_function("document.querySelector('#progress-text').textContent === 'Interrupted'")


def test_narrow_viewport_does_not_overflow_and_nothing_is_missing(browser, server):
    context, page, problems = _open(browser, server.url, width=420, height=800)
    try:
        widths = page.evaluate("""() => ({page: document.documentElement.scrollWidth,
            header: document.querySelector('.topbar').scrollWidth,
            right: Math.max(...[...document.querySelectorAll('.topbar *')].map(e => e.getBoundingClientRect().right))})""")
        shot(page, "narrow-420")
        assert widths["page"] <= 420 and widths["header"] <= 420 and widths["right"] <= 420, widths
        assert page.is_visible("#model") and page.is_visible("#generate")
    finally:
        context.close()
    assert problems == []  # no JavaScript error and no 404 (the favicon included)


def test_favicon_is_served(client):
    response = client.get("/favicon.ico")
    assert response.status_code == 200 and response.headers["content-type"] == "image/x-icon"
    assert response.content[:4] == b"\x00\x00\x01\x00"  # an ICO file


def test_history_load_more_pages_by_offset(browser, start_server):
    fresh = start_server()  # its own outputs folder: exactly the 50 images below
    with fresh.client() as http:
        body = {"prompt": "many", "steps": 1, "width": 64, "height": 64, "sampler_name": "Euler", "batch_size": 50,
                "seed": 1}
        assert http.post("/sdapi/v1/txt2img", json=body).status_code == 200
    context, page, problems = _open(browser, fresh.url)
    try:
        page.wait_for_function("document.querySelectorAll('#history .card').length === 48")
        assert page.is_visible("#history-more")
        page.click("#history-more")
        page.wait_for_function("document.querySelectorAll('#history .card').length === 50")
        assert page.is_hidden("#history-more")
        seeds = page.eval_on_selector_all("#history .card", "cs => cs.map(c => c.querySelector('.muted').textContent)")
        assert len(set(seeds)) == 50  # the second page continues the first: no card twice
    finally:
        context.close()
    assert problems == []
