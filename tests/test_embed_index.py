"""Embedding a catalog (resume, skipped images, pretrained baseline) and the index commands."""
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from retrieval.data.catalog import read_catalog
from retrieval.net.checkpoint import load_checkpoint
from retrieval.cli import main as cli

ROOT = Path(__file__).resolve().parents[1]


def embed(run, catalog, out, *extra):
    return cli(["embed", "--checkpoint", str(run / "best.pt"), "--catalog", str(catalog), "--out", str(out),
                "--device", "cpu", "--workers", "0", "--batch-size", "16", *extra])


@pytest.fixture(scope="module")
def embeddings(tiny_run, demo_catalog, tmp_path_factory):
    out = tmp_path_factory.mktemp("emb") / "emb.h5"
    assert embed(tiny_run, demo_catalog, out) == 0
    return out


def test_embeddings_file_follows_the_contract(embeddings, tiny_run, demo_catalog):
    catalog = read_catalog(demo_catalog)
    with h5py.File(embeddings) as f:
        vectors = f["vectors"][:]
        # the shared view (matches): the 256-d embedding at length 1/2, then each group's probabilities
        # times the square root of its weight (the checkpoint's, recorded) over sqrt(G), not normalised
        weights = json.loads(f.attrs["shared_view_weights"])
        assert weights == load_checkpoint(tiny_run / "best.pt")["shared_view_weights"]
        assert sorted(weights) == sorted(catalog.groups) and np.isclose(np.mean(list(weights.values())), 1)
        assert json.loads(f.attrs["head_labels"]) == catalog.vocab  # what probs/'s columns are
        probs = np.concatenate([f[f"probs/{g}"][:] * np.sqrt(weights[g]) for g in catalog.groups], axis=1)
        width = 256 + sum(len(catalog.vocab[g]) for g in catalog.groups)
        width += -width % 8  # zero columns
        assert vectors.shape == (60, width) and not vectors[:, 256 + probs.shape[1]:].any()
        assert np.allclose(np.linalg.norm(vectors[:, :256], axis=1), 0.5, atol=1e-5)
        assert np.allclose(vectors[:, 256:256 + probs.shape[1]] * np.sqrt(len(catalog.groups)), probs, atol=1e-5)
        assert f["ids"][:].tolist() == list(range(60))
        assert list(f["paths"].asstr()[:]) == [it.image for it in catalog.items]
        assert f.attrs["fingerprint"] == load_checkpoint(tiny_run / "best.pt")["fingerprint"]
        assert f.attrs["backbone"] == "tiny" and f.attrs["dimension"] == width and f.attrs["created"]
        assert f.attrs["shared_view"] == "matches" and f.attrs["embedding_dim"] == 256
        assert f.attrs["multi_label_view_power"] == 0.5  # how groups/colours below is scaled
        assert sorted(json.loads(f.attrs["groups"])) == sorted(catalog.groups)
        for g in catalog.groups:
            assert f[f"probs/{g}"].shape == (60, len(catalog.vocab[g]))
            probs = f[f"probs/{g}"][:]
            if g in catalog.multi_label_groups():
                probs = probs / np.sqrt(np.linalg.norm(probs, axis=1, keepdims=True))  # |p|^-0.5
            assert np.allclose(f[f"groups/{g}"][:], probs, atol=1e-6)
        assert np.allclose(f["probs/category"][:].sum(1), 1, atol=1e-5)  # single-label: softmax


def test_a_model_trained_for_the_embedding_alone_indexes_the_embedding(embeddings, demo_catalog, tmp_path):
    from conftest import TINY
    from indexer import IndexStore

    run, out = tmp_path / "run", tmp_path / "emb.h5"
    assert cli(["train", "--catalog", str(demo_catalog), "--out", str(run), "--epochs", "1", "--embed-dim", "16",
                "--shared-view", "embedding", *TINY]) == 0
    assert embed(run, demo_catalog, out) == 0
    with h5py.File(out) as f:
        assert f["vectors"].shape == (60, 16) and f.attrs["shared_view"] == "embedding"
    assert cli(["index", "build", "--embeddings", str(out), "--out", str(tmp_path / "index")]) == 0
    assert IndexStore.load(tmp_path / "index").dimension == 16
    # the default model's file gives its embedding back: evaluate --shared-view embedding ranks by it
    report = tmp_path / "report"
    assert cli(["evaluate", "--embeddings", str(embeddings), "--catalog", str(demo_catalog), "--device", "cpu",
                "--shared-view", "embedding", "--out", str(report)]) == 0
    assert json.loads((report / "report.json").read_text())["settings"]["shared_view"] == "embedding"


def test_index_of_the_embedding_alone_from_a_joined_file(embeddings, demo_catalog, tmp_path):
    from indexer import IndexStore
    from retrieval.data.embfile import embedding_part, read_embeddings

    index = tmp_path / "index"
    assert cli(["index", "build", "--embeddings", str(embeddings), "--out", str(index), "--shared-view",
                "embedding"]) == 0
    store = IndexStore.load(index)
    alone = embedding_part(read_embeddings(embeddings))
    assert store.dimension == 256 and store.shared_view == "embedding"
    assert json.loads((index / "sidecar.json").read_text())["shared_view"] == "embedding"
    assert np.allclose(store.vector(7), alone[7:8], atol=1e-6)
    # ranked by the embedding's cosine: the same neighbours as the renormalised first 256 columns
    scores, ids = store.search(alone[:3], 5)
    expected = np.argsort(-(alone[:3] @ alone.T), axis=1, kind="stable")[:, :5]
    assert (ids == expected).all() and np.allclose(scores, np.take_along_axis(alone[:3] @ alone.T, expected, 1), atol=1e-5)
    # add keeps the index's choice: new rows come as the embedding alone, not the file's wider vectors
    assert cli(["index", "remove", "--index", str(index), "--ids", "3", "4"]) == 0
    assert cli(["index", "add", "--index", str(index), "--embeddings", str(embeddings)]) == 0
    again = IndexStore.load(index)
    assert again.item(4)["path"] == read_embeddings(embeddings).paths[4]  # back under the id it had
    assert len(again) == 60 and again.shared_view == "embedding" and np.allclose(again.vector(4), alone[4:5], atol=1e-6)
    # the default reads the file as written and records its view
    assert cli(["index", "build", "--embeddings", str(embeddings), "--out", str(tmp_path / "whole")]) == 0
    whole = IndexStore.load(tmp_path / "whole")
    assert whole.shared_view == "matches" and whole.dimension == read_embeddings(embeddings).vectors.shape[1]


