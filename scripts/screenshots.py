"""Screenshots of the main pages (browse, product, photo search results, evaluation, label review) for the README.

    python scripts/screenshots.py --index INDEX_DIR --catalog DIR --checkpoint RUN/best.pt \
        --report REPORT_DIR --audit AUDIT_DIR --out docs/screenshots

Serves the app with waitress on a free loopback port and drives Debian's headless Chromium through
Playwright (see web/browser.py); thumbnails go to a temporary cache.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from web import create_app
from web.browser import launch, missing_browser
from web.serve import start_background_server


def get_args_parser() -> argparse.ArgumentParser:
    """Parser of the screenshot script."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--index", required=True, metavar="INDEX_DIR")
    p.add_argument("--catalog", required=True, metavar="DIR")
    p.add_argument("--checkpoint", required=True, metavar="RUN/best.pt")
    p.add_argument("--report", metavar="REPORT_DIR", help="for the evaluation page")
    p.add_argument("--audit", metavar="AUDIT_DIR", help="for the label review page")
    p.add_argument("--out", default="docs/screenshots", metavar="DIR")
    p.add_argument("--item", type=int, help="product page item id (default: a well-labelled item)")
    p.add_argument("--filter", default="gender=women", metavar="GROUP=LABEL",
                   help="facet clicked on the photo search results (default: gender=women)")
    p.add_argument("--width", type=int, default=1280)
    p.add_argument("--height", type=int, default=860)
    return p


def pick_item(store) -> int:
    """Return the id of the first item with a label in every group (else the first item)."""
    for position, item_id in enumerate(store.ids):
        if all(per_item[position] for per_item in store.labels.values()):
            return int(item_id)
    return int(store.ids[0])


def shoot(page, url: str | None, path: Path) -> None:
    """Open url (None: stay), wait for images, save a viewport PNG reduced to 256 colours."""
    from PIL import Image

    if url is not None:
        page.goto(url)
    wait_for_images(page)
    page.screenshot(path=str(path))
    with Image.open(path) as shot:
        small = shot.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    small.save(path, optimize=True)  # UI screenshots keep their look with a palette, at ~40% of the size
    print(f"{path} ({path.stat().st_size // 1024} KB)")


def wait_for_images(page) -> None:
    """Wait until every image on the page has loaded."""
    page.wait_for_load_state("networkidle")
    for img in page.locator("img").all():  # lazy images load once scrolled into view
        img.scroll_into_view_if_needed()
    page.evaluate("() => window.scrollTo(0, 0)")
    page.wait_for_function("() => Array.from(document.images).every(img => img.complete)")


def take_screenshots(base: str, out: Path, item_id: int, photo: Path, facet: tuple[str, str], size,
                     review: bool = False) -> None:
    """Save browse.png, product.png, search.png, evaluation.png (and review.png) from a running server."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = launch(p)
        page = browser.new_page(viewport={"width": size[0], "height": size[1]})
        shoot(page, f"{base}/", out / "browse.png")
        shoot(page, f"{base}/items/{item_id}", out / "product.png")
        page.goto(f"{base}/search")
        with page.expect_navigation():
            page.set_input_files("#dropzone input[type=file]", str(photo))
        with page.expect_navigation():
            page.locator(f'.facet-option[data-group="{facet[0]}"][data-label="{facet[1]}"]').click()
        shoot(page, None, out / "search.png")
        shoot(page, f"{base}/evaluation", out / "evaluation.png")
        if review:
            shoot(page, f"{base}/review?kind=wrong", out / "review.png")
        browser.close()


def main(argv=None) -> int:
    """Serve the app in a thread and save the screenshots."""
    args = get_args_parser().parse_args(argv)
    if missing_browser():
        print(f"screenshots: {missing_browser()}", file=sys.stderr)
        return 1
    group, _, label = args.filter.partition("=")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as cache:
        app = create_app({"INDEX_DIR": args.index, "CATALOG_DIR": args.catalog, "CHECKPOINT": args.checkpoint,
                          "REPORT_DIR": args.report, "AUDIT_DIR": args.audit, "REVIEW": bool(args.audit),
                          "THUMB_DIR": cache})
        store = app.extensions["retrieval"].warm_up().store
        item_id = args.item if args.item is not None else pick_item(store)
        photo = Path(args.catalog) / store.item(item_id)["path"]
        server = start_background_server(app)
        try:
            take_screenshots(server.url, out, item_id, photo, (group, label), (args.width, args.height),
                             bool(args.audit))
        finally:
            server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
