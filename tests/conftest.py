"""Shared fixtures: a tiny generated catalog, a trained tiny model, the dataset location."""
from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

from retrieval.cli import main as cli

DATASET = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "fashion-product-images"


@pytest.fixture(scope="session")
def demo_catalog(tmp_path_factory) -> Path:
    """A 60-item demo catalog of 64px drawn garments (5 groups, one multi-label)."""
    from retrieval.data.demo import make_demo_catalog

    root = tmp_path_factory.mktemp("demo")
    make_demo_catalog(root, n_items=60, seed=1, image_size=64)
    return root


# --fill-missing off: it would train every run on the demo catalog (missing labels) twice; its own
# tests in test_train.py turn it on
TINY = ["--backbone", "tiny", "--image-size", "64", "--batch-size", "16", "--workers", "0", "--device", "cpu",
        "--fill-missing", "0"]


@pytest.fixture(scope="session")
def tiny_run(demo_catalog, tmp_path_factory) -> Path:
    """A tiny-backbone run trained for two epochs on the demo catalog through the real CLI."""
    run = tmp_path_factory.mktemp("run")
    assert cli(["train", "--catalog", str(demo_catalog), "--out", str(run), "--epochs", "2", *TINY]) == 0
    return run


def write_catalog(root: Path, rows: list[str], header: str = "image,split,title,colour,type", images=None) -> Path:
    """A labels.csv with the given rows and tiny images for every listed (or given) path."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    (root / "labels.csv").write_text("\n".join([header, *rows]) + "\n")
    for name in images if images is not None else [r.split(",")[0] for r in rows]:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (200, 10, 10)).save(path)
    return root


def needs_dataset():
    """Skip marker for tests that read the development catalog."""
    return pytest.mark.skipif(not (DATASET / "labels.csv").exists(),
                              reason=f"development catalog not found at {DATASET}")


os.environ.setdefault("OMP_NUM_THREADS", "2")


@contextmanager
def flock_held(path: Path, pid: str = "777"):
    """Another process holding an exclusive flock on ``path``, with ``pid`` written in it as a holder
    writes its own, for as long as the block runs."""
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, time; "
                               f"fd = os.open({str(path)!r}, os.O_RDWR | os.O_CREAT); "
                               f"fcntl.flock(fd, fcntl.LOCK_EX); os.ftruncate(fd, 0); os.write(fd, b{pid!r}); "
                               "print('held', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield
    finally:
        holder.kill()
        holder.wait()