def test_the_matches_shared_view_from_embed_to_index_and_evaluation(embeddings, tiny_run, demo_catalog, tmp_path,
                                                                     caplog, capsys):
    """The default ``matches`` view is indexed and evaluated by the plain inner product; ``embed
    --shared-view with-groups`` embeds the same model's catalogue as the L2-normalised joined view (the
    embedding, each group's view over sqrt(G))."""
    from indexer import IndexStore
    from retrieval.data.embfile import group_vectors, read_embeddings
    from retrieval.evaluate.metrics import evaluate_retrieval

    catalog = read_catalog(demo_catalog)
    emb = read_embeddings(embeddings)
    assert emb.attrs["shared_view"] == "matches"
    assert np.linalg.norm(emb.vectors, axis=1).std() > 1e-3  # lengths differ: no normalisation
    # with-groups from the same model, without training
    other = tmp_path / "with-groups.h5"
    assert embed(tiny_run, demo_catalog, other, "--shared-view", "with-groups") == 0
    with h5py.File(other) as f:
        assert f.attrs["shared_view"] == "with-groups"
        vectors = f["vectors"][:]
        # each group's view as this view joins them: a multi-label group's at unit length (power 1)
        unit = group_vectors({g: f[f"probs/{g}"][:] for g in catalog.groups}, json.loads(f.attrs["sigmoid_groups"]),
                             power=1.0)
        views = np.concatenate([unit[g] for g in catalog.groups], axis=1)
        assert vectors.shape == emb.vectors.shape and not vectors[:, 256 + views.shape[1]:].any()
        assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
        scale = np.sqrt(1 + (views ** 2).sum(1, keepdims=True) / len(catalog.groups))  # |embedding| = 1
        assert np.allclose(np.linalg.norm(vectors[:, :256], axis=1, keepdims=True) * scale, 1, atol=1e-5)
        assert np.allclose(vectors[:, 256:256 + views.shape[1]] * scale * np.sqrt(len(catalog.groups)), views,
                           atol=1e-5)
        # the same embedding in both files
        assert np.allclose(vectors[:, :256] * scale, 2 * emb.vectors[:, :256], atol=1e-5)
    # the index: no "not L2-normalised" warning, searched by the inner product
    with caplog.at_level("WARNING"):
        assert cli(["index", "build", "--embeddings", str(embeddings), "--out", str(tmp_path / "index")]) == 0
    assert "not L2-normalised" not in caplog.text
    store = IndexStore.load(tmp_path / "index")
    assert store.shared_view == "matches"
    scores, ids = store.search(emb.vectors[:3], 6)
    inner = emb.vectors[:3] @ emb.vectors.T
    assert np.allclose(scores, np.take_along_axis(inner, ids, 1), atol=1e-4)
    assert np.allclose(scores, -np.sort(-inner, axis=1)[:, :6], atol=1e-4)
    # add: the with-groups file is the same model's and as wide, but another view: refused, not mixed in
    assert cli(["index", "remove", "--index", str(tmp_path / "index"), "--ids", "3", "4"]) == 0
    capsys.readouterr()
    assert cli(["index", "add", "--index", str(tmp_path / "index"), "--embeddings", str(other)]) == 1
    assert "with-groups.h5: its shared view is 'with-groups', the index's is 'matches'" in capsys.readouterr().err
    assert len(IndexStore.load(tmp_path / "index")) == 58
    assert cli(["index", "add", "--index", str(tmp_path / "index"), "--embeddings", str(embeddings)]) == 0
    store = IndexStore.load(tmp_path / "index")  # the re-added image back under the id it had
    assert store.item(4)["path"] == emb.paths[4] and np.allclose(store.vector(4), emb.vectors[4:5], atol=1e-6)
    # the evaluation: the same maps as the inner product ranks them, the file's view named
    report = tmp_path / "report"
    assert cli(["evaluate", "--embeddings", str(embeddings), "--catalog", str(demo_catalog), "--device", "cpu",
                "--split", "all", "--out", str(report)]) == 0
    written = json.loads((report / "report.json").read_text())
    assert written["settings"]["shared_view"] == "matches"
    labels = {g: [item.labels[g] for item in catalog.items] for g in catalog.groups}
    expected = evaluate_retrieval(emb.vectors, labels, normalise=False)
    for g in catalog.groups:
        assert written["groups"][g]["map_paper"] == pytest.approx(expected["groups"][g]["map_paper"]), g
    capsys.readouterr()
    assert cli(["embed", "--pretrained-only", "--shared-view", "matches", "--catalog", str(demo_catalog),
                "--out", str(tmp_path / "x.h5")]) == 1
    assert "--shared-view needs --checkpoint" in capsys.readouterr().err


def test_trunk_cache_gives_the_same_embeddings(embeddings, tiny_run, demo_catalog, tmp_path):
    out = tmp_path / "cached.h5"
    assert embed(tiny_run, demo_catalog, out, "--trunk-cache", str(tiny_run / "trunk-cache.h5")) == 0
    with h5py.File(embeddings) as a, h5py.File(out) as b:
        # the cache holds float16 trunk outputs: close, not bit-equal
        assert np.abs(a["vectors"][:] - b["vectors"][:]).max() < 2e-2


def test_interrupted_embedding_resumes(embeddings, tiny_run, demo_catalog, tmp_path, monkeypatch, caplog):
    from retrieval.embed import embedding as embed_module

    real = embed_module.iter_outputs

    def interrupted(*args, **kwargs):
        for n, outputs in enumerate(real(*args, **kwargs)):
            if n == 2 and len(args[2]) > 1:
                raise KeyboardInterrupt  # killed after two batches
            yield outputs

    caplog.set_level("INFO")
    out = tmp_path / "emb.h5"
    monkeypatch.setattr(embed_module, "iter_outputs", interrupted)
    with pytest.raises(KeyboardInterrupt):
        embed(tiny_run, demo_catalog, out)
    assert not out.exists() and out.with_name("emb.h5.partial").exists()
    monkeypatch.setattr(embed_module, "iter_outputs", real)
    assert embed(tiny_run, demo_catalog, out) == 0
    assert "Resuming" in caplog.text and "at 32/60" in caplog.text
    assert not out.with_name("emb.h5.partial").exists()
    with h5py.File(out) as g, h5py.File(embeddings) as f:
        assert np.allclose(g["vectors"][:], f["vectors"][:], atol=1e-6)
        assert np.allclose(g["groups/colours"][:], f["groups/colours"][:], atol=1e-6)


def test_unreadable_images_are_listed_and_skipped(tiny_run, demo_catalog, tmp_path):
    catalog = tmp_path / "cat"
    shutil.copytree(demo_catalog, catalog)
    victim = sorted((catalog / "images").glob("*.jpg"))[3]
    victim.write_bytes(b"\xff\xd8 truncated")
    assert embed(tiny_run, catalog, tmp_path / "e.h5") == 0
    with h5py.File(tmp_path / "e.h5") as f:
        assert len(f["vectors"]) == 59
        assert json.loads(f.attrs["skipped"]) == [f"images/{victim.name}"]
        assert 3 not in f["ids"][:].tolist()


def test_pretrained_only_baseline(demo_catalog, tmp_path):
    out = tmp_path / "base.h5"
    assert cli(["embed", "--pretrained-only", "--backbone", "tiny", "--image-size", "64", "--catalog",
                str(demo_catalog), "--out", str(out), "--device", "cpu", "--workers", "0"]) == 0
    with h5py.File(out) as f:
        assert f["vectors"].shape == (60, 32) and "groups" not in f
        assert f.attrs["fingerprint"].startswith("pretrained:tiny")
    assert cli(["embed", "--catalog", str(demo_catalog), "--out", str(out)]) == 1  # neither mode given


def test_index_build_add_remove(embeddings, demo_catalog, tmp_path):
    from indexer import IndexStore

    index = tmp_path / "index"
    assert cli(["index", "build", "--embeddings", str(embeddings), "--out", str(index)]) == 0
    store = IndexStore.load(index)
    assert len(store) == 60 and "group-colours" in store.views
    with h5py.File(embeddings) as f:
        assert store.fingerprint == f.attrs["fingerprint"]
    item = store.item(0)
    catalog = read_catalog(demo_catalog)
    assert item["title"] == catalog.items[0].title
    assert item["labels"]["category"] == list(catalog.items[0].labels["category"])
    assert cli(["index", "remove", "--index", str(index), "--paths", catalog.items[5].image, "--ids", "7"]) == 0
    store = IndexStore.load(index)
    assert len(store) == 58 and not {5, 7} & set(store.ids.tolist())
    assert cli(["index", "add", "--index", str(index), "--embeddings", str(embeddings)]) == 0
    store = IndexStore.load(index)
    assert len(store) == 60
    scores, ids = store.search(np.eye(1, store.dimension, dtype=np.float32), 5, filters={"gender": ["women"]})
    assert all("women" in store.item(i)["labels"]["gender"] for i in ids[0] if i >= 0)
    # a day's list of withdrawn products run again: what is gone is said, the rest removed, nothing saved
    before = (index / "sidecar.json").read_bytes()
    assert cli(["index", "remove", "--index", str(index), "--paths", "images/nope.jpg", "--ids", "999"]) == 0
    assert (index / "sidecar.json").read_bytes() == before
    assert cli(["index", "remove", "--index", str(index)]) == 1  # nothing given


