"""Bounded loopback load test of a running `retrieval serve`: similar-by-id and search-by-upload.

    python scripts/load_test.py --url http://127.0.0.1:8000 --requests 200 --seconds 60 --concurrency 4
    python scripts/load_test.py --serve INDEX_DIR CATALOG RUN/best.pt            # starts the server itself
    python scripts/load_test.py --serve INDEX_DIR CATALOG RUN/best.pt --soak 600  # index swapped every minute

Prints p50/p99 latency and requests/s per endpoint against the targets (similar-by-id p50 < 20 ms,
search-by-upload p50 < 150 ms), then the server's RSS (before, peak, after) around --large-uploads
concurrent 24-megapixel uploads. --soak: mixed traffic (one upload in 20) while the index directory is
re-saved (an atomic swap, like scripts/rebuild_index.sh) every --swap-every seconds; prints failed
requests, p99 and memory growth. Loopback hosts only; memory needs Linux /proc and the server's pid.
"""
from __future__ import annotations

import argparse
import http.client
import io
import ipaddress
import itertools
import json
import math
import socket
import subprocess
import sys
import threading
import time
import uuid
from contextlib import ExitStack, contextmanager
from pathlib import Path
from urllib.parse import urlsplit

TARGETS_MS = {"similar-by-id": 20.0, "search-by-upload": 150.0}
MAX_SOAK_SECONDS = 24 * 3600


def get_args_parser() -> argparse.ArgumentParser:
    """Parser of the load test."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (loopback only)")
    p.add_argument("--serve", nargs=3, metavar=("INDEX_DIR", "CATALOG", "CHECKPOINT"),
                   help="start `retrieval serve` on a free loopback port first (stopped at the end)")
    p.add_argument("--threads", type=int, default=4, help="server threads with --serve (default: 4)")
    p.add_argument("--requests", type=int, default=200, help="requests per endpoint, at most (default: 200)")
    p.add_argument("--seconds", type=float, default=60.0, help="time limit for the whole test (default: 60)")
    p.add_argument("--concurrency", type=int, default=4, help="client threads (default: 4)")
    p.add_argument("--k", type=int, default=12, help="results per request (default: 12)")
    p.add_argument("--large-uploads", type=int, default=20, metavar="N",
                   help="then N concurrent 24-megapixel uploads, reporting server RSS (default: 20; 0 skips)")
    p.add_argument("--pid", type=int, help="server process for memory figures (default: the --serve child)")
    p.add_argument("--soak", type=float, metavar="SECONDS", help="instead: mixed traffic for SECONDS (at most a day)")
    p.add_argument("--swap-every", type=float, default=60.0, metavar="SECONDS",
                   help="--soak: re-save the index directory this often (default: 60)")
    p.add_argument("--index-dir", help="--soak with --url: the server's INDEX_DIR to swap (known with --serve)")
    return p


def check_loopback(url: str) -> tuple[str, int]:
    """Return (host, port) of url, refusing hosts that do not resolve to loopback addresses only."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise SystemExit(f"load_test: only http://<loopback>:<port> URLs, got {url!r}")
    port = parts.port or 80
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(parts.hostname, port, proto=socket.IPPROTO_TCP)}
    except socket.gaierror as err:
        raise SystemExit(f"load_test: cannot resolve {parts.hostname!r}: {err}") from err
    if not addresses or not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses):
        raise SystemExit(f"load_test: refusing non-loopback host {parts.hostname!r} ({', '.join(sorted(addresses))})")
    return parts.hostname, port


