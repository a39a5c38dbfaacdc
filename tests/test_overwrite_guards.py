"""Commands never write over a file the user made: embed's --out, train's --trunk-cache and --out,
and the files they are given by mistake (a checkpoint, labels.csv) are refused, naming the file;
our own work files cut short are started afresh."""
from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest

from conftest import TINY
from retrieval.cli import main as cli

EMBED = ["--device", "cpu", "--workers", "0", "--batch-size", "16"]


def embed(checkpoint, catalog, out, *extra):
    return cli(["embed", "--checkpoint", str(checkpoint), "--catalog", str(catalog), "--out", str(out),
                *EMBED, *extra])


def train(catalog, out, *extra):
    return cli(["train", "--catalog", str(catalog), "--out", str(out), *TINY, *extra])


def snapshot(*paths):
    return {p: p.read_bytes() for p in paths}


# ----------------------------------------------------------------------------- embed --out

def test_embed_refuses_an_out_that_is_its_checkpoint_or_labels(demo_catalog, tiny_run, tmp_path, capsys):
    # before: --out RUN/best.pt (or labels.csv) was replaced by the HDF5 embeddings, exit 0
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    catalog = tmp_path / "cat"
    shutil.copytree(demo_catalog, catalog)
    kept = snapshot(run / "best.pt", catalog / "labels.csv")
    assert embed(run / "best.pt", catalog, run / "best.pt") == 1
    assert f"--out {run / 'best.pt'} is the same file as --checkpoint; give the embeddings a file of their own" \
        in capsys.readouterr().err
    assert embed(run / "best.pt", catalog, catalog / "labels.csv") == 1
    assert "is the same file as the catalog's labels.csv" in capsys.readouterr().err
    assert snapshot(*kept) == kept


def test_embed_refuses_an_out_that_is_another_file(demo_catalog, tiny_run, tmp_path, capsys):
    # before: a copy of labels.csv, a checkpoint or a trunk cache given as --out was overwritten, exit 0
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    shutil.copy(demo_catalog / "labels.csv", tmp_path / "labels-copy.csv")
    kept = snapshot(tmp_path / "labels-copy.csv", run / "last.pt", run / "trunk-cache.h5")
    for path in kept:
        assert embed(run / "best.pt", demo_catalog, path) == 1
        err = capsys.readouterr().err
        assert f"{path} exists and is not an embeddings file" in err and "choose another --out" in err
    assert "it has: ok, paths, prefix" in err  # the trunk cache: HDF5, but not EMB.h5
    assert snapshot(*kept) == kept


def test_embed_still_replaces_an_embeddings_file(demo_catalog, tiny_run, tmp_path):
    out = tmp_path / "emb.h5"
    assert embed(tiny_run / "best.pt", demo_catalog, out) == 0
    first = out.stat().st_mtime_ns
    assert embed(tiny_run / "best.pt", demo_catalog, out) == 0
    assert out.stat().st_mtime_ns == first  # every image unchanged: left as it was
    assert embed(tiny_run / "best.pt", demo_catalog, out, "--reuse", "none") == 0
    assert out.stat().st_mtime_ns != first  # computed again and replaced
    with h5py.File(out) as f:
        assert len(f["ids"]) == 60
    empty = tmp_path / "empty.h5"
    empty.touch()  # nothing to lose
    assert embed(tiny_run / "best.pt", demo_catalog, empty) == 0


# ----------------------------------------------------------------------------- embed work files

def test_embed_starts_afresh_from_a_work_file_cut_short(demo_catalog, tiny_run, tmp_path, caplog, capsys):
    # before: an OSError traceback ("truncated file" / "file signature not found") from open_h5(.., "r+")
    from retrieval.data.embfile import open_partial

    out = tmp_path / "emb.h5"
    partial = tmp_path / "emb.h5.partial"
    f, _ = open_partial(partial, 60, {"vectors": 8}, {}, {"paths": "p", "files": "f"})
    f.close()
    partial.write_bytes(partial.read_bytes()[:1000])  # a kill or a full disk mid-write
    assert embed(tiny_run / "best.pt", demo_catalog, out) == 0
    assert f"Not resuming {partial}: it cannot be read" in caplog.text and "starting from zero" in caplog.text
    assert out.is_file() and not partial.exists()
    # --merge-only says which shard is unreadable (before: the same traceback)
    partial.write_bytes(b"garbage")
    assert embed(tiny_run / "best.pt", demo_catalog, out, "--merge-only") == 1
    assert "emb.h5.partial: unreadable" in capsys.readouterr().err


# ----------------------------------------------------------------------------- train --trunk-cache