def test_index_add_updates_the_items_whose_labels_title_or_photo_changed(embeddings, demo_catalog, tmp_path, caplog,
                                                                         capsys):
    # a label corrected, a title changed, a photo shot again under its name: "Added 0 items", the index
    # kept the old labels and vector while the web page showed the new photo; an add with nothing new
    # rewrote every file (and every server reloaded)
    from indexer import IndexStore

    index = tmp_path / "index"
    assert cli(["index", "build", "--embeddings", str(embeddings), "--out", str(index)]) == 0
    stamp = (index / "sidecar.json").read_bytes()
    assert cli(["index", "add", "--index", str(index), "--embeddings", str(embeddings)]) == 0
    assert "Nothing to add or update" in capsys.readouterr().out
    assert (index / "sidecar.json").read_bytes() == stamp  # left as it was
    catalog = tmp_path / "catalog"
    shutil.copytree(demo_catalog, catalog)
    lines = (catalog / "labels.csv").read_text().splitlines()
    header = lines[0].split(",")
    row = lines[3].split(",")  # item 2: its category corrected
    row[header.index("category")] = "corrected"
    lines[3] = ",".join(row)
    row = lines[5].split(",")  # item 4: its title
    row[header.index("title")] = "a new title"
    lines[5] = ",".join(row)
    (catalog / "labels.csv").write_text("\n".join(lines) + "\n")
    shot = tmp_path / "shot.h5"  # item 9's photo shot again: its vectors in the embeddings file change
    shutil.copy(embeddings, shot)
    with h5py.File(shot, "r+") as f:
        f["vectors"][9] = f["vectors"][10]
        for name in f["groups"]:
            f["groups"][name][9] = f["groups"][name][10]
    assert cli(["index", "add", "--index", str(index), "--embeddings", str(shot), "--catalog", str(catalog)]) == 0
    out = capsys.readouterr().out
    assert "Added 0 items to" in out and "updated 3 (a label, title or photo changed)" in out
    store = IndexStore.load(index)
    assert len(store) == 60 and sorted(store.ids.tolist()) == list(range(60))  # the same ids: links keep working
    assert store.item(2)["labels"]["category"] == ["corrected"] and store.item(4)["title"] == "a new title"
    with h5py.File(shot) as f:
        assert np.allclose(store.vector(9), f["vectors"][10][None, :store.dimension], atol=1e-5)
    assert store.search(store.vector(9), 1, filters={"category": ["corrected"]})[1][0, 0] == 2
    assert cli(["index", "add", "--index", str(index), "--embeddings", str(shot), "--catalog", str(catalog)]) == 0
    assert "Nothing to add or update" in capsys.readouterr().out


def test_index_add_knows_an_item_by_its_image_not_its_row(embeddings, tmp_path, caplog):
    # a catalogue whose rows moved (new ones inserted first) or a file of the new rows alone: row ids
    # name other images than the index's; the images already held stay, the new ones come in
    from indexer import IndexStore
    from retrieval.commands.index import new_items
    from retrieval.data.embfile import read_embeddings

    index = tmp_path / "index"
    assert cli(["index", "build", "--embeddings", str(embeddings), "--out", str(index)]) == 0
    assert cli(["index", "remove", "--index", str(index), "--ids", "0", "1", "2"]) == 0
    moved = tmp_path / "moved.h5"
    shutil.copy(embeddings, moved)
    with h5py.File(moved, "r+") as f:  # the same rows, listed under ids 3.. (removed ones 0-2 now 57-59)
        f["ids"][...] = (f["ids"][:] - 3) % 60
    assert cli(["index", "add", "--index", str(index), "--embeddings", str(moved)]) == 0
    store = IndexStore.load(index)
    first = read_embeddings(embeddings)
    assert len(store) == 60 and sorted(store.paths) == sorted(first.paths)
    back = {p: i for p, i in zip(store.paths, store.ids.tolist())}
    assert [back[p] for p in first.paths[:3]] == [0, 1, 2]  # withdrawn before: back under the ids they had
    assert np.allclose(store.vector(0), first.vectors[:1], atol=1e-3)
    assert all(back[p] == i for p, i in zip(first.paths[3:], range(3, 60)))  # the held images kept theirs
    assert cli(["index", "add", "--index", str(index), "--embeddings", str(moved)]) == 0  # nothing new
    assert len(IndexStore.load(index)) == 60
    new, ids = new_items(["a", "b", "c"], ["b", "x"], 10, {})  # numbered above every id the index gave
    assert new.tolist() == [0, 2] and ids.tolist() == [10, 11]


def test_a_new_build_keeps_each_images_id(embeddings, tmp_path):
    # rebuild_index.sh after rows were inserted, sorted or removed: items were numbered by catalog row,
    # so yesterday's /items/ID links opened other products (84-127 of 148 renumbered a rebuild)
    from indexer import IndexStore
    from retrieval.data.embfile import read_embeddings

    index = tmp_path / "index"
    assert cli(["index", "build", "--embeddings", str(embeddings), "--out", str(index)]) == 0
    first = {p: i for p, i in zip(IndexStore.load(index).paths, IndexStore.load(index).ids.tolist())}
    moved = tmp_path / "moved.h5"  # tomorrow's file: rows reversed, the first five rows withdrawn
    emb = read_embeddings(embeddings)
    keep = np.arange(5, 60)[::-1]
    with h5py.File(moved, "w") as f:
        with h5py.File(embeddings) as src:
            for key, value in src.attrs.items():
                f.attrs[key] = value
            f["vectors"] = src["vectors"][:][keep]
            for name in src["groups"]:
                f[f"groups/{name}"] = src["groups"][name][:][keep]
            for name in src.get("probs", {}):
                f[f"probs/{name}"] = src["probs"][name][:][keep]
        f["ids"] = np.arange(len(keep))  # their new row ids
        f["paths"] = np.array([emb.paths[i] for i in keep], dtype=h5py.string_dtype())
    from indexer.stale import HOST

    gone = subprocess.Popen(["true"])
    gone.wait()
    index.rename(tmp_path / f".index.old-{HOST}-{gone.pid}-0a1b2c3d")  # a swap killed between its renames
    assert cli(["index", "build", "--embeddings", str(moved), "--out", str(index)]) == 0
    store = IndexStore.load(index)
    assert {p: i for p, i in zip(store.paths, store.ids.tolist())} == {p: first[p] for p in store.paths}
    assert len(store) == 55 and store.item(first[emb.paths[30]])["path"] == emb.paths[30]
    assert store.retired == {emb.paths[i]: i for i in range(5)}  # the withdrawn images keep their ids
    # a withdrawn image listed again takes the id it had (0: its old links work again), and the image
    # whose row it takes (59) is withdrawn in turn, keeping its id; nothing new: next_id stays 60
    with h5py.File(moved, "r+") as f:
        paths = f["paths"].asstr()[:].tolist()
        del f["paths"]
        f["paths"] = np.array([emb.paths[0], *paths[1:]], dtype=h5py.string_dtype())
    assert cli(["index", "build", "--embeddings", str(moved), "--out", str(index)]) == 0
    store = IndexStore.load(index)
    assert dict(zip(store.paths, store.ids.tolist()))[emb.paths[0]] == 0
    assert store.retired == {emb.paths[i]: i for i in (1, 2, 3, 4, 59)}
    assert json.loads((index / "sidecar.json").read_text())["next_id"] == 60
    fresh = tmp_path / "fresh"  # no index there: numbered by row as before
    assert cli(["index", "build", "--embeddings", str(moved), "--out", str(fresh)]) == 0
    assert IndexStore.load(fresh).ids.tolist() == list(range(55))


def write_rows(embeddings: Path, out: Path, rows, paths=None) -> Path:
    """An embeddings file of some rows of another (in the order given), numbered 0.. and under the given
    image paths (theirs by default): a later day's catalogue, with products withdrawn, re-listed or new."""
    with h5py.File(embeddings) as src, h5py.File(out, "w") as f:
        for key, value in src.attrs.items():
            f.attrs[key] = value
        f["vectors"] = src["vectors"][:][rows]
        for group in ("groups", "probs"):
            for name in src.get(group, {}):
                f[f"{group}/{name}"] = src[group][name][:][rows]
        f["ids"] = np.arange(len(rows))
        f["paths"] = np.array(src["paths"].asstr()[:][rows].tolist() if paths is None else paths,
                              dtype=h5py.string_dtype())
    return out