def start_server(index: str, catalog: str, checkpoint: str, threads: int) -> tuple[subprocess.Popen, str]:
    """Start `retrieval serve` on a free loopback port; return (process, base URL) once it listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "retrieval.cli", "serve", "--index", index, "--catalog", catalog,
           "--checkpoint", checkpoint, "--port", str(port), "--threads", str(threads)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("Serving"):
            print(line.strip(), file=sys.stderr)
            threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep draining the pipe
            return proc, f"http://127.0.0.1:{port}"
    raise SystemExit(f"load_test: the server did not start (exit code {proc.wait()})")


def fetch(conn: http.client.HTTPConnection, method: str, path: str, body=None, headers=None) -> tuple[int, bytes]:
    """Send one request on a kept-alive connection; return (status, body)."""
    conn.request(method, path, body=body, headers=headers or {})
    response = conn.getresponse()
    return response.status, response.read()


def multipart(field: str, filename: str, data: bytes) -> tuple[bytes, dict]:
    """Return (body, headers) of a multipart/form-data upload of one file."""
    boundary = uuid.uuid4().hex
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\n"
            "Content-Type: image/jpeg\r\n\r\n").encode()
    return head + data + f"\r\n--{boundary}--\r\n".encode(), {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def sample_items(host: str, port: int) -> tuple[list[int], bytes]:
    """Return up to 100 item ids and the image bytes of the first item (used as the upload)."""
    conn = http.client.HTTPConnection(host, port, timeout=30)
    status, body = fetch(conn, "GET", "/api/items?per_page=100")
    if status != 200:
        raise SystemExit(f"load_test: GET /api/items answered {status}: {body[:200]!r}")
    items = json.loads(body)["items"]
    if not items:
        raise SystemExit("load_test: the index is empty")
    status, image = fetch(conn, "GET", items[0]["image_url"])
    conn.close()
    return [it["id"] for it in items], image


def run_endpoint(host, port, make_request, total: int, deadline: float, concurrency: int) -> dict:
    """Send up to total requests from concurrency threads until deadline; return latencies and errors
    (a status other than 200, or the name of a connection error: the connection is then reopened)."""
    counter, lock = itertools.count(), threading.Lock()
    latencies, errors = [], []

    def worker():
        conn = http.client.HTTPConnection(host, port, timeout=30)
        while time.perf_counter() < deadline:
            with lock:
                n = next(counter)
            if n >= total:
                break
            started = time.perf_counter()
            try:
                status, _ = fetch(conn, *make_request(n))
            except (OSError, http.client.HTTPException) as err:
                status = type(err).__name__
                conn.close()
                conn = http.client.HTTPConnection(host, port, timeout=30)
            elapsed = time.perf_counter() - started
            with lock:
                (latencies if status == 200 else errors).append(elapsed if status == 200 else status)
        conn.close()

    began = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"latencies": sorted(latencies), "errors": errors, "wall": time.perf_counter() - began}


def rss_mb(pid: int | None) -> float | None:
    """Return the resident memory of a process in MB (Linux /proc), None when unknown."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration, TypeError):
        return None


@contextmanager
def peak_rss(pid: int | None, interval: float = 0.02):
    """Yield a dict whose "peak" is the highest RSS (MB) of pid seen while the block runs."""
    seen, stop = {"peak": rss_mb(pid)}, threading.Event()

    def sample():
        while not stop.wait(interval):
            seen["peak"] = max(filter(None, (seen["peak"], rss_mb(pid))), default=None)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield seen
    finally:
        stop.set()
        sampler.join()


def mb(value: float | None) -> str:
    """Format MB for the report."""
    return "n/a" if value is None else f"{value:.0f} MB"


def memory_test(host: str, port: int, pid: int | None, photo: bytes, n: int, k: int) -> bool:
    """Send n 24-megapixel uploads (the sample photo enlarged) at once; print the server's RSS before,
    at its peak and after."""
    from PIL import Image

    with Image.open(io.BytesIO(photo)) as img:
        scale = math.sqrt(24e6 / (img.width * img.height))
        big = img.convert("RGB").resize((round(img.width * scale), round(img.height * scale)), Image.BILINEAR)
    buffer = io.BytesIO()
    big.save(buffer, "JPEG", quality=90)
    data = buffer.getvalue()
    body, headers = multipart("image", "large.jpg", data)
    before = rss_mb(pid)
    with peak_rss(pid) as seen:
        r = run_endpoint(host, port, lambda _: ("POST", f"/api/search?k={k}", body, headers), n,
                         time.perf_counter() + 300, n)
    print(f"\n{n} concurrent 24-megapixel uploads ({len(data) / 1e6:.1f} MB JPEG): {len(r['latencies'])} answered "
          f"200, {len(r['errors'])} failed, p50 {percentile(r['latencies'], 50):.0f} ms; server RSS before "
          f"{mb(before)}, peak {mb(seen['peak'])}, after {mb(rss_mb(pid))}")
    return not r["errors"]


