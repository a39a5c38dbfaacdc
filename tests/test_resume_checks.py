"""Resumed and cached work is only reused for the images it was made from: an interrupted embed,
the trunk cache and the image cache notice a reordered catalog or a replaced image file."""
import csv
import os
import shutil

import h5py
import numpy as np
import pytest

from retrieval.data.catalog import read_catalog
from retrieval.cli import main as cli


def embed(run, catalog, out, *extra):
    return cli(["embed", "--checkpoint", str(run / "best.pt"), "--catalog", str(catalog), "--out", str(out),
                "--device", "cpu", "--workers", "0", "--batch-size", "16", *extra])


def vectors_by_path(path) -> dict[str, np.ndarray]:
    with h5py.File(path) as f:
        return dict(zip(f["paths"].asstr()[:], f["vectors"][:]))


@pytest.fixture(scope="module")
def reference(tiny_run, demo_catalog, tmp_path_factory) -> dict[str, np.ndarray]:
    """Vectors of the untouched demo catalog, by image path."""
    out = tmp_path_factory.mktemp("reference") / "emb.h5"
    assert embed(tiny_run, demo_catalog, out) == 0
    return vectors_by_path(out)


@pytest.fixture
def catalog(demo_catalog, tmp_path):
    """A copy of the demo catalog (file times preserved) that a test may change."""
    return shutil.copytree(demo_catalog, tmp_path / "cat")


def images(catalog) -> list[str]:
    return [it.image for it in read_catalog(catalog).items]


def replace_image(catalog, victim: str, donor: str) -> None:
    """Overwrite one image file with another's pixels (new size and modification time)."""
    shutil.copyfile(catalog / donor, catalog / victim)
    later = os.stat(catalog / victim).st_mtime_ns + 5_000_000_000
    os.utime(catalog / victim, ns=(later, later))


