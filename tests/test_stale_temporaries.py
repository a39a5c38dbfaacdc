"""Temporaries that a killed writer leaves (kill -9 between write and rename) are removed by the
next writer: checkpoints and run files, index directories. A live writer's are kept."""
import os
import subprocess
import time

import numpy as np
import pytest

from conftest import TINY
from indexer.stale import HOST
from retrieval.net.checkpoint import atomic_save
from retrieval.cli import main as cli

DAY = 24 * 3600


@pytest.fixture
def pids():
    """(a pid that no process has any more, the pid of a running process)."""
    finished = subprocess.Popen(["true"])
    finished.wait()
    running = subprocess.Popen(["sleep", "300"])
    yield finished.pid, running.pid
    running.kill()
    running.wait()


def age(path, seconds):
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_atomic_save_removes_dead_writers_files(tmp_path, pids):
    dead, live = pids
    left = {name: tmp_path / name for name in [
        f".last.pt.{HOST}-{dead}.tmp", f".best.pt.{HOST}-{dead}.tmp",  # killed writers of this host
        f".last.pt.{HOST}-{live}.tmp",  # a writer still running
        f".last.pt.otherhost-{dead}.tmp",  # another host's pid says nothing here: kept for a day
        ".last.pt.4242.tmp", ".best.pt.4243.tmp",  # older versions' names: judged by age
        ".metrics.json.tmp", "notes.tmp"]}  # not ours
    for path in left.values():
        path.write_bytes(b"x" * 1000)
    age(left[".best.pt.4243.tmp"], 2 * DAY)
    atomic_save({"a": 1}, tmp_path / "last.pt")
    kept = sorted(p.name for p in tmp_path.iterdir())
    assert kept == sorted(["last.pt", f".last.pt.{HOST}-{live}.tmp", f".last.pt.otherhost-{dead}.tmp",
                           ".last.pt.4242.tmp", ".metrics.json.tmp", "notes.tmp"])


def test_failed_atomic_save_leaves_nothing(tmp_path):
    with pytest.raises((AttributeError, TypeError), match="pickle"):
        atomic_save(lambda: 0, tmp_path / "last.pt")  # torch cannot pickle a lambda
    assert list(tmp_path.iterdir()) == []


def test_training_removes_what_a_killed_run_left(demo_catalog, tmp_path, pids):
    """`.last.pt.*.tmp` and the run files' temporaries of a run killed by kill -9 are gone after
    the next epoch of the same run directory (`--resume`)."""
    dead, _ = pids
    run = tmp_path / "run"
    run.mkdir()
    left = [run / f".{name}.{HOST}-{dead}.tmp" for name in ("last.pt", "metrics.json", "config.yaml")]
    for path in left:
        path.write_bytes(b"partial")
    assert cli(["train", "--catalog", str(demo_catalog), "--out", str(run), "--epochs", "1", "--resume", *TINY]) == 0
    assert not [p for p in left if p.exists()]
    assert {"last.pt", "best.pt", "metrics.json", "config.yaml"} <= {p.name for p in run.iterdir()}


def test_index_save_removes_dead_writers_copies(tmp_path, pids):
    from indexer import IndexStore, build_index

    dead, live = pids
    names = {"dead": f".live.tmp-{HOST}-{dead}-ab_c12de", "moved": f".live.old-{HOST}-{dead}-0a1b2c3d",
             "live": f".live.tmp-{HOST}-{live}-xyz", "other host": f".live.tmp-otherhost-{dead}-q1",
             "legacy old": ".live.tmp-k2j4h5g6", "legacy young": ".live.tmp-a1b2c3d4",
             "other index": f".archive.tmp-{HOST}-{dead}-r2"}
    for name in names.values():
        (tmp_path / name).mkdir()
        (tmp_path / name / "shared.faiss").write_bytes(b"x" * 1000)
    age(tmp_path / names["legacy old"], 2 * DAY)
    x = np.eye(4, 8, dtype=np.float32)
    IndexStore({"shared": build_index(x, np.arange(4))}, np.arange(4), list("abcd")).save(tmp_path / "live")
    left = {p.name for p in tmp_path.iterdir()}
    assert left == {"live", names["live"], names["other host"], names["legacy young"], names["other index"]}


def test_a_swap_killed_between_its_renames_is_finished_not_deleted(tmp_path, pids, caplog, monkeypatch):
    # a kill between "index -> .old" and ".tmp -> index" left no index: serve and index add failed
    # ("sidecar not found") and the next build's clean-up deleted both copies (an add's new items lost)
    from indexer import IndexStore, build_index

    dead, live = pids

    def index_of(n, where):
        x = np.eye(n, 8, dtype=np.float32)
        IndexStore({"shared": build_index(x, np.arange(n))}, np.arange(n), [f"{i}.jpg" for i in range(n)]).save(where)

    for finished, expected in ((True, 6), (False, 4)):
        root = tmp_path / f"finished-{finished}"
        root.mkdir()
        index_of(4, root / "live")
        (root / "live").rename(root / f".live.old-{HOST}-{dead}-0a1b2c3d")  # the first rename happened
        index_of(6, root / "new")
        (root / "new").rename(root / f".live.tmp-{HOST}-{dead}-ab_c12de")  # the new index, finished
        if not finished:  # the new one is gone (a clean-up, or never finished): the previous one is put back
            import shutil

            shutil.rmtree(root / f".live.tmp-{HOST}-{dead}-ab_c12de")
        assert len(IndexStore.load(root / "live")) == expected
        assert "a swap stopped between its renames" in caplog.text
        assert len(IndexStore.load(root / "live")) == expected  # once in place, it stays
        index_of(3, root / "live")  # the next writer's clean-up then removes the rest
        assert sorted(p.name for p in root.iterdir()) == ["live"]
    # a live writer between its renames is left alone, whatever its copies' age (a rename keeps an old
    # index's time: a reader undid a live swap of a day-old index)
    root = tmp_path / "live-writer"
    root.mkdir()
    index_of(4, root / "live")
    moved = root / f".live.old-{HOST}-{live}-0a1b2c3d"
    (root / "live").rename(moved)
    age(moved, 2 * DAY)
    with pytest.raises(FileNotFoundError, match="Index sidecar not found"):
        IndexStore.load(root / "live")
    assert moved.is_dir()
    # another host's writer (a container restarted under a new name), or a pid used again since: gone when
    # its swap stopped long ago, by the rename's change time (the repair did nothing, and the next save's
    # clean-up deleted the previous index by its age)
    import indexer.persist as persist

    other = root / ".live.old-old-pod-7-4242-0a1b2c3d"
    moved.rename(other)
    monkeypatch.setattr(persist, "SWAP_GONE_AFTER_S", -1)  # as if it stopped an hour ago
    assert len(IndexStore.load(root / "live")) == 4 and not other.exists()
    # a swap killed in its last step (deleting the index before, renamed .del first) and a killed first
    # build's copy are never put in place, and the next build removes them (a half-deleted .old came back)
    root = tmp_path / "after-swap"
    root.mkdir()
    for name in (f".live.del-{HOST}-{dead}-0a1b2c3d", f".live.tmp-{HOST}-{dead}-ab_c12de"):
        index_of(4, root / "x")
        (root / "x").rename(root / name)
    with pytest.raises(FileNotFoundError, match="Index sidecar not found"):
        IndexStore.load(root / "live")
    index_of(3, root / "live")
    assert sorted(p.name for p in root.iterdir()) == ["live"]
