"""One way to write a file so that readers never see half of it: a temporary file beside the target
(``.NAME.HOST-PID.tmp``) renamed into place. Temporaries whose writer died (kill -9) are removed by
the next writer in the same folder (see ``indexer.stale``)."""
from __future__ import annotations

import logging
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

from indexer.stale import HOST, writer_gone

logger = logging.getLogger(__name__)

# .NAME.HOST-PID.tmp; older versions wrote .NAME.PID.tmp
TEMPORARY = re.compile(r"^\..+\.(?:(?P<host>[\w-]+)-)?(?P<pid>\d+)\.tmp$")


def temporary_path(path: Path) -> Path:
    """The temporary file beside ``path`` that this process writes: ``.NAME.HOST-PID.tmp``."""
    return path.with_name(f".{path.name}.{HOST}-{os.getpid()}.tmp")


def remove_stale_temporaries(directory: Path) -> list[Path]:
    """Delete the temporaries in ``directory`` whose writer is gone: a dead process of this host,
    or older than a day (names without a host, and other hosts', are judged by age alone)."""
    removed = []
    for entry in os.scandir(directory) if directory.is_dir() else ():
        match = TEMPORARY.match(entry.name)
        try:
            if not match or not entry.is_file(follow_symlinks=False):
                continue
            mtime = entry.stat(follow_symlinks=False).st_mtime
        except FileNotFoundError:  # its writer finished meanwhile
            continue
        if writer_gone(match["host"], match["pid"], mtime):
            Path(entry.path).unlink(missing_ok=True)
            removed.append(Path(entry.path))
            logger.info("Removed %s, left by a writer that is gone", entry.path)
    return removed


@contextmanager
def atomic_write(path: str | Path, mode: str = "w", **open_kwargs):
    """``with atomic_write(path) as f: ...``: the file appears whole at ``path`` when the block ends,
    and not at all when it raises. Text modes default to UTF-8."""
    path = Path(path)
    remove_stale_temporaries(path.parent)
    tmp = temporary_path(path)
    if "b" not in mode:
        open_kwargs.setdefault("encoding", "utf-8")
    try:
        with open(tmp, mode, **open_kwargs) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> None:
    """Text written atomically."""
    with atomic_write(path) as f:
        f.write(text)


class DiskSpaceError(ValueError):
    """Too little free disk for a long write; the message says how much it needs and where."""


def check_free_space(directory: Path, needed: int, what: str) -> None:
    """Raise DiskSpaceError when the file system of ``directory`` (or of its nearest existing parent)
    has fewer than ``needed`` bytes free: checked before a long write (the trunk pass, embedding),
    which would otherwise stop hours in on a full disk."""
    place = Path(directory).absolute()
    while not place.exists() and place != place.parent:
        place = place.parent
    free = shutil.disk_usage(place).free
    if needed > free:
        raise DiskSpaceError(f"{what} needs about {size_text(needed)} on {place}, which has {size_text(free)} free; "
                             "free some space or write it to another disk (what was written resumes)")


def size_text(n: int) -> str:
    """A byte count for people: 1.5 GB, 320 MB, 12 kB."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}" if n < 10 * scale else f"{n / scale:.0f} {unit}"
    return f"{n} B"


def in_use(err: OSError) -> bool:
    """Whether an error opening an HDF5 file is its lock (another process has it open to write)."""
    text = str(err).lower()  # h5py: "unable to lock file, errno = 11" ("sblock" in a truncated file's is not it)
    return isinstance(err, BlockingIOError) or "unable to lock" in text or "errno = 11" in text


def hold_lock(path: Path) -> int | str:
    """Take an exclusive flock on ``path`` (created if need be) without waiting: the open descriptor,
    with this process's pid written in the file, or, when another process holds it, the pid that
    process wrote (a string; "unknown" without one). The lock ends when the descriptor is closed or
    the process ends, kill -9 included."""
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        return holder
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd
