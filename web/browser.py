"""Headless Chromium through Playwright for end-to-end tests and screenshots (Debian's chromium, no download)."""
from __future__ import annotations

import importlib.util
import logging
import os

logger = logging.getLogger(__name__)

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def missing_browser() -> str | None:
    """Return why the browser cannot run (playwright or chromium missing), or None when it can."""
    if importlib.util.find_spec("playwright") is None:
        return "playwright is not installed (pip install playwright)"
    if not os.access(CHROMIUM, os.X_OK):
        return f"{CHROMIUM} not found (apt-get install chromium; never 'playwright install')"
    return None


def launch(playwright):
    """Launch Debian's headless Chromium with networking extras switched off."""
    return playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
