"""Running and measuring the stages of ``scripts/bench_scale.py``: child processes with their own
peak memory and CPU time (os.wait4's rusage), a server's start-up and request latencies, the
matrix-product floor of evaluation and the growth exponent of a row."""
from __future__ import annotations

import csv
import http.client
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# A forked child starts with its parent's resident pages counted, and exec keeps that high-water mark
# in ru_maxrss: a stage started straight from this (large) process would be charged for it. So each
# stage is spawned by this small launcher, which reports the stage's own rusage to argv[1]: peak
# memory (KB) and CPU seconds, which other jobs on the machine disturb less than wall time.
LAUNCHER = """
import os, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)  # a SIGINT to the group is for the stage; wait for its end
pid = os.posix_spawnp(sys.argv[2], sys.argv[2:], os.environ, setsigdef=(signal.SIGINT,))
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(f"{usage.ru_maxrss} {usage.ru_utime + usage.ru_stime}")
code = os.waitstatus_to_exitcode(status)
sys.exit(code if code >= 0 else 128 - code)
"""


@dataclass
class Result:
    """One cell of the table: a measured value (seconds, or a ratio) with its peak memory, or why not."""

    seconds: float | None
    peak_gb: float | None
    status: str  # "ok", or why there is no number: "failed (exit 1)", "timeout > 900 s", "needs index-ivf"
    unit: str = "s"  # "s", "ms" (a latency, still held in seconds) or "x" (a ratio)
    cpu_s: float | None = None  # CPU seconds (user + system, all threads) when measured

    def cell(self) -> str:
        if self.status != "ok":
            return self.status
        if self.unit == "x":
            return f"{self.seconds:.2f}x"
        if self.unit == "ms":
            return f"{self.seconds * 1000:.1f} ms"
        cpu = f" (cpu {self.cpu_s:.1f} s)" if self.cpu_s is not None else ""
        return f"{self.seconds:.1f} s{cpu}" + (f", {self.peak_gb:.2f} GB" if self.peak_gb is not None else "")

    @classmethod
    def ratio(cls, a: Result, b: Result) -> Result:
        """a / b in CPU time when both have it (less disturbed by other jobs), else in wall time."""
        if a.status != "ok" or b.status != "ok" or not b.seconds:
            return cls(None, None, "-")
        if a.cpu_s and b.cpu_s:
            return cls(a.cpu_s / b.cpu_s, None, "ok", "x")
        return cls(a.seconds / b.seconds, None, "ok", "x")


def growth_exponent(points: list[tuple[int, float]]) -> float | None:
    """Least-squares slope of log(value) against log(N); None with fewer than two sizes."""
    if len({n for n, _ in points}) < 2:
        return None
    x, y = np.log([p[0] for p in points]), np.log([p[1] for p in points])
    return float(np.polyfit(x, y, 1)[0])


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    """Start a stage through the launcher, in its own process group, output to log."""
    log.with_suffix(".maxrss").unlink(missing_ok=True)  # an earlier run's
    with open(log, "w") as out:  # the child keeps its own descriptor
        return subprocess.Popen([sys.executable, "-c", LAUNCHER, str(log.with_suffix(".maxrss")), *cmd],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)


def finish(proc: subprocess.Popen, log: Path, timeout: float | None, sig=None) -> tuple[bool, tuple | None]:
    """Wait for a stage (first sending sig to its group, when given; SIGKILL after timeout seconds);
    returns (whether it ended by itself, (peak GB, CPU seconds) when the launcher reported them)."""
    if sig is not None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:  # it has just ended
            pass
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return False, None
    usage = log.with_suffix(".maxrss")
    if not usage.is_file():
        return True, None
    kilobytes, cpu = usage.read_text().split()
    return True, (int(kilobytes) * 1024 / 1e9, float(cpu))  # Linux reports ru_maxrss in kilobytes


