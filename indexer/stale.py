"""Who wrote a temporary file, and whether that writer is gone: shared by every atomic writer
(index directories here, checkpoints in ``retrieval.net.checkpoint``). No FAISS, no torch."""
from __future__ import annotations

import os
import re
import socket
import time

STALE_AFTER_S = 24 * 3600  # older than this, a temporary is stale whoever wrote it (pid reuse, other hosts)
HOST = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"


def writer_tag() -> str:
    """``HOST-PID`` of this process: temporaries carry it so that the next writer can tell a dead one's."""
    return f"{HOST}-{os.getpid()}"


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this host."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # OverflowError: not a process id at all
        return False
    except PermissionError:  # another user's
        return True
    return True


def writer_gone(host: str | None, pid: str | None, mtime: float) -> bool:
    """Whether the writer of a temporary is gone: a dead process of this host, or a day old.
    Names without a writer (older versions) and other hosts' are judged by age alone."""
    if time.time() - mtime > STALE_AFTER_S:
        return True
    return host == HOST and pid is not None and not pid_alive(int(pid))
