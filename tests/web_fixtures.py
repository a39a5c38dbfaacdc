"""Fixtures for the web tests: the demo catalog embedded and indexed, apps and clients over it."""
from __future__ import annotations

import io
import shutil
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

from retrieval.cli import main as cli


def build_index(emb_path: Path, catalog_dir: Path, out: Path, keep=None):
    """Build and save a flat index of the embeddings (optionally only the ids in keep); return the store."""
    import numpy as np

    from indexer import build_store_from_embeddings
    from retrieval.data.embfile import read_embeddings
    from retrieval.data.catalog import read_catalog

    emb = read_embeddings(emb_path).as_dict()
    if keep is not None:
        rows = np.flatnonzero(np.isin(emb["ids"], list(keep)))
        emb = {**emb, "vectors": emb["vectors"][rows], "ids": emb["ids"][rows],
               "paths": [emb["paths"][i] for i in rows], "groups": {g: v[rows] for g, v in emb["groups"].items()}}
    catalog = read_catalog(catalog_dir)
    by_id = {item.row_id: item for item in catalog.items}
    items = [by_id[int(i)] for i in emb["ids"]]
    labels = {g: [list(item.labels[g]) for item in items] for g in catalog.groups}
    store = build_store_from_embeddings(emb, "flat", titles=[item.title for item in items], labels=labels)
    store.save(out)
    return store


@pytest.fixture(scope="session")
def web_data(demo_catalog, tiny_run, tmp_path_factory) -> dict:
    """The demo catalog embedded with the tiny run, and a pristine flat index of it (never modified)."""
    root = tmp_path_factory.mktemp("web")
    emb = root / "emb.h5"
    assert cli(["embed", "--checkpoint", str(tiny_run / "best.pt"), "--catalog", str(demo_catalog),
                "--out", str(emb), "--device", "cpu", "--workers", "0"]) == 0
    build_index(emb, demo_catalog, root / "index")
    return {"catalog": demo_catalog, "checkpoint": tiny_run / "best.pt", "emb": emb, "index": root / "index"}


@pytest.fixture(scope="session")
def web_report(web_data, tmp_path_factory) -> Path:
    """An evaluation report (report.json + chart.png) of the demo embeddings."""
    from retrieval.data.catalog import read_catalog
    from retrieval.evaluate.report import evaluate_embeddings, write_report

    out = tmp_path_factory.mktemp("report")
    report = evaluate_embeddings(web_data["emb"], read_catalog(web_data["catalog"]), "all", k=10, device="cpu")
    write_report(report, out)
    return out


@pytest.fixture(scope="session")
def web_audit(web_data, tmp_path_factory) -> Path:
    """A label audit of the demo catalog (issues.csv, no decisions yet)."""
    out = tmp_path_factory.mktemp("audit")
    assert cli(["audit", "--checkpoint", str(web_data["checkpoint"]), "--catalog", str(web_data["catalog"]),
                "--out", str(out), "--device", "cpu", "--workers", "0", "--folds", "3"]) == 0
    return out


def make_config(web_data: dict, tmp_path: Path, **overrides) -> dict:
    """Return a test app config over web_data with the thumbnail cache in tmp_path."""
    config = {"TESTING": True, "INDEX_DIR": str(web_data["index"]), "CATALOG_DIR": str(web_data["catalog"]),
              "CHECKPOINT": str(web_data["checkpoint"]), "THUMB_DIR": str(tmp_path / "thumbs"),
              "INDEX_CHECK_INTERVAL": 0}
    config.update(overrides)
    return config


def copy_index(web_data: dict, tmp_path: Path) -> Path:
    """Return a private copy of the index directory (for tests that replace it)."""
    target = tmp_path / "index"
    shutil.copytree(web_data["index"], target)
    return target


@pytest.fixture(scope="module")
def app(web_data, tmp_path_factory):
    """An app over the demo index with search by photo (shared by the tests of a module)."""
    from web import create_app

    return create_app(make_config(web_data, tmp_path_factory.mktemp("instance")))


@pytest.fixture
def client(app):
    """A Flask test client of the shared app."""
    return app.test_client()


@pytest.fixture
def runner(app):
    """A runner for the app's click commands."""
    return app.test_cli_runner()


def photo_bytes(path: Path, fmt: str = "JPEG") -> bytes:
    """Return a catalog image re-encoded in another format (JPEG, PNG, WEBP, GIF)."""
    from PIL import Image

    buffer = io.BytesIO()
    with Image.open(path) as img:
        img.convert("RGB").save(buffer, fmt)
    return buffer.getvalue()


@contextmanager
def served(web_data: dict, tmp_path: Path, limits=None, **config):
    """The app on waitress (serve's limits unless given) on a free loopback port; yields (host, port, url)."""
    from web import create_app
    from web.serve import start_background_server

    server = start_background_server(create_app(make_config(web_data, tmp_path, TESTING=False, **config)),
                                     limits=limits)
    try:
        yield "127.0.0.1", server.server.effective_port, server.url
    finally:
        server.close()


def timed_get(url: str, timeout: float = 15.0) -> tuple[int, float]:
    """GET url; return (status, seconds)."""
    started = time.perf_counter()
    with urllib.request.urlopen(url, timeout=timeout) as response:
        response.read()
        return response.status, time.perf_counter() - started


def script_module(name: str):
    """Import scripts/<name>.py (scripts/ is no package) for tests of its functions."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