def with_new_products(demo_catalog: Path, root: Path, count: int) -> Path:
    """A copy of the demo catalog listing ``count`` new images, ``new<k>.png``, labelled as item k."""
    shutil.copytree(demo_catalog, root)
    lines = (root / "labels.csv").read_text().splitlines()
    lines += [",".join([f"new{k}.png", *lines[1 + k].split(",")[1:]]) for k in range(count)]
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root


def test_a_withdrawn_product_added_again_gets_its_id_back(embeddings, demo_catalog, tmp_path, capsys):
    # a seasonal product withdrawn (index remove) and listed again (index add) came back under a new id:
    # its old /items/ID link stayed a 404 for good; now the index keeps the id of every image it held
    # ("retired" in the sidecar) and the image takes it again; new images are numbered from next_id
    from web import create_app
    from indexer import IndexStore
    from retrieval.data.embfile import read_embeddings

    emb = read_embeddings(embeddings)
    index = tmp_path / "index"
    assert cli(["index", "build", "--embeddings", str(embeddings), "--out", str(index)]) == 0
    client = create_app({"TESTING": True, "INDEX_DIR": str(index), "CATALOG_DIR": str(demo_catalog), "CHECKPOINT": None,
                         "THUMB_DIR": str(tmp_path / "thumbs"), "INDEX_CHECK_INTERVAL": 0}).test_client()
    assert client.get("/api/items/5").get_json()["path"] == emb.paths[5]
    assert cli(["index", "remove", "--index", str(index), "--paths", emb.paths[5], "--ids", "7"]) == 0
    side = json.loads((index / "sidecar.json").read_text())
    assert side["retired"] == {"paths": sorted([emb.paths[5], emb.paths[7]]),
                               "ids": [i for _, i in sorted([(emb.paths[5], 5), (emb.paths[7], 7)])]}
    assert side["next_id"] == 60 and client.get("/api/items/5").status_code == 404  # withdrawn: a 404
    # the day's file: two new products listed first, then the two re-listed ones
    catalog = with_new_products(demo_catalog, tmp_path / "catalog", 2)
    again = write_rows(embeddings, tmp_path / "again.h5", [20, 7, 21, 5], ["new0.png", emb.paths[7], "new1.png",
                                                                           emb.paths[5]])
    capsys.readouterr()
    assert cli(["index", "add", "--index", str(index), "--embeddings", str(again), "--catalog", str(catalog)]) == 0
    assert "Added 4 items to" in capsys.readouterr().out
    store = IndexStore.load(index)
    by_path = dict(zip(store.paths, store.ids.tolist()))
    assert by_path[emb.paths[5]] == 5 and by_path[emb.paths[7]] == 7  # back under the ids they had
    assert by_path["new0.png"] == 60 and by_path["new1.png"] == 61 and store.next_id == 62
    assert store.retired == {} and "retired" not in json.loads((index / "sidecar.json").read_text())
    assert np.allclose(store.vector(5), emb.vectors[5:6], atol=1e-6) and store.search(emb.vectors[5:6], 1)[1][0, 0] == 5
    for item_id, path in ((5, emb.paths[5]), (7, emb.paths[7]), (60, "new0.png")):
        assert client.get(f"/api/items/{item_id}").get_json()["path"] == path  # the old link works again


def test_a_rebuild_gives_a_product_left_out_and_listed_again_its_id_back(embeddings, demo_catalog, tmp_path):
    # scripts/rebuild_index.sh over a catalogue that dropped a product, then over one that lists it again:
    # the second build numbered it from next_id
    from indexer import IndexStore
    from retrieval.data.embfile import read_embeddings

    emb = read_embeddings(embeddings)
    index = tmp_path / "index"
    assert cli(["index", "build", "--embeddings", str(embeddings), "--out", str(index)]) == 0
    without = write_rows(embeddings, tmp_path / "without.h5", [r for r in range(60) if r not in (3, 10)])
    assert cli(["index", "build", "--embeddings", str(without), "--out", str(index)]) == 0
    store = IndexStore.load(index)
    assert len(store) == 58 and store.retired == {emb.paths[3]: 3, emb.paths[10]: 10} and store.next_id == 60
    assert IndexStore.read_items(index)[2] == store.retired
    # a day later: product 10 listed again behind a new one, product 3 still withdrawn
    catalog = with_new_products(demo_catalog, tmp_path / "catalog", 1)
    rows = [20, *(r for r in range(60) if r != 3)]
    back = write_rows(embeddings, tmp_path / "back.h5", rows, ["new0.png", *(emb.paths[r] for r in rows[1:])])
    assert cli(["index", "build", "--embeddings", str(back), "--out", str(index), "--catalog", str(catalog)]) == 0
    store = IndexStore.load(index)
    by_path = dict(zip(store.paths, store.ids.tolist()))
    assert by_path[emb.paths[10]] == 10 and by_path["new0.png"] == 60 and store.next_id == 61
    assert store.retired == {emb.paths[3]: 3}  # withdrawn before this build, still
    assert all(by_path[emb.paths[r]] == r for r in range(60) if r != 3)
    assert cli(["index", "build", "--embeddings", str(embeddings), "--out", str(index)]) == 0  # the whole catalogue
    store = IndexStore.load(index)
    assert dict(zip(store.paths, store.ids.tolist()))[emb.paths[3]] == 3
    assert store.retired == {"new0.png": 60} and store.item(3)["path"] == emb.paths[3]


def test_a_retired_id_is_never_given_to_another_path(embeddings, demo_catalog, tmp_path):
    # a product withdrawn keeps its id while away: a new image listed before it, or in its catalogue row,
    # is numbered from next_id, in an add as in a build
    from indexer import IndexStore
    from retrieval.commands.index import new_items
    from retrieval.data.embfile import read_embeddings

    new, ids = new_items(["x", "a", "y", "b"], ["b"], 10, {"a": 3, "z": 4})
    assert new.tolist() == [0, 1, 2] and ids.tolist() == [10, 3, 11]
    emb = read_embeddings(embeddings)
    catalog = with_new_products(demo_catalog, tmp_path / "catalog", 3)
    index = tmp_path / "index"
    assert cli(["index", "build", "--embeddings", str(embeddings), "--out", str(index)]) == 0
    assert cli(["index", "remove", "--index", str(index), "--ids", "0", "5"]) == 0
    first = write_rows(embeddings, tmp_path / "first.h5", [20, 21, 5], ["new0.png", "new1.png", emb.paths[5]])
    assert cli(["index", "add", "--index", str(index), "--embeddings", str(first), "--catalog", str(catalog)]) == 0
    store = IndexStore.load(index)
    by_path = dict(zip(store.paths, store.ids.tolist()))
    assert [by_path[p] for p in ("new0.png", "new1.png", emb.paths[5])] == [60, 61, 5]
    assert store.retired == {emb.paths[0]: 0}
    # a build whose file lists a new image in the withdrawn product's row: not its id (nor its row id, 0)
    rows = list(range(60))
    paths = ["new2.png", *emb.paths[1:], "new0.png", "new1.png"]
    swapped = write_rows(embeddings, tmp_path / "swapped.h5", rows + [20, 21], paths)
    assert cli(["index", "build", "--embeddings", str(swapped), "--out", str(index), "--catalog", str(catalog)]) == 0
    store = IndexStore.load(index)
    by_path = dict(zip(store.paths, store.ids.tolist()))
    assert by_path["new2.png"] == 62 and 0 not in store.ids.tolist() and store.retired == {emb.paths[0]: 0}
    assert store.next_id == 63 and sorted(by_path.values()) == list(range(1, 63))


def test_an_index_saved_before_the_retired_record_loads_and_gets_it_on_its_next_save(embeddings, tmp_path):
    from indexer import IndexStore
    from retrieval.data.embfile import read_embeddings

    emb = read_embeddings(embeddings)
    index = tmp_path / "index"
    assert cli(["index", "build", "--embeddings", str(embeddings), "--out", str(index)]) == 0
    assert cli(["index", "remove", "--index", str(index), "--ids", "3"]) == 0
    side = json.loads((index / "sidecar.json").read_text())
    del side["retired"]  # as an index saved before the record: item 3 withdrawn then, its path not kept
    (index / "sidecar.json").write_text(json.dumps(side))
    for mmap in (False, True):
        store = IndexStore.load(index, mmap=mmap)
        assert store.retired == {} and len(store) == 59 and store.next_id == 60
        assert set(store.search(emb.vectors[:1], 59)[1][0].tolist()) == set(range(60)) - {3}
    assert IndexStore.read_items(index)[1:] == (60, {})
    assert cli(["index", "remove", "--index", str(index), "--ids", "4"]) == 0
    assert json.loads((index / "sidecar.json").read_text())["retired"] == {"paths": [emb.paths[4]], "ids": [4]}
    assert cli(["index", "add", "--index", str(index), "--embeddings", str(embeddings)]) == 0
    by_path = dict(zip(IndexStore.load(index).paths, IndexStore.load(index).ids.tolist()))
    assert by_path[emb.paths[4]] == 4  # withdrawn since the record: back under its id
    assert by_path[emb.paths[3]] == 60  # withdrawn before it: its id unknown, a new one (never another's)


@pytest.mark.parametrize("record, why", [
    (["images/a.jpg"], "retired is a list, not an object {\"paths\": [image paths], \"ids\": [ids]}"),
    ({"paths": ["images/a.jpg"]}, "retired is an object without the lists 'paths' and 'ids'"),
    ({"paths": ["images/a.jpg", 7], "ids": [1, 2]}, "retired.paths[1] is 7, not an image path"),
    ({"paths": ["images/a.jpg", "images/b.jpg"], "ids": [1, "2"]}, "retired.ids[1] is '2', not an id"),
    ({"paths": ["images/a.jpg"], "ids": [-1]}, "retired.ids[0] is -1, not an id"),
    ({"paths": ["images/a.jpg"], "ids": [True]}, "retired.ids[0] is True, not an id"),
    ({"paths": ["images/a.jpg", "images/b.jpg"], "ids": [1, 1]}, "retired.ids lists 1 twice"),
    ({"paths": ["images/a.jpg", "images/a.jpg"], "ids": [1, 2]}, "retired.paths lists 'images/a.jpg' twice"),
    ({"paths": ["images/a.jpg"], "ids": [1, 2]}, "retired.paths has 1 entries, retired.ids 2"),
])
def test_a_malformed_retired_record_names_the_file_and_field(embeddings, tmp_path, capsys, record, why):
    from indexer import IndexStore

    index = tmp_path / "index"
    assert cli(["index", "build", "--embeddings", str(embeddings), "--out", str(index)]) == 0
    side = json.loads((index / "sidecar.json").read_text())
    (index / "sidecar.json").write_text(json.dumps({**side, "retired": record}))
    message = f"Corrupt index sidecar {index / 'sidecar.json'}: {why}"
    for read in (IndexStore.load, IndexStore.read_items):
        with pytest.raises(ValueError) as err:
            read(index)
        assert message in str(err.value)
    capsys.readouterr()
    assert cli(["index", "add", "--index", str(index), "--embeddings", str(embeddings)]) == 1
    assert message in capsys.readouterr().err


def test_a_build_over_an_index_with_a_malformed_retired_record_keeps_the_held_ids(embeddings, tmp_path, caplog):
    """A bad retired record (a hand edit) costs only the withdrawn products' old ids: a build over the
    index keeps every held image's id (it renumbered the whole index by catalog row, a review found),
    says why, and writes a sound record; the returning product takes an id above every one given."""
    from indexer import IndexStore
    from retrieval.data.embfile import read_embeddings

    index = tmp_path / "index"
    assert cli(["index", "build", "--embeddings", str(embeddings), "--out", str(index)]) == 0
    assert cli(["index", "remove", "--index", str(index), "--ids", "3"]) == 0
    side = json.loads((index / "sidecar.json").read_text())
    (index / "sidecar.json").write_text(json.dumps({**side, "retired": {"paths": side["retired"]["paths"],
                                                                        "ids": [-1]}}))
    reversed_rows = write_rows(embeddings, tmp_path / "reversed.h5", list(range(59, -1, -1)))
    assert cli(["index", "build", "--embeddings", str(reversed_rows), "--out", str(index)]) == 0
    assert "retired.ids[0]" in caplog.text and "products withdrawn before come back under new ids" in caplog.text
    store = IndexStore.load(index)
    paths = read_embeddings(embeddings).paths
    by_path = dict(zip(store.paths, store.ids.tolist()))
    assert all(by_path[p] == i for i, p in enumerate(paths) if i != 3)  # every held image as it was
    assert by_path[paths[3]] == 60 and store.next_id == 61 and store.retired == {}


def test_an_updated_item_keeps_its_id_and_is_not_retired(embeddings, demo_catalog, tmp_path, capsys):
    # index add takes a changed item out and puts it back under its id at once: it is held, not withdrawn
    from indexer import IndexStore
    from retrieval.data.embfile import read_embeddings

    emb = read_embeddings(embeddings)
    index = tmp_path / "index"
    assert cli(["index", "build", "--embeddings", str(embeddings), "--out", str(index)]) == 0
    assert cli(["index", "remove", "--index", str(index), "--ids", "3"]) == 0
    catalog = tmp_path / "catalog"
    shutil.copytree(demo_catalog, catalog)
    lines = (catalog / "labels.csv").read_text().splitlines()
    row = lines[3].split(",")  # item 2: its title changed
    row[lines[0].split(",").index("title")] = "a new title"
    lines[3] = ",".join(row)
    (catalog / "labels.csv").write_text("\n".join(lines) + "\n")
    capsys.readouterr()
    assert cli(["index", "add", "--index", str(index), "--embeddings", str(embeddings), "--catalog", str(catalog)]) == 0
    out = capsys.readouterr().out
    assert "Added 1 items to" in out and "(1 withdrawn before, back under their ids) and updated 1" in out
    store = IndexStore.load(index)
    assert store.item(2)["title"] == "a new title" and store.item(2)["path"] == emb.paths[2]
    assert store.item(3)["path"] == emb.paths[3] and sorted(store.ids.tolist()) == list(range(60))
    assert store.retired == {} and "retired" not in json.loads((index / "sidecar.json").read_text())
    assert store.next_id == 60


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw", "ivfpq"])
def test_a_returning_id_works_for_every_index_type(embeddings, tmp_path, monkeypatch, kind):
    # HNSW cannot delete nodes (a removed id stays in its graph until it is rebuilt); IVF and IVF-PQ
    # remove through their direct map: an id taken out and given back must be searchable once, in each
    import indexer.build
    from indexer import IndexStore
    from retrieval.data.embfile import read_embeddings

    monkeypatch.setattr(indexer.build, "MIN_TRAIN_ITEMS", 20)  # 60 items train IVF / IVF-PQ
    emb = read_embeddings(embeddings)
    index = tmp_path / "index"
    assert cli(["index", "build", "--embeddings", str(embeddings), "--out", str(index), "--type", kind]) == 0
    stored = IndexStore.load(index).vectors([5, 7])  # as the view stores them (IVF-PQ: its codes)
    assert cli(["index", "remove", "--index", str(index), "--ids", "5", "7"]) == 0
    store = IndexStore.load(index)
    assert store.index_type == kind and store.retired == {emb.paths[5]: 5, emb.paths[7]: 7}
    assert store.views["shared"].ntotal == (60 if kind == "hnsw" else 58)  # HNSW: hidden, not deleted
    assert cli(["index", "add", "--index", str(index), "--embeddings", str(embeddings)]) == 0
    store = IndexStore.load(index, mmap=True)
    assert store.index_type == kind and sorted(store.ids.tolist()) == list(range(60)) and store.retired == {}
    assert store.views["shared"].ntotal == 60  # HNSW: rebuilt without the hidden nodes before they came back
    assert np.allclose(store.vectors([5, 7]), stored, atol=1e-5)
    scores, found = store.search(stored, 60)
    assert (found >= 0).all() and all(len(set(row.tolist())) == 60 for row in found)  # each id once
    # every id found scores as its own vector: the returning ids name their items' vectors
    assert np.allclose(scores, np.take_along_axis(stored @ store.vectors(np.arange(60)).T, found, 1), atol=1e-3)
    assert store.item(5)["path"] == emb.paths[5] and store.item(7)["path"] == emb.paths[7]


