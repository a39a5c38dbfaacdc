"""End to end in headless Chromium against `retrieval serve` started the way the README starts it
(relative paths, a report): every page's images load, no CSP violation; upload a photo, then filter."""
from __future__ import annotations

import os
import queue
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from web_fixtures import web_audit, web_data, web_report  # noqa: F401

from web.browser import launch, missing_browser

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(missing_browser() is not None, reason=f"no browser: {missing_browser()}")]
START_SECONDS = 120


def wait_for_address(proc: subprocess.Popen) -> str:
    """Return the URL `retrieval serve` prints once it listens (fails when it exits or takes too long)."""
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    while True:
        try:
            line = lines.get(timeout=START_SECONDS)
        except queue.Empty:
            pytest.fail(f"retrieval serve printed no address within {START_SECONDS} s")
        found = re.search(r"http://127\.0\.0\.1:\d+", line)
        if found:
            return found.group(0)
        if proc.poll() is not None:
            pytest.fail(f"retrieval serve exited with {proc.returncode}")


@pytest.fixture(scope="module")
def server_url(web_data, web_report, web_audit, tmp_path_factory):
    """`retrieval serve` in a subprocess, from another working directory, with relative paths (scripts/demo.sh)."""
    cwd = tmp_path_factory.mktemp("cwd")

    def rel(path) -> str:
        return os.path.relpath(path, cwd)

    cmd = [sys.executable, "-m", "retrieval.cli", "serve", "--index", rel(web_data["index"]),
           "--catalog", rel(web_data["catalog"]), "--checkpoint", rel(web_data["checkpoint"]),
           "--report", rel(web_report), "--cache-dir", "thumbs", "--port", "0", "--threads", "2",
           "--audit", rel(web_audit), "--review"]
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        yield wait_for_address(proc)
    finally:
        proc.terminate()
        proc.wait(10)


def keep_screenshot(page, tmp_path: Path, name: str) -> Path:
    """Save a PNG to tmp_path, and to $SCREENSHOT_DIR as well when it is set."""
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=True)
    if os.environ.get("SCREENSHOT_DIR"):
        Path(os.environ["SCREENSHOT_DIR"]).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(os.environ["SCREENSHOT_DIR"]) / name)
    return path


def broken_images(page) -> list[str]:
    """Return the src of every <img> that did not load, after scrolling each into view (lazy loading)."""
    for img in page.locator("img").all():
        img.scroll_into_view_if_needed()
    page.wait_for_function("() => Array.from(document.images).every(i => i.complete)", timeout=30_000)
    return page.eval_on_selector_all("img", "imgs => imgs.filter(i => !(i.naturalWidth > 0)).map(i => i.src)")


def upload_photo(page, server_url: str, photo: Path) -> None:
    """Search by photo through the drop zone's file chooser (the page submits on change)."""
    page.goto(f"{server_url}/search")
    with page.expect_navigation():
        page.set_input_files("#dropzone input[type=file]", str(photo))


def test_every_page_shows_its_images_and_obeys_the_csp(server_url, web_data):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = launch(p)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        refused = []
        page.on("console", lambda msg: refused.append(msg.text) if "Content Security Policy" in msg.text else None)
        checked = {}
        for path in ("/", "/?colours=red", "/items/3", "/items/3?view=group-colours", "/search", "/evaluation",
                     "/review"):
            assert page.goto(server_url + path).status == 200, path
            checked[path] = (page.locator("img").count(), broken_images(page))
        upload_photo(page, server_url, web_data["catalog"] / "images" / "000003.jpg")
        checked[page.url] = (page.locator("img").count(), broken_images(page))
        browser.close()
    assert {path: broken for path, (_, broken) in checked.items() if broken} == {}
    assert checked["/"][0] >= 24 and checked["/evaluation"][0] == 1 and refused == []


def test_upload_a_photo_then_filter_the_results(server_url, web_data, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = launch(p)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        upload_photo(page, server_url, web_data["catalog"] / "images" / "000003.jpg")
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


def test_label_review_with_the_keyboard(server_url, web_audit):
    import csv

    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = launch(p)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto(f"{server_url}/review?kind=wrong")
        first = page.locator(".issue").first
        expect(first).to_have_class(re.compile("focused"))
        image = first.get_attribute("data-image")
        page.keyboard.press("j")  # the second issue
        second = page.locator(".issue").nth(1).get_attribute("data-image")
        with page.expect_navigation():
            page.keyboard.press("a")
        assert page.locator(f'.issue[data-image="{second}"]').count() == 0  # decided: off the list
        with page.expect_navigation():
            page.keyboard.press("r")  # the focus is back on the first pending one
        browser.close()
    with open(web_audit / "decisions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["image"], r["decision"], r["kind"]) for r in rows[-2:]] == [(second, "accept", "wrong"),
                                                                          (image, "reject", "wrong")]
