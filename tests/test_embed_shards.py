"""Sharded embedding: torchrun ranks (2 CPU processes, gloo) write the file one process writes; a
rerun skips finished shards and resumes an interrupted one; --merge-only; the shard plan."""
import json
import os
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest

from retrieval.cli import main as cli
from retrieval.embed.shards import counts_on_disk, shard_count, shard_path, shard_rows

EMBED = ["--device", "cpu", "--workers", "0", "--batch-size", "16"]


def embed(run, catalog, out, *extra):
    return cli(["embed", "--checkpoint", str(run / "best.pt"), "--catalog", str(catalog), "--out", str(out),
                *EMBED, *extra])


def torchrun_embed(run, catalog, out, *extra) -> subprocess.CompletedProcess:
    """``retrieval embed`` on 2 CPU processes (gloo) under torchrun; a hang fails instead of blocking."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "retrieval.cli", "embed", "--checkpoint", str(run / "best.pt"), "--catalog", str(catalog),
           "--out", str(out), *EMBED, *extra]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def single(tiny_run, demo_catalog, tmp_path_factory):
    """EMB.h5 as one process writes it."""
    out = tmp_path_factory.mktemp("single") / "emb.h5"
    assert embed(tiny_run, demo_catalog, out) == 0
    return out


def assert_same_file(a, b):
    """Same datasets, ids, paths and attributes (but the creation time); values to float rounding."""
    with h5py.File(a) as f, h5py.File(b) as g:
        assert sorted(f.keys()) == sorted(g.keys()) and sorted(f["groups"]) == sorted(g["groups"])
        assert f["ids"][:].tolist() == g["ids"][:].tolist()
        assert list(f["paths"].asstr()[:]) == list(g["paths"].asstr()[:])
        for name in ["vectors", *(f"{kind}/{grp}" for kind in ("groups", "probs") for grp in f["groups"])]:
            assert f[name].dtype == g[name].dtype and f[name].shape == g[name].shape, name
            # the same rows in other batches: vectorised kernels may round the last bit otherwise
            assert np.allclose(f[name][:], g[name][:], rtol=0, atol=1e-6), name
        assert {k: v for k, v in f.attrs.items() if k != "created"} == \
               {k: v for k, v in g.attrs.items() if k != "created"}


def work_files(out):
    return sorted(p.name for p in out.parent.iterdir() if ".partial" in p.name or p.name.endswith(".tmp"))


def test_torchrun_two_processes_write_the_single_process_file(tiny_run, demo_catalog, single, tmp_path):
    out = tmp_path / "emb.h5"
    result = torchrun_embed(tiny_run, demo_catalog, out)
    assert "Rank 0 of 2 embeds shard(s) [0] of 2" in result.stderr
    assert "Rank 1 of 2 embeds shard(s) [1] of 2" in result.stderr
    assert result.stdout.count("Wrote") == 1  # rank 0 merges and reports
    assert_same_file(single, out)
    assert work_files(out) == []


def interrupt_in_shard(monkeypatch, first_row: int, after_batches: int = 1):
    """Make embedding stop (as a kill would) after ``after_batches`` batches of the shard that
    starts at row ``first_row``; returns a switch to let it run again, recording the item counts
    every later call to the model loop is given."""
    from retrieval.embed import embedding

    real, calls = embedding.iter_outputs, []

    def interrupted(*args, **kwargs):
        for n, outputs in enumerate(real(*args, **kwargs)):
            if n == after_batches and len(args[2]) > 1 and args[2][0].row_id == first_row:
                raise KeyboardInterrupt
            yield outputs

    def recorded(*args, **kwargs):
        calls.append(len(args[2]))
        return real(*args, **kwargs)

    monkeypatch.setattr(embedding, "iter_outputs", interrupted)
    return lambda: monkeypatch.setattr(embedding, "iter_outputs", recorded), calls


def test_a_rerun_skips_finished_shards_and_resumes_an_interrupted_one(tiny_run, demo_catalog, single, tmp_path,
                                                                      monkeypatch, caplog):
    out = tmp_path / "emb.h5"
    # 60 rows in 3 shards of 20: shard 0 finishes, shard 1 stops after one batch of 16, shard 2 never starts
    record, calls = interrupt_in_shard(monkeypatch, first_row=20)
    with pytest.raises(KeyboardInterrupt):
        embed(tiny_run, demo_catalog, out, "--shards", "3")
    assert work_files(out) == ["emb.h5.partial-00000-of-00003", "emb.h5.partial-00001-of-00003"] and not out.exists()
    with pytest.raises(ValueError, match=r"partial-00001-of-00003: unfinished \(16/20 rows\); "
                                         r"emb.h5.partial-00002-of-00003: missing"):
        embed_merge_only(tiny_run, demo_catalog, out)
    record()
    caplog.set_level("INFO")
    assert embed(tiny_run, demo_catalog, out) == 0  # the shard count is found on disk
    assert "emb.h5.partial-00000-of-00003 is finished; not recomputed" in caplog.text
    assert "partial-00001-of-00003 at 16/20 images" in caplog.text
    assert calls == [1, 4, 20]  # the probe, shard 1's last 4 rows, shard 2; nothing of shard 0
    assert_same_file(single, out)
    assert work_files(out) == []
    # merged and its work files removed: --merge-only says so (it said "1 shard(s) ... missing, run again")
    with pytest.raises(ValueError, match=r"emb.h5 is complete \(its shards were merged and removed\)"):
        embed_merge_only(tiny_run, demo_catalog, out)


def embed_merge_only(run, catalog, out):
    """``--merge-only`` in-process, its error raised (the CLI would print it)."""
    from retrieval.commands.embed import main

    return main(["--checkpoint", str(run / "best.pt"), "--catalog", str(catalog), "--out", str(out), *EMBED,
                 "--merge-only"])


def test_torchrun_resumes_shards_of_a_single_process_run(tiny_run, demo_catalog, single, tmp_path, monkeypatch):
    out = tmp_path / "emb.h5"
    record, _ = interrupt_in_shard(monkeypatch, first_row=30)  # shard 0 finishes, shard 1 stops at 16
    with pytest.raises(KeyboardInterrupt):
        embed(tiny_run, demo_catalog, out, "--shards", "2")
    result = torchrun_embed(tiny_run, demo_catalog, out)
    assert "emb.h5.partial-00000-of-00002 is finished; not recomputed" in result.stderr
    assert "partial-00001-of-00002 at 16/30 images" in result.stderr
    assert_same_file(single, out)


def test_merge_only_merges_shards_left_by_a_run_killed_before_its_merge(tiny_run, demo_catalog, single, tmp_path,
                                                                       monkeypatch):
    from retrieval.embed import embedding

    out = tmp_path / "emb.h5"

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    real = embedding.merge_shards
    monkeypatch.setattr(embedding, "merge_shards", killed)
    with pytest.raises(KeyboardInterrupt):
        embed(tiny_run, demo_catalog, out, "--shards", "4")
    assert len(work_files(out)) == 4
    monkeypatch.setattr(embedding, "merge_shards", real)
    monkeypatch.setattr(embedding, "iter_outputs", None)  # computes nothing
    assert embed_merge_only(tiny_run, demo_catalog, out) == 0
    assert_same_file(single, out)
    assert work_files(out) == []


def test_unreadable_images_and_standardised_baselines_merge_as_one_process_writes(tiny_run, demo_catalog, tmp_path):
    catalog = shutil.copytree(demo_catalog, tmp_path / "cat")
    victims = [sorted((catalog / "images").glob("*.jpg"))[i] for i in (3, 45)]
    for victim in victims:
        victim.write_bytes(b"\xff\xd8 truncated")
    for shards in ("1", "3"):
        assert embed(tiny_run, catalog, tmp_path / f"emb-{shards}.h5", "--shards", shards) == 0
        # standardised over the whole set: the merge, not each shard, applies it
        assert cli(["embed", "--pretrained-only", "--backbone", "tiny", "--image-size", "64", "--taps", "all",
                    "--catalog", str(catalog), "--out", str(tmp_path / f"base-{shards}.h5"), *EMBED,
                    "--shards", shards]) == 0
    assert_same_file(tmp_path / "emb-1.h5", tmp_path / "emb-3.h5")
    with h5py.File(tmp_path / "emb-3.h5") as f:
        assert json.loads(f.attrs["skipped"]) == [f"images/{v.name}" for v in victims] and len(f["ids"]) == 58
    with h5py.File(tmp_path / "base-1.h5") as f, h5py.File(tmp_path / "base-3.h5") as g:
        assert np.allclose(f["vectors"][:], g["vectors"][:], rtol=0, atol=1e-5)


def test_shard_plan(tmp_path):
    for n, count in ((60, 2), (61, 4), (5, 5), (0, 1)):
        rows = [shard_rows(n, i, count) for i in range(count)]
        assert [r for span in rows for r in span] == list(range(n))  # contiguous, in order, all rows
        assert max(map(len, rows)) - min(map(len, rows)) <= 1
    out = tmp_path / "emb.h5"
    assert shard_count(out, 60, None, world=4) == 4 and shard_count(out, 3, None, world=4) == 3
    assert shard_count(out, 60, 8, world=2) == 8
    with pytest.raises(ValueError, match="--shards must be at least 1"):
        shard_count(out, 60, 0, world=2)
    for i in range(3):
        shard_path(out, i, 3).touch()
    (tmp_path / "other.h5.partial-00000-of-00002").touch()
    assert counts_on_disk(out) == {3} and shard_count(out, 60, None, world=8) == 3  # a rerun keeps the cut
    shard_path(out, 0, 1).touch()
    assert shard_path(out, 0, 1).name == "emb.h5.partial" and counts_on_disk(out) == {1, 3}
    with pytest.raises(ValueError, match=r"cut into \[1, 3\] shards; pass --shards K"):
        shard_count(out, 60, None, world=2)


def test_loader_workers_share_the_cores_among_a_nodes_ranks(monkeypatch):
    from retrieval.data.datasets import loader_workers

    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert loader_workers() == 15 and loader_workers(3) == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert loader_workers() == 3  # 4 cores per rank, one of them the rank's own
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "32")
    assert loader_workers() == 0


def test_a_work_file_of_the_older_layout_is_started_afresh(tmp_path, caplog):
    from retrieval.data.embfile import open_partial

    path, covers = tmp_path / "emb.h5.partial", {"paths": "p", "files": "f"}
    with h5py.File(path, "w") as f:  # one dataset per output, as before
        f["vectors"], f["ok"] = np.ones((4, 2), np.float32), np.ones(4, bool)
        f.attrs.update(job=json.dumps({}), done=4, covers=json.dumps(covers))
    f, done = open_partial(path, 4, {"vectors": 2, "probs/g": 3}, {}, covers)
    with f:
        assert done == 0 and f["outputs"].shape == (4, 5) and not f["ok"][:].any()
        assert json.loads(f.attrs["columns"]) == {"vectors": [0, 2], "probs/g": [2, 5]}
    assert "older version (one dataset per output); starting from zero" in caplog.text