def reverse_rows(catalog) -> None:
    with open(catalog / "labels.csv", newline="") as f:
        header, *rows = list(csv.reader(f))
    with open(catalog / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([header, *rows[::-1]])


def interrupted_embed(run, catalog, out, monkeypatch):
    """Run embed until it has written two batches of 16, then stop it as a kill would."""
    from retrieval.embed import embedding as embed_module

    real = embed_module.iter_outputs

    def interrupted(*args, **kwargs):
        for n, outputs in enumerate(real(*args, **kwargs)):
            if n == 2 and len(args[2]) > 1:
                raise KeyboardInterrupt
            yield outputs

    monkeypatch.setattr(embed_module, "iter_outputs", interrupted)
    with pytest.raises(KeyboardInterrupt):
        embed(run, catalog, out)
    monkeypatch.setattr(embed_module, "iter_outputs", real)
    assert out.with_name(out.name + ".partial").exists()


def test_embed_restarts_when_rows_were_reordered(tiny_run, catalog, reference, tmp_path, monkeypatch, caplog):
    out = tmp_path / "emb.h5"
    interrupted_embed(tiny_run, catalog, out, monkeypatch)
    reverse_rows(catalog)
    caplog.set_level("INFO")
    assert embed(tiny_run, catalog, out) == 0
    assert "image list or its order changed; starting from zero" in caplog.text and "Resuming" not in caplog.text
    got = vectors_by_path(out)
    assert list(got) == images(catalog)  # reversed order
    for path, vector in got.items():
        assert np.allclose(vector, reference[path], atol=1e-5), path


def test_embed_restarts_when_an_embedded_image_changed(tiny_run, catalog, reference, tmp_path, monkeypatch, caplog):
    out = tmp_path / "emb.h5"
    interrupted_embed(tiny_run, catalog, out, monkeypatch)
    first, donor = images(catalog)[1], images(catalog)[40]  # row 1 was embedded before the interruption
    replace_image(catalog, first, donor)
    caplog.set_level("INFO")
    assert embed(tiny_run, catalog, out) == 0
    assert "image files changed (size or modification time); starting from zero" in caplog.text
    assert np.allclose(vectors_by_path(out)[first], reference[donor], atol=1e-5)


def test_trunk_cache_is_not_used_for_a_replaced_image(tiny_run, catalog, reference, tmp_path, caplog):
    from retrieval.net.trunkcache import cache_key
    from retrieval.net.model import create_model

    cache = shutil.copy(tiny_run / "trunk-cache.h5", tmp_path / "trunk.h5")
    model = create_model("tiny", read_catalog(catalog).vocab, 8, image_size=64)
    key = cache_key(model, 1, read_catalog(catalog).items)
    with h5py.File(cache) as f:
        assert json_field(f.attrs["key"], "files") == json_field(key, "files")  # a copy with its times is the same
    victim, donor = images(catalog)[1], images(catalog)[40]
    replace_image(catalog, victim, donor)
    assert cache_key(model, 1, read_catalog(catalog).items) != key
    assert embed(tiny_run, catalog, tmp_path / "emb.h5", "--trunk-cache", str(cache)) == 0
    assert "does not match this model and catalog" in caplog.text
    assert np.allclose(vectors_by_path(tmp_path / "emb.h5")[victim], reference[donor], atol=1e-5)


def json_field(key: str, name: str):
    import json

    return json.loads(key)[name]


def test_image_cache_notices_a_replaced_image(catalog, tmp_path, caplog):
    from retrieval.data.datasets import ImageCache, ImageDataset
    from retrieval.data.images import load_image, to_uint8_array

    cache = tmp_path / "images.h5"
    build = ["cache", "--catalog", str(catalog), "--out", str(cache), "--image-size", "64", "--workers", "0"]
    assert cli(build) == 0
    victim, donor = images(catalog)[1], images(catalog)[40]
    replace_image(catalog, victim, donor)
    expected = to_uint8_array(load_image(catalog / donor), 64)
    items = read_catalog(catalog).items
    dataset = ImageDataset(read_catalog(catalog), items, 64, ImageCache(cache))
    assert "1 images changed since" in caplog.text
    assert (dataset[1][0].numpy() == expected).all()  # decoded from the new file, not the stale copy
    with h5py.File(cache, "r+") as f:
        f.attrs["done"] = 10  # as if interrupted: a resume would keep the stale row 1
    assert cli(build) == 0
    assert "Not resuming" in caplog.text and "image files changed" in caplog.text
    rebuilt = ImageCache(cache)
    assert rebuilt.serves(items[1]) and (rebuilt.read(victim) == expected).all()


def test_a_second_image_cache_run_of_one_file_is_refused(catalog, tmp_path, capsys):
    """While one `retrieval cache` fills a file, a second of the same file stops at once, naming the
    file and the writer's pid, and leaves the file as it was; once the first is done it runs."""
    from retrieval.atomic import hold_lock

    cache = tmp_path / "images.h5"
    build = ["cache", "--catalog", str(catalog), "--out", str(cache), "--image-size", "64", "--workers", "0"]
    held = hold_lock(tmp_path / ".images.h5.lock")  # as the first run holds it
    assert isinstance(held, int)
    try:
        assert cli(build) != 0
        err = capsys.readouterr().err
        assert str(cache) in err and f"pid {os.getpid()}" in err and "another process" in err
        assert not cache.exists()
    finally:
        os.close(held)
    assert cli(build) == 0
    with h5py.File(cache) as f:
        assert int(f.attrs["done"]) == len(images(catalog)) and f["ok"][:].all()


def test_a_full_disk_is_told_before_the_trunk_pass_and_the_embedding(demo_catalog, tiny_run, tmp_path, monkeypatch,
                                                                       capsys):
    """With too little free space, train and embed stop at once, saying how much they need and where,
    before writing anything (not hours in with a half-written file); with enough they run."""
    from conftest import TINY

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=1000))
    emb = tmp_path / "out" / "emb.h5"
    assert cli(["embed", "--checkpoint", str(tiny_run / "best.pt"), "--catalog", str(demo_catalog), "--out", str(emb),
                "--device", "cpu", "--workers", "0"]) == 1
    err = capsys.readouterr().err
    assert f"embedding {len(read_catalog(demo_catalog))} images" in err and "which has 1.0 kB free" in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    run = tmp_path / "run"
    assert cli(["train", "--catalog", str(demo_catalog), "--out", str(run), "--epochs", "1", *TINY]) == 1
    assert "the trunk cache of" in capsys.readouterr().err and not (run / "last.pt").exists()
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage)
    assert cli(["embed", "--checkpoint", str(tiny_run / "best.pt"), "--catalog", str(demo_catalog), "--out", str(emb),
                "--device", "cpu", "--workers", "0"]) == 0
