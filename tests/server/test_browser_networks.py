"""The web UI's extra-networks panel (A1111's cards) and SD VAE select, in real chromium against a real server.

The server has a models folder of its own (`test_networks_http.networks_folder`): a LoRA for the default model with
a thumbnail (alias "inkwash"), one in a sub-folder without, embeddings and a VAE file.
"""

from __future__ import annotations

import json
import shutil

import pytest
from test_browser import ARTIFACTS, TIMEOUT_MS, browser, pytestmark  # noqa: F401  (shared fixtures and skip marks)
from test_networks_http import (  # noqa: F401  (fixtures)
    BROKEN,
    EMBEDDING,
    LORA,
    LORA_ALIAS,
    networks_folder,
    networks_server,
)

FAST = {"steps": "2", "width": "64", "height": "64", "seed": "11"}
TAG = f"<lora:{LORA_ALIAS}:1>"


@pytest.fixture()
def page(browser, networks_server):  # noqa: F811
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(f"JavaScript: {error}"))
    page.on("response", lambda response: problems.append(f"{response.status} {response.url}")
            if response.status >= 400 else None)
    page.goto(networks_server.url + "/")
    page.wait_for_selector("body[data-ready=true]")
    yield page
    context.close()
    assert problems == []


def _open_panel(page, kind: str = "lora") -> None:
    assert page.is_hidden("#networks")
    page.click("#networks-toggle")
    page.wait_for_selector(".network-card")
    page.click(f"#networks-tab-{kind}")
    page.wait_for_selector(f".network-card[data-kind={kind}]")


def _visible_cards(page) -> list[str]:
    return page.eval_on_selector_all(".network-card", "cs => cs.filter(c => !c.hidden).map(c => c.dataset.name)")


def _fill(page, **values) -> None:
    for name, value in values.items():
        page.fill(f"#{name}", value)
    page.select_option("#sampler_name", "Euler")


def _generate(page) -> dict:
    with page.expect_request(lambda r: r.url.endswith("/difusi/v1/jobs") and r.method == "POST") as sent:
        page.click("#generate")
    page.wait_for_function("document.querySelector('#progress-text').textContent === 'Done'")
    return json.loads(sent.value.post_data)


def test_lora_card_search_toggle_and_generate(page, networks_server):  # noqa: F811
    with networks_server.client() as http:
        listed = {item["name"]: item for item in http.get("/difusi/v1/networks").json()["loras"]}
    _open_panel(page)
    assert sorted(_visible_cards(page)) == sorted([LORA, "plain", "difusi-mini-pink"])  # + the shipped LoRA
    card = page.locator(f".network-card[data-name={LORA}]")
    page.wait_for_function(f"document.querySelector('.network-card[data-name={LORA}] img').naturalWidth === 32")
    assert page.locator(".network-card[data-name=plain] .network-placeholder").count() == 1  # no thumbnail
    for query, expected in (("INKW", [LORA]), ("sub/", ["plain"]), ("tiny", [LORA]), ("no such", [])):
        page.fill("#networks-search", query)  # name, alias or sub-folder, any case
        assert _visible_cards(page) == expected, query
    assert page.is_visible("#networks-empty")
    page.fill("#networks-search", "ink")
    assert page.is_hidden("#networks-empty")

    page.fill("#prompt", "a red circle")
    card.click()
    assert page.input_value("#prompt") == f"a red circle {TAG}"
    assert "active" in card.get_attribute("class")
    card.click()  # A1111 toggles: the tag and its separator go again
    assert page.input_value("#prompt") == "a red circle"
    assert "active" not in card.get_attribute("class")
    page.fill("#prompt", f"a red circle <lora:{LORA_ALIAS}:0.5>, blue")
    card.click()  # whatever the multiplier
    assert page.input_value("#prompt") == "a red circle, blue"
    page.fill("#prompt", "")
    card.click()
    assert page.input_value("#prompt") == TAG  # no leading space in an empty prompt
    page.fill("#prompt", f"{TAG} a red circle")

    _fill(page, **FAST)
    body = _generate(page)
    assert body["prompt"] == f"{TAG} a red circle" and body["sd_vae"] == "Automatic"
    infotext = page.text_content("#infotext")
    assert f'Lora hashes: "{LORA_ALIAS}: {listed[LORA]["hash"]}"' in infotext, infotext
    assert "VAE hash" not in infotext
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "extra-networks.png"), full_page=True)


def test_embedding_card_goes_to_the_prompt_last_focused(page):
    _open_panel(page, "embedding")
    assert page.locator(".network-card[data-kind=lora]").count() == 0
    assert "skipped" in page.get_attribute(f".network-card[data-name={BROKEN}]", "class")
    page.click(f".network-card[data-name={BROKEN}]")  # cannot be used: nothing happens
    assert page.input_value("#prompt") == "" and page.input_value("#negative_prompt") == ""
    page.wait_for_function(f"document.querySelector('.network-card[data-name={EMBEDDING}] img').naturalWidth === 32")
    card = page.locator(f".network-card[data-name={EMBEDDING}]")
    page.fill("#prompt", "a cat")
    card.click()
    assert page.input_value("#prompt") == f"a cat {EMBEDDING}"
    page.focus("#negative_prompt")
    page.fill("#negative_prompt", "blurry,")
    card.click()
    assert page.input_value("#negative_prompt") == f"blurry, {EMBEDDING}"
    card.click()
    assert page.input_value("#negative_prompt") == "blurry,"
    assert page.input_value("#prompt") == f"a cat {EMBEDDING}"
    page.fill("#prompt", f"{EMBEDDING}s and {EMBEDDING}, more")
    page.focus("#prompt")
    card.click()  # the whole word only
    assert page.input_value("#prompt") == f"{EMBEDDING}s and, more"


def test_vae_select_lists_the_files_and_travels_in_the_request(page, networks_server):  # noqa: F811
    with networks_server.client() as http:
        files = [item["model_name"] for item in http.get("/sdapi/v1/sd-vae").json()]
    assert files
    assert page.eval_on_selector_all("#sd_vae option", "os => os.map(o => o.value)") == ["Automatic", "None", *files]
    assert page.input_value("#sd_vae") == "Automatic"
    assert page.is_visible("#sd_vae")
    page.select_option("#sd_vae", files[0])
    page.fill("#prompt", "a green square")
    _fill(page, **FAST)
    body = _generate(page)
    assert body["sd_vae"] == files[0] and "override_settings" in body
    infotext = page.text_content("#infotext")
    assert f"VAE: {files[0]}" in infotext and "VAE hash: " in infotext, infotext


def test_refresh_lists_new_files_and_keeps_the_vae_choice(page, networks_folder):  # noqa: F811
    _open_panel(page)
    page.select_option("#sd_vae", "None")
    shutil.copy(networks_folder / "Lora" / f"{LORA}.safetensors", networks_folder / "Lora" / "fresh.safetensors")
    try:
        assert "fresh" not in _visible_cards(page)
        with page.expect_request(lambda r: r.url.endswith("/sdapi/v1/refresh-loras") and r.method == "POST"):
            page.click("#networks-refresh")
        page.wait_for_selector(".network-card[data-name=fresh]")
        assert page.input_value("#sd_vae") == "None"
    finally:
        (networks_folder / "Lora" / "fresh.safetensors").unlink()
        page.click("#networks-refresh")
        page.wait_for_selector(".network-card[data-name=fresh]", state="detached")