def test_train_refuses_a_trunk_cache_path_holding_another_file(demo_catalog, tiny_run, tmp_path, capsys):
    # before: a checkpoint, an EMB.h5 or a CSV given as --trunk-cache was "rebuilt": replaced by a cache, exit 0
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    emb = tmp_path / "emb.h5"
    assert embed(run / "best.pt", demo_catalog, emb) == 0
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:  # an HDF5 file with a 'key' attribute of its own
        f["x"] = np.zeros(3)
        f.attrs["key"] = "not ours"
    shutil.copy(demo_catalog / "labels.csv", tmp_path / "labels.csv")
    kept = snapshot(run / "best.pt", emb, other, tmp_path / "labels.csv")
    for path, why in ((run / "best.pt", "not a readable HDF5 file"), (emb, "an HDF5 file without a trunk cache's key"),
                      (other, "an HDF5 file without a trunk cache's key"), (tmp_path / "labels.csv", "not a readable")):
        assert train(demo_catalog, tmp_path / f"r-{path.name}", "--epochs", "1", "--trunk-cache", str(path)) == 1
        err = capsys.readouterr().err
        assert f"{path} is not a trunk cache ({why}" in err and "it is left as it is" in err
    assert snapshot(*kept) == kept
    # reading one (embed, audit) still falls back to the images, as for any cache that does not serve
    assert embed(run / "best.pt", demo_catalog, tmp_path / "e2.h5", "--trunk-cache", str(other)) == 0
    assert snapshot(*kept) == kept


def test_train_rebuilds_a_trunk_cache_cut_short_or_empty(demo_catalog, tiny_run, tmp_path, caplog):
    # a cache of ours cut short is still rebuilt (the existing test_train test covers 5000 bytes); so is an
    # empty file: nothing to lose
    for name, data in (("cut.h5", (tiny_run / "trunk-cache.h5").read_bytes()[:20000]), ("empty.h5", b"")):
        cache = tmp_path / name
        cache.write_bytes(data)
        assert train(demo_catalog, tmp_path / f"r-{name}", "--epochs", "1", "--trunk-cache", str(cache)) == 0
        with h5py.File(cache) as f:
            assert f.attrs["done"] == 60
    assert "cannot be read" in caplog.text and "rebuilding" in caplog.text


# ----------------------------------------------------------------------------- train --out

def test_train_refuses_a_run_folder_with_best_pt_but_no_last_pt(demo_catalog, tiny_run, tmp_path, capsys):
    # before: trained from the start and overwrote best.pt (and metrics.json), exit 0; with --resume a
    # warning "starting afresh" and the same
    keep = tmp_path / "keep"
    keep.mkdir()
    for name in ("best.pt", "config.yaml", "metrics.json"):
        shutil.copy(tiny_run / name, keep / name)
    kept = snapshot(keep / "best.pt", keep / "metrics.json")
    assert train(demo_catalog, keep, "--epochs", "1") == 1
    assert (f"{keep} already holds a run (best.pt, metrics.json) but no last.pt to resume it from; choose another "
            "--out, or move best.pt and metrics.json away") in capsys.readouterr().err
    assert train(demo_catalog, keep, "--epochs", "1", "--resume") == 1
    assert (f"{keep} has no last.pt to resume from, but holds best.pt, metrics.json, which training from the "
            "start would overwrite") in capsys.readouterr().err
    (keep / "best.pt").unlink()
    assert train(demo_catalog, keep, "--epochs", "1") == 1  # metrics.json alone is a run's too
    assert "already holds a run (metrics.json)" in capsys.readouterr().err
    assert snapshot(keep / "metrics.json") == {keep / "metrics.json": kept[keep / "metrics.json"]}


def test_train_resume_without_any_epoch_says_it_starts_from_the_beginning(demo_catalog, tmp_path, caplog):
    # a run stopped in its first epoch (config.yaml and the trunk cache, no checkpoint) resumes from the start
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("epochs: 1\n")
    assert train(demo_catalog, run, "--epochs", "1", "--resume") == 0
    assert "has no last.pt (no epoch finished): nothing to resume from, training from the start" in caplog.text
    assert (run / "best.pt").is_file()


# ----------------------------------------------------------------------------- train --config

def test_a_config_that_is_not_text_is_named(demo_catalog, tiny_run, tmp_path, capsys):
    # before: "retrieval train: error: 'utf-8' codec can't decode byte 0x80 in position 64", no file named
    with pytest.raises(SystemExit) as exit_:
        train(demo_catalog, tmp_path / "r", "--config", str(tiny_run / "best.pt"))
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"--config {tiny_run / 'best.pt'}: not a YAML text file" in err and "config.yaml" in err
