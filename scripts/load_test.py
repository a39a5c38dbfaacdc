"""Bounded loopback load test of a running `retrieval serve`: similar-by-id and search-by-upload.

    python scripts/load_test.py --url http://127.0.0.1:8000 --requests 200 --seconds 60 --concurrency 4
    python scripts/load_test.py --serve INDEX_DIR CATALOG RUN/best.pt     # starts the server itself

Prints a Markdown table of p50/p99 latency and requests/s per endpoint and whether the targets
(similar-by-id p50 < 20 ms, search-by-upload p50 < 150 ms) were met. Refuses non-loopback hosts.
"""
from __future__ import annotations

import argparse
import http.client
import ipaddress
import itertools
import json
import socket
import subprocess
import sys
import threading
import time
import uuid
from urllib.parse import urlsplit

TARGETS_MS = {"similar-by-id": 20.0, "search-by-upload": 150.0}


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
    """Send up to total requests from concurrency threads until deadline; return latencies and errors."""
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
            status, _ = fetch(conn, *make_request(n))
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


def main(argv=None) -> int:
    """Run the load test; exit code 0 when the targets were met."""
    args = get_args_parser().parse_args(argv)
    proc = None
    if args.serve:
        proc, args.url = start_server(*args.serve, args.threads)
    try:
        host, port = check_loopback(args.url)
        ids, photo = sample_items(host, port)
        body, headers = multipart("image", "query.jpg", photo)
        k = args.k
        requests = {
            "similar-by-id": lambda n: ("GET", f"/api/items/{ids[n % len(ids)]}/similar?k={k}"),
            "search-by-upload": lambda n: ("POST", f"/api/search?k={k}", body, headers),
        }
        deadline = time.perf_counter() + args.seconds
        results = {}
        for i, (name, make) in enumerate(requests.items()):
            share = deadline - (deadline - time.perf_counter()) * (len(requests) - i - 1) / (len(requests) - i)
            results[name] = run_endpoint(host, port, make, args.requests, share, args.concurrency)
        return 0 if report(results, args.concurrency) else 1
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(10)


if __name__ == "__main__":
    sys.exit(main())
