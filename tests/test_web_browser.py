"""End to end in headless Chromium: upload a photo, see results, apply a filter, keep a screenshot."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from web_fixtures import make_config, web_data  # noqa: F401

from web.browser import launch, missing_browser

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(missing_browser() is not None, reason=f"no browser: {missing_browser()}")]


@pytest.fixture
def server_url(web_data, tmp_path):
    """The app served by waitress on a free loopback port in a background thread."""
    from web import create_app
    from web.serve import start_background_server

    server = start_background_server(create_app(make_config(web_data, tmp_path, TESTING=False)))
    yield server.url
    server.close()


def keep_screenshot(page, tmp_path: Path, name: str) -> Path:
    """Save a PNG to tmp_path, and to $SCREENSHOT_DIR as well when it is set."""
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=True)
    if os.environ.get("SCREENSHOT_DIR"):
        Path(os.environ["SCREENSHOT_DIR"]).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(os.environ["SCREENSHOT_DIR"]) / name)
    return path


def test_upload_a_photo_then_filter_the_results(server_url, web_data, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    photo = web_data["catalog"] / "images" / "000003.jpg"
    with sync_playwright() as p:
        browser = launch(p)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto(f"{server_url}/search")
        with page.expect_navigation():
            page.set_input_files("#dropzone input[type=file]", str(photo))  # the page submits on change
        expect(page.get_by_role("heading", name="What the model sees")).to_be_visible()
        expect(page.locator(".card .score").first).to_be_visible()
        before = page.locator(".card").count()
        page.locator('.facet-option[data-group="gender"][data-label="women"]').click()
        expect(page.locator('.pill', has_text="gender: women")).to_be_visible()
        labels = page.locator(".card").evaluate_all("cards => cards.map(c => c.textContent)")
        assert before > 0 and len(labels) > 0 and all("women" in text for text in labels)
        assert "gender=women" in page.url
        shot = keep_screenshot(page, tmp_path, "search-results-filtered.png")
        browser.close()
    assert shot.stat().st_size > 10_000