def soak(host: str, port: int, make_request, seconds: float, concurrency: int, index_dir: str | None,
         swap_every: float, pid: int | None) -> bool:
    """Run mixed traffic for seconds, swapping the index every swap_every; print failures, p99, memory growth."""
    from indexer import IndexStore
    from retrieval.commands.index import index_lock

    stop, warm, marks, began = threading.Event(), min(10.0, seconds / 10), {"warm": None}, time.monotonic()
    swaps, skipped = [], []

    def background():
        marks["warm"] = None if stop.wait(warm) else rss_mb(pid)  # RSS once caches and pools are warm
        while index_dir and not stop.wait(began + swap_every * (len(swaps) + len(skipped) + 1) - time.monotonic()):
            with ExitStack() as held:  # under the index's update lock, as index add / build and rebuild_index.sh
                try:
                    held.enter_context(index_lock(Path(index_dir)))
                except ValueError:  # another process is changing the index: its save is not written over
                    skipped.append(time.monotonic())
                    continue
                IndexStore.load(index_dir).save(index_dir)  # written beside it, then renamed, as a rebuild
                swaps.append(time.monotonic())

    thread = threading.Thread(target=background, daemon=True)
    thread.start()
    with peak_rss(pid) as seen:
        r = run_endpoint(host, port, make_request, 1 << 62, time.perf_counter() + seconds, concurrency)
    stop.set()
    thread.join()
    end = rss_mb(pid)
    growth = "n/a" if None in (marks["warm"], end) else f"{end - marks['warm']:+.0f} MB"
    failed = f"{len(r['errors'])} failed" + (f" {sorted({str(e) for e in r['errors']})}" if r["errors"] else "")
    print(f"Soak {seconds:.0f} s, concurrency {concurrency}: {len(r['latencies']) + len(r['errors'])} requests, "
          f"{failed}, p50 {percentile(r['latencies'], 50):.1f} ms, p99 {percentile(r['latencies'], 99):.1f} ms, "
          f"{len(swaps)} index swaps{'' if index_dir else ' (no index dir)'}"
          f"{f' ({len(skipped)} left out: another process was changing the index)' if skipped else ''}; server RSS after {warm:.0f} s "
          f"warm-up {mb(marks['warm'])}, end {mb(end)} (growth {growth}), peak {mb(seen['peak'])}")
    return not r["errors"]


def percentile(values: list[float], q: float) -> float:
    """Return the q-th percentile (nearest rank) of sorted values, in milliseconds."""
    if not values:
        return float("nan")
    return 1000 * values[min(len(values) - 1, max(0, round(q / 100 * len(values)) - 1))]


def report(results: dict[str, dict], concurrency: int) -> bool:
    """Print the Markdown table; return True when every target was met."""
    print(f"| endpoint | requests | errors | p50 ms | p99 ms | req/s | target p50 | met |  (concurrency {concurrency})")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    met_all = True
    for name, r in results.items():
        p50 = percentile(r["latencies"], 50)
        met = p50 < TARGETS_MS[name] and not r["errors"]
        met_all &= met
        print(f"| {name} | {len(r['latencies'])} | {len(r['errors'])} | {p50:.1f} | {percentile(r['latencies'], 99):.1f} "
              f"| {len(r['latencies']) / r['wall']:.1f} | < {TARGETS_MS[name]:.0f} ms | {'yes' if met else 'NO'} |")
    print(f"\nTargets {'met' if met_all else 'NOT met'}.")
    return met_all


def latency_test(host: str, port: int, requests: dict, args) -> bool:
    """Run each endpoint in turn within --seconds; print the table; return True when the targets were met."""
    deadline = time.perf_counter() + args.seconds
    results = {}
    for i, (name, make) in enumerate(requests.items()):
        share = deadline - (deadline - time.perf_counter()) * (len(requests) - i - 1) / (len(requests) - i)
        results[name] = run_endpoint(host, port, make, args.requests, share, args.concurrency)
    return report(results, args.concurrency)


def main(argv=None) -> int:
    """Run the load test (or the soak); exit code 0 when the targets were met and nothing failed."""
    args = get_args_parser().parse_args(argv)
    if args.soak is not None and not 0 < args.soak <= MAX_SOAK_SECONDS:
        raise SystemExit(f"load_test: --soak takes 0 < SECONDS <= {MAX_SOAK_SECONDS}, got {args.soak}")
    proc = None
    if args.serve:
        proc, args.url = start_server(*args.serve, args.threads)
    try:
        host, port = check_loopback(args.url)
        pid = args.pid or (proc.pid if proc else None)
        ids, photo = sample_items(host, port)
        body, headers = multipart("image", "query.jpg", photo)
        k = args.k
        requests = {
            "similar-by-id": lambda n: ("GET", f"/api/items/{ids[n % len(ids)]}/similar?k={k}"),
            "search-by-upload": lambda n: ("POST", f"/api/search?k={k}", body, headers),
        }
        if args.soak:
            mixed = lambda n: requests["search-by-upload" if n % 20 == 0 else "similar-by-id"](n)  # noqa: E731
            index_dir = args.index_dir or (args.serve[0] if args.serve else None)
            return 0 if soak(host, port, mixed, args.soak, args.concurrency, index_dir, args.swap_every, pid) else 1
        met = latency_test(host, port, requests, args)
        if args.large_uploads > 0:
            met &= memory_test(host, port, pid, photo, args.large_uploads, k)
        return 0 if met else 1
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(10)


if __name__ == "__main__":
    sys.exit(main())
