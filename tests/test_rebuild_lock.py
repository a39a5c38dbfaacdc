"""Concurrent rebuilds: scripts/rebuild_index.sh takes a lock, stops its step on a signal, and embed
names a work file that another process holds open."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from retrieval.cli import main as cli

ROOT = Path(__file__).resolve().parents[1]


def embed(run, catalog, out, *extra):
    return cli(["embed", "--checkpoint", str(run / "best.pt"), "--catalog", str(catalog), "--out", str(out),
                "--device", "cpu", "--workers", "0", "--batch-size", "16", *extra])


FAKE_RETRIEVAL = '''#!/usr/bin/env bash
# stands in for 'retrieval': embed records its pid and works until stopped (HANG), or writes --out
if [ "$1" = embed ]; then
  if [ -n "${HANG:-}" ]; then echo $$ > "$HANG"; exec sleep 300; fi
  while [ "$1" != --out ]; do shift; done
  touch "$2"
fi
'''


def start_rebuild(tmp_path, index, hang=None):
    fake = tmp_path / "retrieval"
    fake.write_text(FAKE_RETRIEVAL)
    fake.chmod(0o755)
    env = {**os.environ, "RETRIEVAL": str(fake), **({"HANG": str(hang)} if hang else {})}
    cmd = ["bash", str(ROOT / "scripts" / "rebuild_index.sh"), "CAT", "RUN/best.pt", str(index)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_pid(path, process) -> int:
    """The pid the hanging embed step wrote (waits for it; CI may be slow)."""
    deadline = time.monotonic() + 120
    while not (path.exists() and path.read_text().strip()):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the embed step did not start"
        time.sleep(0.05)
    return int(path.read_text())


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_second_rebuild_is_refused_and_a_stopped_one_stops_its_step(tmp_path):
    index = tmp_path / "live"
    first = start_rebuild(tmp_path, index, hang=tmp_path / "embed.pid")
    embed_pid = wait_for_pid(tmp_path / "embed.pid", first)
    second = start_rebuild(tmp_path, index)
    _, err = second.communicate(timeout=60)
    assert second.returncode == 75
    assert f"another rebuild of {index} is running (pid {first.pid})" in err
    first.send_signal(signal.SIGTERM)
    _, err = first.communicate(timeout=60)
    assert first.returncode == 143 and "stopped" in err
    assert not alive(embed_pid)  # the embed step was stopped and reaped, not left running
    third = start_rebuild(tmp_path, index)  # the lock is free again
    out, err = third.communicate(timeout=60)
    assert third.returncode == 0 and "is up to date with" in out, err


def test_step_that_outlives_a_killed_rebuild_keeps_the_lock(tmp_path):
    index = tmp_path / "live"
    first = start_rebuild(tmp_path, index, hang=tmp_path / "embed.pid")
    embed_pid = wait_for_pid(tmp_path / "embed.pid", first)
    try:
        first.kill()  # kill -9: no trap runs, the embed step goes on
        first.wait(timeout=60)  # (its pipes stay open in the step: no communicate)
        second = start_rebuild(tmp_path, index)
        _, err = second.communicate(timeout=60)
        assert second.returncode == 75 and f"pid {first.pid} has exited but a step it started still holds" in err
    finally:
        os.kill(embed_pid, signal.SIGKILL)
        first.stdout.close(), first.stderr.close()


def test_embed_names_a_file_locked_by_another_process(tiny_run, demo_catalog, tmp_path, capsys):
    out = tmp_path / "emb.h5"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time, h5py; f = h5py.File(sys.argv[1], 'w'); "
                               "print('open', flush=True); time.sleep(300)", str(out.with_name("emb.h5.partial"))],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        assert embed(tiny_run, demo_catalog, out) == 1
        assert "emb.h5.partial is in use by another process" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()


def test_rebuild_and_build_never_replace_what_is_not_an_index(tmp_path, capsys):
    # index build --out / rebuild_index.sh onto a catalog copy or a folder of notes deleted it, exit 0;
    # a bad --type was refused only after the embedding
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep")
    afile = tmp_path / "afile.txt"
    afile.write_text("keep")
    for target, message in ((folder, "is not an index"), (afile, "is not an index")):
        done = start_rebuild(tmp_path, target)
        _, err = done.communicate(timeout=60)
        assert done.returncode == 2 and message in err, err
    hang = tmp_path / "embed.pid"
    fake = tmp_path / "retrieval"
    env = {**os.environ, "RETRIEVAL": str(fake), "HANG": str(hang)}
    for extra, message in ((["--type", "bogus"], "--type takes flat, ivf, hnsw or ivfpq (got 'bogus')"),
                           (["--type"], "--type takes flat, ivf, hnsw or ivfpq (got '')"),
                           (["--shared-view", "x"], "--shared-view takes file or embedding")):
        cmd = ["bash", str(ROOT / "scripts" / "rebuild_index.sh"), "CAT", "RUN/best.pt", str(tmp_path / "idx"), *extra]
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
        assert result.returncode == 2 and message in result.stderr and not hang.exists()  # no embedding began
    assert (folder / "notes.txt").read_text() == "keep" and afile.read_text() == "keep"
    for target, message in ((folder, "holds files but no index"), (afile, "is a file, not an index directory")):
        assert cli(["index", "build", "--embeddings", str(tmp_path / "none.h5"), "--out", str(target)]) == 1
        assert message in capsys.readouterr().err
    assert (folder / "notes.txt").read_text() == "keep" and afile.read_text() == "keep"


def test_embed_into_a_folder_is_refused_before_embedding(tiny_run, demo_catalog, tmp_path, capsys):
    # it embedded everything, then failed renaming the work file onto the folder (IsADirectoryError)
    (tmp_path / "out").mkdir()
    assert embed(tiny_run, demo_catalog, tmp_path / "out") == 1
    assert "is a folder; --out names the embeddings file to write" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no work file begun


def test_a_rebuild_stopped_after_its_embedding_does_not_embed_again(tmp_path):
    # the finished embeddings file waited in the work folder, and the next run embedded everything again
    fake = tmp_path / "retrieval"
    fake.write_text('''#!/usr/bin/env bash
echo "$1" >> "$CALLS"
if [ "$1" = embed ]; then while [ "$1" != --out ]; do shift; done; touch "$2"; fi
if [ "$1" = index ] && [ -e "$FAIL_BUILD" ]; then exit 1; fi
''')
    fake.chmod(0o755)
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "labels.csv").write_text("image,colour\n")
    checkpoint = tmp_path / "best.pt"
    checkpoint.write_bytes(b"model")
    calls, fail = tmp_path / "calls", tmp_path / "fail"
    env = {**os.environ, "RETRIEVAL": str(fake), "CALLS": str(calls), "FAIL_BUILD": str(fail)}
    cmd = ["bash", str(ROOT / "scripts" / "rebuild_index.sh"), str(tmp_path / "cat"), str(checkpoint),
           str(tmp_path / "live"), "--device", "cpu"]

    def rebuild():
        calls.write_text("")
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
        return done.returncode, calls.read_text().split(), done.stdout + done.stderr

    fail.touch()  # the index build fails (or is killed) after the embedding finished
    assert rebuild()[:2] == (1, ["embed", "index"])
    fail.unlink()
    code, steps, said = rebuild()
    assert (code, steps) == (0, ["index"]) and "finished by a run stopped after it" in said
    fail.touch()
    assert rebuild()[:2] == (1, ["embed", "index"])  # a fresh rebuild embeds
    checkpoint.write_bytes(b"another model")  # a new checkpoint since: embedded again
    assert rebuild()[:2] == (1, ["embed", "index"])
    import time

    time.sleep(1.1)  # file times in whole seconds on some file systems
    (tmp_path / "cat" / "a.jpg").write_bytes(b"a photo replaced")  # a catalog file newer: embedded again
    assert rebuild()[:2] == (1, ["embed", "index"])
    time.sleep(1.1)
    photo = tmp_path / "cat" / "b.jpg"  # restored with its old times (cp -p, rsync -a): its change time says so
    photo.write_bytes(b"from a backup")
    os.utime(photo, (1, 1))
    fail.unlink()
    assert rebuild()[:2] == (0, ["embed", "index"])