def run_stage(cmd: list[str], timeout: float, log: Path) -> Result:
    """Run a CLI stage to its end: wall time and its peak memory, or why it has none."""
    began = time.perf_counter()
    proc = start(cmd, log)
    ended, usage = finish(proc, log, timeout)
    seconds = time.perf_counter() - began
    if not ended:
        return Result(None, None, f"timeout > {timeout:.0f} s")
    code = proc.returncode
    if code != 0 or usage is None:
        return Result(None, None, f"failed (exit {code}, see {log.name})")
    return Result(seconds, usage[0], "ok", cpu_s=usage[1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(conn: http.client.HTTPConnection, path: str) -> int:
    conn.request("GET", path)
    response = conn.getresponse()
    response.read()
    return response.status


def wait_healthy(proc: subprocess.Popen, port: int, deadline: float, log: Path) -> str:
    """Poll /api/health until it answers 200: "ok", or why not (the server ended, the deadline)."""
    while time.perf_counter() < deadline:
        if proc.poll() is not None:
            return f"failed (exit {proc.returncode}, see {log.name})"
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            if get(conn, "/api/health") == 200:
                return "ok"
        except OSError:
            pass
        time.sleep(0.1)
    return "timeout"


def latency(port: int, template: str, fill: dict, count: int, rng: np.random.Generator) -> Result:
    """p50 of count sequential GETs of template ({id}: a random item) after three warm-up requests."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    times = []
    for i in range(count + 3):
        path = template.format(id=int(rng.integers(fill["n"])), **fill)
        began = time.perf_counter()
        status = get(conn, path)
        if status != 200:
            return Result(None, None, f"HTTP {status} for {path}")
        if i >= 3:
            times.append(time.perf_counter() - began)
    return Result(statistics.median(times), None, "ok", "ms")


def serve_stage(cmd: list[str], stage: str, requests: dict[str, str], fill: dict, count: int, timeout: float,
                log: Path) -> dict[str, Result]:
    """Start a server, time it until /api/health answers, measure the request latencies, stop it."""
    port = int(cmd[cmd.index("--port") + 1])
    began = time.perf_counter()
    proc = start(cmd, log)
    status = wait_healthy(proc, port, began + timeout, log)
    seconds = time.perf_counter() - began
    rng = np.random.default_rng(0)
    rows = {}
    try:
        for name, template in requests.items():
            ok = status == "ok"
            rows[name] = latency(port, template, fill, count, rng) if ok else Result(None, None, f"needs {stage}")
    except OSError as err:
        rows.update({name: Result(None, None, f"error: {err}") for name in requests if name not in rows})
    finally:
        usage = finish(proc, log, 30, signal.SIGINT)[1]
    if status == "timeout":
        rows[stage] = Result(None, None, f"timeout > {timeout:.0f} s")
    else:
        rows[stage] = Result(seconds, usage[0] if usage else None, status)
    return rows


def test_rows(catalog: Path) -> np.ndarray:
    """Row numbers of the test split in labels.csv (rows are embedded in catalogue order)."""
    with open(catalog / "labels.csv", newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        column = next(reader).index("split")
        return np.array([i for i, row in enumerate(reader) if row[column] == "test"], dtype=np.int64)


def matmul_floor(emb: Path, catalog: Path) -> Result:
    """Seconds of the blocked products X[block] @ X.T (no top-k) for every view of the test split,
    with the evaluation's own block size and score buffer (``bench_eval.floor_seconds``): what
    query = candidate evaluation cannot go below on this CPU."""
    import h5py

    from bench_eval import floor_seconds

    rows = test_rows(catalog)
    with h5py.File(emb, "r") as f:
        names = ["vectors", *[f"groups/{g}" for g in f.get("groups", {})]]
        matrices = [np.ascontiguousarray(f[name][:][rows], dtype=np.float32) for name in names]
    began_cpu = time.process_time()  # CPU time of all threads
    seconds = floor_seconds(matrices, "cpu", len(rows))
    return Result(seconds, None, "ok", cpu_s=time.process_time() - began_cpu)
