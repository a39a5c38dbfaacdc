"""Catalog images and cached thumbnails: the /images and /thumbs routes and the `thumbs` command."""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import click
from flask import Blueprint, abort, current_app, send_file, send_from_directory
from flask.cli import with_appcontext

from retrieval.data.images import to_rgb  # importing it registers HEIC with PIL for the thumbnails and copies
from retrieval.atomic import atomic_write
from web.resources import catalog_dir, get_snapshot, resources

logger = logging.getLogger(__name__)

bp = Blueprint("media", __name__)
CACHE_SECONDS = 300  # a photo shot again under its name keeps its id and path: keep browser caching short
BROWSER_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".avif")  # served as they are
DISPLAY_SIZE = 1600  # the longer side of the JPEG copy served for other formats (HEIC, TIFF)


def thumb_path(cache_dir: Path, image: Path, size: int) -> Path:
    """Return the cache file of an image's thumbnail, named after its path, size and modification."""
    st = image.stat()
    key = f"{image.resolve()}|{st.st_mtime_ns}|{st.st_size}|{size}".encode()
    digest = hashlib.sha1(key).hexdigest()
    return cache_dir / digest[:2] / f"{digest}.jpg"


def write_thumbnail(image: Path, target: Path, size: int) -> bool:
    """Write a JPEG thumbnail (longer side <= size) atomically; False when the image is unreadable."""
    from PIL import Image, ImageOps

    try:
        with Image.open(image) as img:
            img.draft("RGB", (size, size))  # JPEG: decode at reduced scale, much faster
            small = to_rgb(ImageOps.exif_transpose(img))  # 16-bit grey, alpha on white: as the model sees it
            small.thumbnail((size, size))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        logger.warning("Cannot make a thumbnail of %s: %s", image, err)
        return False
    def save() -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(target, "wb") as f:
            small.save(f, "JPEG", quality=85, optimize=True)

    try:
        save()
    except FileNotFoundError:  # `thumbs --prune` removed the emptied folder in between: once more
        save()
    return True


def cached_thumbnail(image: Path, cache_dir: Path, size: int) -> Path | None:
    """Return the cached thumbnail of image, generating it on first request; None when unreadable."""
    try:
        target = thumb_path(cache_dir, image, size)
    except OSError as err:
        logger.warning("Cannot make a thumbnail of %s: %s", image, err)
        return None
    if target.is_file() or write_thumbnail(image, target, size):
        return target
    return None


def served_thumbnail(image: Path, size: int) -> Path | None:
    """cached_thumbnail under THUMB_DIR for a request: a cache that cannot be written (a file there, no
    permission, a full disk) is a 503 naming it, not a 500."""
    cache_dir = Path(current_app.config["THUMB_DIR"])
    try:
        return cached_thumbnail(image, cache_dir, size)
    except OSError as err:
        logger.error("Cannot write the thumbnail cache %s: %s", cache_dir, err)
        abort(503, f"The thumbnail cache {cache_dir} cannot be written ({err.strerror or err})")


def image_file(relative: str) -> Path:
    """Return the catalog file of an indexed image path, 404 for anything else."""
    if not get_snapshot().store.items.has_path(relative):
        abort(404, f"No indexed image {relative!r}")
    path = catalog_dir() / relative
    if not path.is_file():
        abort(404, f"Image file {relative!r} is missing from the catalog")
    return path


@bp.get("/images/<path:filename>")
def image(filename: str):
    """Serve a catalog image (only paths of indexed items; traversal gives 404); one in a format
    browsers do not show (a phone's HEIC, TIFF) as a JPEG copy of DISPLAY_SIZE, cached as thumbnails are."""
    if Path(filename).suffix.lower() not in BROWSER_SUFFIXES:  # image_file checks that it is indexed
        target = served_thumbnail(image_file(filename), DISPLAY_SIZE)
        if target is None:
            abort(404, f"The image {filename!r} cannot be read")
        return send_file(target, mimetype="image/jpeg", max_age=CACHE_SECONDS)
    image_file(filename)  # indexed, and on disk: a deleted file is said, not a bare "Not found"
    return send_from_directory(catalog_dir(), filename, max_age=CACHE_SECONDS)


@bp.get("/thumbs/<int:item_id>.jpg")
def thumb(item_id: int):
    """Serve an item's thumbnail from the on-disk cache, generating it on first request."""
    try:
        item = get_snapshot().store.item(item_id)
    except KeyError:
        abort(404, f"No item with id {item_id}")
    target = served_thumbnail(image_file(item["path"]), int(current_app.config["THUMB_SIZE"]))
    if target is None:
        abort(404, f"The image of item {item_id} cannot be read")
    return send_file(target, mimetype="image/jpeg", max_age=CACHE_SECONDS)


def prune_cache(cache_dir: Path, keep: set[Path]) -> tuple[int, int]:
    """Delete the cached JPEGs under ``cache_dir`` (``thumb_path``'s ``xx/<sha1>.jpg``) that are not in
    ``keep``: (files deleted, bytes freed)."""
    deleted = freed = 0
    for path in cache_dir.glob("[0-9a-f][0-9a-f]/*.jpg"):
        if path in keep:
            continue
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:  # another pruning process took it
            continue
        deleted, freed = deleted + 1, freed + size
    for folder in cache_dir.glob("[0-9a-f][0-9a-f]"):
        try:
            folder.rmdir()  # only when the prune emptied it
        except OSError:
            pass
    return deleted, freed


@click.command("thumbs")
@click.option("--prune", is_flag=True,
              help="then delete the cached thumbnails and JPEG copies of images that are no longer indexed or "
                   "changed since (a withdrawn product, a photo shot again): THUMB_DIR holds this index's only")
@with_appcontext
def thumbs_command(prune: bool):
    """Generate the thumbnails of every indexed item that are not cached yet."""
    cfg = current_app.config
    snapshot = resources().index().get()
    cache_dir, size = Path(cfg["THUMB_DIR"]), int(cfg["THUMB_SIZE"])
    done = failed = 0
    keep = set()
    for relative in snapshot.store.paths:
        image = Path(cfg["CATALOG_DIR"]) / relative
        ok = cached_thumbnail(image, cache_dir, size)
        done, failed = done + bool(ok), failed + (not ok)
        if ok:
            keep.add(ok)
            if image.suffix.lower() not in BROWSER_SUFFIXES:  # its display copy, when one was made
                keep.add(thumb_path(cache_dir, image, DISPLAY_SIZE))
    click.echo(f"{done} thumbnails in {cache_dir}, {failed} unreadable images")
    if prune:
        deleted, freed = prune_cache(cache_dir, keep)
        click.echo(f"Pruned {deleted} cached images of no indexed image as it is now ({freed / 1024:,.0f} KiB)")


def init_app(app) -> None:
    """Register the media routes and the `flask thumbs` command."""
    app.register_blueprint(bp)
    app.cli.add_command(thumbs_command)