def test_index_add_leaves_out_a_group_the_catalog_gained_since_the_build(embeddings, demo_catalog, tmp_path, caplog):
    from indexer import IndexStore

    index = tmp_path / "index"
    assert cli(["index", "build", "--embeddings", str(embeddings), "--out", str(index)]) == 0
    assert cli(["index", "remove", "--index", str(index), "--ids", "0", "1"]) == 0
    grown = tmp_path / "grown"
    shutil.copytree(demo_catalog, grown)
    lines = (grown / "labels.csv").read_text().splitlines()
    (grown / "labels.csv").write_text("\n".join([lines[0] + ",material", *(f"{line},cotton" for line in lines[1:])]) + "\n")
    assert cli(["index", "add", "--index", str(index), "--embeddings", str(embeddings), "--catalog", str(grown)]) == 0
    store = IndexStore.load(index)
    assert len(store) == 60 and "material" not in store.vocabulary()
    assert "group(s) 'material' are not in the index" in caplog.text


def test_index_build_add_and_remove_wait_for_no_one_else_changing_the_index(embeddings, tmp_path, capsys):
    # two adds at once each read the same index and the last save dropped the other's items (both said
    # "Added 10 items"); the lock is the one scripts/rebuild_index.sh holds
    from conftest import flock_held
    from indexer import IndexStore

    index = tmp_path / "index"
    assert cli(["index", "build", "--embeddings", str(embeddings), "--out", str(index)]) == 0
    assert cli(["index", "remove", "--index", str(index), "--ids", "0"]) == 0
    with flock_held(tmp_path / ".index.lock"):
        capsys.readouterr()
        for argv in (["add", "--embeddings", str(embeddings)], ["remove", "--ids", "1"]):
            assert cli(["index", argv[0], "--index", str(index), *argv[1:]]) == 1
            assert "is being changed by another process (pid 777" in capsys.readouterr().err
        # a build during an add was lost when the add saved; it waits for the lock too
        assert cli(["index", "build", "--embeddings", str(embeddings), "--out", str(index)]) == 1
        assert "is being changed by another process (pid 777" in capsys.readouterr().err
        assert len(IndexStore.load(index)) == 59  # untouched
    assert cli(["index", "add", "--index", str(index), "--embeddings", str(embeddings)]) == 0
    # a file given as the index left its lock file beside it (in a catalog: .labels.csv.lock)
    notes = tmp_path / "notes" / "labels.csv"
    notes.parent.mkdir()
    notes.write_text("image\n")
    assert cli(["index", "remove", "--index", str(notes), "--ids", "1"]) == 1
    assert f"{notes} is a file, not an index folder" in capsys.readouterr().err
    assert sorted(p.name for p in notes.parent.iterdir()) == ["labels.csv"]


def test_embed_warns_when_the_checkpoint_and_the_catalog_have_other_groups(tiny_run, demo_catalog, tmp_path, caplog):
    # the index then has a group-gender view while its filters come from the catalog: said nowhere before
    catalog = tmp_path / "cat"
    shutil.copytree(demo_catalog, catalog)
    rows = [line.split(",") for line in (catalog / "labels.csv").read_text().splitlines()]
    drop = rows[0].index("gender")
    (catalog / "labels.csv").write_text("\n".join(",".join(r[:drop] + r[drop + 1:]) for r in rows) + "\n")
    assert embed(tiny_run, catalog, tmp_path / "e.h5") == 0
    assert "was trained on groups category, colours, pattern, sleeve, gender, the catalog has category, colours, " \
           "pattern, sleeve: group views follow the model" in caplog.text


def test_index_add_refuses_other_model(embeddings, tmp_path):
    index = tmp_path / "index"
    assert cli(["index", "build", "--embeddings", str(embeddings), "--out", str(index)]) == 0
    other = tmp_path / "other.h5"
    shutil.copy(embeddings, other)
    with h5py.File(other, "r+") as f:
        f.attrs["fingerprint"] = "0" * 64
    assert cli(["index", "add", "--index", str(index), "--embeddings", str(other)]) == 1


def test_index_add_refuses_group_views_of_another_rule(embeddings, tmp_path, capsys):
    """A file embedded before the multi-label group views were scaled by |p|^-0.5 (no attribute, its
    views at unit length) is not mixed into an index of today's files, nor today's into its index."""
    from indexer import IndexStore
    from retrieval.data.embfile import MULTI_LABEL_VIEW_ATTR, MULTI_LABEL_VIEW_POWER

    with h5py.File(embeddings) as f:
        assert f.attrs[MULTI_LABEL_VIEW_ATTR] == MULTI_LABEL_VIEW_POWER == 0.5  # the demo's colours are multi-label
        colours = f["groups/colours"][:]
        probs = f["probs/colours"][:]
    length = np.linalg.norm(probs, axis=1, keepdims=True)
    assert np.allclose(colours, probs / np.sqrt(length), atol=1e-6)
    old = tmp_path / "old.h5"
    shutil.copy(embeddings, old)
    with h5py.File(old, "r+") as f:
        del f.attrs[MULTI_LABEL_VIEW_ATTR]
        f["groups/colours"][:] = probs / length
    index, old_index = tmp_path / "index", tmp_path / "old-index"
    assert cli(["index", "build", "--embeddings", str(embeddings), "--out", str(index)]) == 0
    assert cli(["index", "build", "--embeddings", str(old), "--out", str(old_index)]) == 0
    assert IndexStore.load(index).multi_label_view_power == 0.5
    assert IndexStore.load(old_index).multi_label_view_power == 1.0  # the file's, read as the cosine's
    sidecar = json.loads((old_index / "sidecar.json").read_text())  # as an index built before the record
    del sidecar["multi_label_view_power"]
    (old_index / "sidecar.json").write_text(json.dumps(sidecar))
    assert IndexStore.load(old_index).multi_label_view_power is None
    for target in (index, old_index):
        assert cli(["index", "remove", "--index", str(target), "--ids", "3"]) == 0
    capsys.readouterr()
    assert cli(["index", "add", "--index", str(index), "--embeddings", str(old)]) == 1
    assert "old.h5: its multi-label groups' views are divided by their length to the power 1, the index's " \
           "to the power 0.5" in capsys.readouterr().err
    assert cli(["index", "add", "--index", str(old_index), "--embeddings", str(embeddings)]) == 1
    assert "to the power 0.5, the index's to the power 1" in capsys.readouterr().err
    assert len(IndexStore.load(index)) == len(IndexStore.load(old_index)) == 59  # nothing mixed in
    assert cli(["index", "add", "--index", str(index), "--embeddings", str(embeddings)]) == 0
    assert cli(["index", "add", "--index", str(old_index), "--embeddings", str(old)]) == 0


def test_posthoc_multilabel_view_script_matches_the_evaluation(embeddings, demo_catalog, tmp_path, capsys):
    """scripts/posthoc_multilabel_view.py at today's power gives what ``evaluate`` reports for the file's
    own group views; at power 1 what the cosine of the same probabilities gives."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import posthoc_multilabel_view
    from retrieval.data.embfile import read_probabilities, read_rows
    from retrieval.evaluate.metrics import evaluate_retrieval
    from retrieval.evaluate.report import match_rows

    capsys.readouterr()
    posthoc_multilabel_view.main(["--embeddings", str(embeddings), "--catalog", str(demo_catalog), "--powers", "1", "0.5"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("power 1: group view") and lines[2].startswith("power 0.5: group view")
    assert cli(["evaluate", "--embeddings", str(embeddings), "--catalog", str(demo_catalog), "--device", "cpu",
                "--out", str(tmp_path / "report")]) == 0
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert f"group view {100 * report['views']['group']['map_paper']:.1f} " in lines[2]
    catalog = read_catalog(demo_catalog)
    rows, items = match_rows([it.image for it in catalog.items], catalog, "test")
    probs = read_probabilities(embeddings, rows)
    labels = {g: [it.labels[g] for it in items] for g in catalog.groups}
    views = {g: p / np.linalg.norm(p, axis=1, keepdims=True) if g == "colours" else p for g, p in probs.items()}
    cosine = evaluate_retrieval(read_rows(embeddings, rows).vectors, labels, vectors_by_group=views, normalise=False)
    assert f"colours {100 * cosine['groups']['colours']['group_view']['map_paper']:.1f})" in lines[1]


def test_rebuild_script_swaps_index(tiny_run, demo_catalog, tmp_path):
    index = tmp_path / "live"
    env = {**os.environ, "RETRIEVAL": str(Path(sys.executable).with_name("retrieval"))}
    cmd = ["bash", str(ROOT / "scripts" / "rebuild_index.sh"), str(demo_catalog), str(tiny_run / "best.pt"),
           str(index)]
    # the second run replaces the first index in place; the index build's options in either order
    # (the second copies every image's row from the first's embeddings: nothing changed; the third,
    # with the second's options, leaves the index as it was: no rewrite, no server reload)
    runs = [([], "matches", 0), (["--shared-view", "embedding", "--type", "flat"], "embedding", 60),
            (["--type", "flat", "--shared-view", "embedding"], "embedding", 60)]
    for options, view, copied in runs:
        before = (index / "sidecar.json").read_bytes() if index.exists() else None
        result = subprocess.run(cmd + options + ["--device", "cpu", "--workers", "0"], env=env, capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        assert json.loads((index / "sidecar.json").read_text())["shared_view"] == view
        assert (f"Copied {copied} of 60 images' rows" in result.stderr) == bool(copied), result.stderr[-2000:]
        assert ("left as it was" in result.stdout) == (options == runs[2][0]), result.stdout
    assert (index / "sidecar.json").read_bytes() == before
    assert (tmp_path / "live.embeddings.h5").exists()
    assert [p.name for p in tmp_path.glob(".live*")] == [".live.lock"]  # the lock file stays (flock)


def test_image_cache_feeds_training(demo_catalog, tmp_path):
    from retrieval.data.datasets import ImageCache
    from retrieval.data.images import load_image, to_uint8_array

    cache = tmp_path / "images.h5"
    assert cli(["cache", "--catalog", str(demo_catalog), "--out", str(cache), "--image-size", "64",
                "--workers", "0"]) == 0
    images = ImageCache(cache)
    catalog = read_catalog(demo_catalog)
    first = catalog.items[0]
    assert (images.read(first.image) == to_uint8_array(load_image(catalog.path_of(first)), 64)).all()
    assert cli(["train", "--catalog", str(demo_catalog), "--out", str(tmp_path / "run"), "--backbone", "tiny",
                "--image-size", "64", "--epochs", "1", "--trainable-blocks", "all", "--workers", "0",
                "--image-cache", str(cache), "--device", "cpu"]) == 0


def test_a_file_of_another_kind_is_no_image_cache(demo_catalog, embeddings, tmp_path, capsys):
    # a checkpoint or an EMB.h5 as `cache --out` was HDF5's traceback or "object 'images' doesn't exist"
    # (and a readable HDF5 file of another kind was about to be rebuilt over); as --image-cache the same
    notes = tmp_path / "notes.pt"
    notes.write_bytes(b"not hdf5")
    other = tmp_path / "emb.h5"
    shutil.copy(embeddings, other)
    for target, why in ((notes, "not an HDF5 file"), (other, "no images and paths datasets")):
        before = target.read_bytes()
        assert cli(["cache", "--catalog", str(demo_catalog), "--out", str(target), "--image-size", "64",
                    "--workers", "0"]) == 1
        assert f"{target}: not an image cache ({why}); choose another file or delete it" in capsys.readouterr().err
        assert target.read_bytes() == before
    assert cli(["train", "--catalog", str(demo_catalog), "--out", str(tmp_path / "run"), "--backbone", "tiny",
                "--image-size", "64", "--epochs", "1", "--trainable-blocks", "all", "--workers", "0",
                "--image-cache", str(notes), "--device", "cpu"]) == 1
    assert f"{notes}: not an image cache (not an HDF5 file)" in capsys.readouterr().err
    assert cli(["train", "--catalog", str(demo_catalog), "--out", str(tmp_path / "run2"), "--backbone", "tiny",
                "--image-size", "64", "--epochs", "1", "--trainable-blocks", "all", "--workers", "0",
                "--image-cache", str(tmp_path / "nothere.h5"), "--device", "cpu"]) == 1
    assert "nothere.h5: no such image cache (make one with 'retrieval cache')" in capsys.readouterr().err


def test_empty_and_test_only_groups_are_left_out(demo_catalog, tmp_path, caplog):
    """A group empty on every row crashed training after epoch 0; one labelled only in the test split
    got a head that nothing trained. Both are left out of training; the empty one of everything."""
    import csv

    catalog = tmp_path / "cat"
    shutil.copytree(demo_catalog, catalog)
    with open(demo_catalog / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    with open(catalog / "labels.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, [*rows[0], "season", "fit"])
        writer.writeheader()
        writer.writerows({**r, "season": "", "fit": "slim" if r["split"] == "test" else ""} for r in rows)
    run, emb, report = tmp_path / "run", tmp_path / "emb.h5", tmp_path / "report"
    assert cli(["train", "--catalog", str(catalog), "--out", str(run), "--epochs", "1", "--backbone", "tiny",
                "--image-size", "64", "--batch-size", "16", "--workers", "0", "--device", "cpu"]) == 0
    assert "'season': no label on any row" in caplog.text and "'fit' is labelled only in the test" in caplog.text
    groups = load_checkpoint(run / "best.pt")["model_config"]["groups"]
    assert "season" not in groups and "fit" not in groups and "category" in groups
    assert embed(run, catalog, emb) == 0
    with h5py.File(emb) as f:
        assert not {"season", "fit"} & set(json.loads(f.attrs["groups"]))
    assert cli(["evaluate", "--embeddings", str(emb), "--catalog", str(catalog), "--out", str(report)]) == 0
    evaluated = json.loads((report / "report.json").read_text())["groups"]
    assert "season" not in evaluated and "fit" in evaluated and "category" in evaluated


def test_index_add_reads_the_index_ids_once(embeddings, tmp_path, monkeypatch):
    """`index add` rebuilt a set of the index's ids for every embedded row (quadratic: 62 s for 20k
    into 20k). Count how often the ids are turned into Python objects; timings: bench_index.py."""
    from indexer import IndexStore

    class CountingIds(np.ndarray):
        calls = 0

        def tolist(self):
            CountingIds.calls += 1
            return super().tolist()

        def __iter__(self):
            CountingIds.calls += 1
            return super().__iter__()

    index = tmp_path / "index"
    assert cli(["index", "build", "--embeddings", str(embeddings), "--out", str(index)]) == 0
    assert cli(["index", "remove", "--index", str(index), "--ids", *map(str, range(0, 60, 2))]) == 0
    load = IndexStore.load.__func__

    def counting_load(cls, *args, **kwargs):
        store = load(cls, *args, **kwargs)
        store.items.ids = store.items.ids.view(CountingIds)
        return store

    monkeypatch.setattr(IndexStore, "load", classmethod(counting_load))
    assert cli(["index", "add", "--index", str(index), "--embeddings", str(embeddings)]) == 0
    assert CountingIds.calls <= 2  # the ids gathered at most twice, not once per row (60)
    monkeypatch.undo()
    # the 30 re-added images back under the ids they had: 0, 2, .., 58; nothing numbered from next_id
    assert sorted(IndexStore.load(index).ids.tolist()) == list(range(60))
    assert IndexStore.load(index).next_id == 60


def test_embed_copies_the_rows_of_unchanged_images_from_the_file_before(tiny_run, demo_catalog, tmp_path, caplog):
    # a daily rebuild embedded every image again (the same 2 s for a 120-item catalogue as the first
    # run; at 100k images on the CPU, half an hour): rows of images unchanged since are copied now,
    # new and changed ones computed, and the file equals one computed from scratch
    from PIL import Image

    from retrieval.data.embfile import read_embeddings

    caplog.set_level(logging.INFO, logger="retrieval.embed.embedding")
    catalog = tmp_path / "catalog"
    shutil.copytree(demo_catalog, catalog)
    out = tmp_path / "emb.h5"
    assert embed(tiny_run, catalog, out, "--batch-size", "4") == 0
    caplog.clear()
    stamp = out.stat().st_mtime_ns
    assert embed(tiny_run, catalog, out, "--batch-size", "4") == 0  # nothing changed: the file left as it was
    assert "is up to date" in caplog.text and out.stat().st_mtime_ns == stamp
    moved = tmp_path / "moved"  # the catalog folder moved: the file names the old one, so it is written
    shutil.copytree(catalog, moved, copy_function=shutil.copy2)
    assert embed(tiny_run, moved, tmp_path / "moved.h5", "--reuse", str(out)) == 0
    shutil.copy2(out, tmp_path / "moved-out.h5")
    caplog.clear()
    assert embed(tiny_run, moved, tmp_path / "moved-out.h5", "--batch-size", "4") == 0
    assert "is up to date" not in caplog.text and "Copied 60 of 60" in caplog.text
    assert read_embeddings(tmp_path / "moved-out.h5").attrs["catalog"] == str(moved.resolve())
    assert embed(tiny_run, catalog, tmp_path / "copy.h5", "--batch-size", "4", "--reuse", str(out)) == 0
    assert "Copied 60 of 60 images' rows" in caplog.text  # into another file: every row copied
    shutil.copy(out, tmp_path / "before.h5")
    items = read_catalog(catalog).items
    for item in items[::7]:  # photos shot again under their names, scattered through the batches
        path = catalog / item.image
        Image.open(path).convert("RGB").rotate(90).save(path)
    lines = (catalog / "labels.csv").read_text().splitlines()
    for k in range(3):  # new products
        shutil.copy(catalog / items[k].image, catalog / f"new{k}.png")
        lines.append(",".join([f"new{k}.png", *lines[1 + k].split(",")[1:]]))
    (catalog / "labels.csv").write_text("\n".join(lines) + "\n")
    caplog.clear()
    assert embed(tiny_run, catalog, out, "--batch-size", "4") == 0
    assert "Copied 51 of 63 images' rows" in caplog.text  # 9 changed, 3 new
    fresh = tmp_path / "fresh.h5"
    assert embed(tiny_run, catalog, fresh, "--batch-size", "4", "--reuse", "none") == 0
    a, b = read_embeddings(out), read_embeddings(fresh)
    assert a.paths == b.paths and np.array_equal(a.ids, b.ids)
    assert np.allclose(a.vectors, b.vectors, atol=1e-5)
    assert all(np.allclose(a.group_vectors[g], b.group_vectors[g], atol=1e-5) for g in b.group_vectors)
    # stopped after its first computed batch, then run again: it resumes and ends as the fresh file
    import retrieval.embed.embedding as embedding

    again = tmp_path / "again.h5"
    real = embedding.iter_outputs

    def stops(*args, **kwargs):
        yield next(real(*args, **kwargs))
        raise KeyboardInterrupt

    embedding.iter_outputs = stops
    try:
        with pytest.raises(KeyboardInterrupt):
            embed(tiny_run, catalog, again, "--batch-size", "4", "--reuse", str(tmp_path / "before.h5"))
    finally:
        embedding.iter_outputs = real
    assert embed(tiny_run, catalog, again, "--batch-size", "4", "--reuse", str(tmp_path / "before.h5")) == 0
    c = read_embeddings(again)
    assert c.paths == b.paths and np.allclose(c.vectors, b.vectors, atol=1e-5)
    caplog.clear()
    assert embed(tiny_run, catalog, tmp_path / "other.h5", "--reuse", str(tmp_path / "nope.h5")) == 0
    assert "--reuse" in caplog.text and "no such file" in caplog.text


def test_embed_reuses_nothing_made_at_another_image_size_and_survives_an_unreadable_first_image(demo_catalog, tmp_path,
                                                                                              caplog):
    # the off-the-shelf trunk's fingerprint leaves out --image-size and --weights: a 64 px run copied the
    # 32 px rows of the file before; and a catalog whose first image was unreadable wrote rows as wide as
    # the vectors alone ("Can't broadcast (59, 342) -> (59, 256)")
    from retrieval.data.embfile import read_embeddings

    caplog.set_level(logging.INFO, logger="retrieval.embed.embedding")
    catalog = tmp_path / "catalog"
    shutil.copytree(demo_catalog, catalog)
    out = tmp_path / "base.h5"
    base = ["embed", "--pretrained-only", "--backbone", "tiny", "--catalog", str(catalog), "--out", str(out),
            "--device", "cpu", "--workers", "0"]
    assert cli(base + ["--image-size", "32"]) == 0
    assert cli(base + ["--image-size", "64"]) == 0
    assert "Not reusing" in caplog.text and "image_size differ" in caplog.text and "Copied" not in caplog.text
    fresh = tmp_path / "fresh.h5"
    assert cli(base[:-6] + ["--out", str(fresh), "--device", "cpu", "--workers", "0", "--image-size", "64"]) == 0
    assert np.allclose(read_embeddings(out).vectors, read_embeddings(fresh).vectors, atol=1e-5)
    first = read_catalog(catalog).items[0]
    (catalog / first.image).write_bytes(b"not an image")
    assert embed_ok(tmp_path, catalog)


def embed_ok(tmp_path, catalog) -> bool:
    run = tmp_path / "run"
    assert cli(["train", "--catalog", str(catalog), "--out", str(run), "--epochs", "1", "--backbone", "tiny",
                "--image-size", "32", "--workers", "0", "--device", "cpu"]) == 0
    out = tmp_path / "emb.h5"
    assert embed(run, catalog, out, "--trunk-cache", str(run / "trunk-cache.h5")) == 0
    assert embed(run, catalog, tmp_path / "images.h5") == 0  # decoded from the files
    from retrieval.data.embfile import read_embeddings

    a, b = read_embeddings(out), read_embeddings(tmp_path / "images.h5")
    return len(a.paths) == len(b.paths) == 59 and a.vectors.shape[1] > 256


def test_build_skip_unchanged_rebuilds_only_what_changed(embeddings, demo_catalog, tmp_path, capsys):
    index = tmp_path / "index"
    build = ["index", "build", "--embeddings", str(embeddings), "--out", str(index), "--skip-unchanged"]
    assert cli(build) == 0 and "Built" in capsys.readouterr().out
    stamp = (index / "sidecar.json").read_bytes()
    assert cli(build) == 0 and "is up to date" in capsys.readouterr().out
    assert (index / "sidecar.json").read_bytes() == stamp
    for extra in (["--group-codec", "8bit"], ["--shared-view", "embedding"]):  # other options: built
        assert cli(build + extra) == 0 and "Built" in capsys.readouterr().out
    assert cli(build) == 0 and "Built" in capsys.readouterr().out  # back to the first options
    assert cli(build + ["--type", "ivf"]) == 0 and "is up to date" in capsys.readouterr().out  # 60 items: flat
    catalog = tmp_path / "catalog"
    shutil.copytree(demo_catalog, catalog)
    lines = (catalog / "labels.csv").read_text().splitlines()
    lines[2] = lines[2].replace(lines[2].split(",")[2], "a new title", 1)  # one title changed
    (catalog / "labels.csv").write_text("\n".join(lines) + "\n")
    assert cli(build + ["--catalog", str(catalog)]) == 0 and "Built" in capsys.readouterr().out
    assert cli(build + ["--catalog", str(catalog)]) == 0 and "is up to date" in capsys.readouterr().out
