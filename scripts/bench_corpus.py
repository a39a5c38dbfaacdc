"""End-to-end corpus benchmark of the index and the server on synthetic data in the project's formats.

For each size N: a catalogue (labels.csv, 24 groups, ~830 labels, multi-label and missing cells,
worded titles; no image files) and EMB.h5 (256-d clustered shared vectors, one probability view per
group) are generated; then `retrieval index build --type T` runs for each T (wall time, peak RSS),
`retrieval serve` is started on the first type's index (seconds until /api/health answers, RSS,
private memory) and its latencies are measured (p50 / p99 of sequential requests):

    python scripts/bench_corpus.py --sizes 30000 100000 --types flat ivf
    python scripts/bench_corpus.py --sizes 300000 --types ivf --keep /tmp/corpus   # keep the files

Another checkout (e.g. `git archive main | tar -x -C /tmp/before`) is measured with --code DIR.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_index import make_mixture, sample_mixture  # noqa: E402

GROUPS = 24
LABELS = 830
MULTI_LABEL = (1, 7, 15)  # groups whose cells hold several labels joined by |
WORDS = ["shirt", "dress", "coat", "skirt", "jeans", "jacket", "top", "boot", "scarf", "cotton", "linen",
         "wool", "slim", "loose", "summer", "winter", "classic", "printed", "striped", "plain"]


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[30_000, 100_000])
    p.add_argument("--types", nargs="+", default=["flat", "ivf"], choices=["flat", "ivf", "hnsw", "ivfpq"])
    p.add_argument("--requests", type=int, default=100, help="requests per endpoint (default: 100)")
    p.add_argument("--code", default=str(Path(__file__).resolve().parents[1]), help="checkout to measure")
    p.add_argument("--keep", metavar="DIR", help="write the data here and keep it (default: a temporary dir)")
    p.add_argument("--seed", type=int, default=0)
    return p


def group_sizes(rng: np.random.Generator) -> np.ndarray:
    """24 vocabulary sizes between 2 and 80 summing to LABELS."""
    sizes = rng.integers(2, 70, GROUPS)
    sizes = np.maximum(2, np.round(sizes * LABELS / sizes.sum())).astype(int)
    sizes[np.argmax(sizes)] += LABELS - sizes.sum()
    return sizes


def label_cells(cluster: np.ndarray, n_clusters: int, sizes: np.ndarray, rng) -> tuple[list, dict]:
    """Per group the label codes per item (-1 unknown, a second label for multi-label groups) and probabilities."""
    codes, probs = [], {}
    for g, size in enumerate(sizes):
        own = rng.integers(0, size, n_clusters)[cluster]  # labels follow the clusters, with noise
        noisy = rng.random(len(cluster)) < 0.15
        own[noisy] = rng.integers(0, size, noisy.sum())
        second = np.where(rng.random(len(cluster)) < (0.4 if g in MULTI_LABEL else 0), rng.integers(0, size, len(cluster)), -1)
        p = rng.dirichlet(np.full(size, 0.3), len(cluster)).astype(np.float32) * 0.4
        p[np.arange(len(cluster)), own] += 0.6
        if g in MULTI_LABEL:
            p /= np.linalg.norm(p, axis=1, keepdims=True)
        own[rng.random(len(cluster)) < 0.1] = -1  # missing cells
        codes.append((own, second))
        probs[f"g{g:02d}"] = p
    return codes, probs


def write_corpus(root: Path, n: int, seed: int) -> tuple[Path, Path]:
    """Write root/catalog/labels.csv and root/emb.h5 of n synthetic items; return their paths."""
    rng = np.random.default_rng(seed + n)
    mixture = make_mixture(1000, 256, 64, rng)
    cluster = rng.choice(1000, n, p=mixture["weights"])
    x = sample_mixture(mixture, n, rng)  # its clusters are drawn afresh: labels follow `cluster` only loosely
    sizes = group_sizes(rng)
    codes, probs = label_cells(cluster, 1000, sizes, rng)
    words = np.array(WORDS)[rng.integers(0, len(WORDS), (n, 3))]
    (root / "catalog").mkdir(parents=True, exist_ok=True)
    header = ["image", "split", "title"] + list(probs)
    rows = [",".join(header)]
    for i in range(n):
        cells = []
        for g, (own, second) in enumerate(codes):
            cell = [f"l{g}_{own[i]}"] if own[i] >= 0 else []
            if own[i] >= 0 and second[i] >= 0 and second[i] != own[i]:
                cell.append(f"l{g}_{second[i]}")
            cells.append("|".join(cell))
        title = f"{words[i, 0]} {words[i, 1]} {words[i, 2]} style{cluster[i]}"
        rows.append(",".join([f"images/{i:07d}.jpg", "train" if i % 5 else "test", title, *cells]))
    (root / "catalog" / "labels.csv").write_text("\n".join(rows) + "\n")
    with h5py.File(root / "emb.h5", "w") as f:
        f.create_dataset("vectors", data=x)
        f.create_dataset("ids", data=np.arange(n, dtype=np.int64))
        f.create_dataset("paths", data=[f"images/{i:07d}.jpg" for i in range(n)], dtype=h5py.string_dtype())
        for g, p in probs.items():
            f.create_dataset(f"groups/{g}", data=p)
        f.attrs.update({"fingerprint": "bench", "catalog": str(root / "catalog"), "dimension": 256,
                        "groups": json.dumps(list(probs)),
                        "sigmoid_groups": json.dumps([f"g{g:02d}" for g in MULTI_LABEL])})
    return root / "catalog", root / "emb.h5"


def cli(code: str) -> list[str]:
    return ["nice", "-n", "10", "/usr/bin/time", "-f", "%e %M", sys.executable, "-m", "retrieval.cli"]


def run_timed(cmd: list[str], code: str) -> tuple[float, float]:
    """Run a command with /usr/bin/time; return (wall seconds, peak RSS GB)."""
    out = subprocess.run(cmd, cwd=code, env={**os.environ, "PYTHONPATH": code}, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    seconds, kb = out.stderr.strip().splitlines()[-1].split()
    return float(seconds), int(kb) / 1e6


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used (robust to other jobs on the machine, unlike wall time)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def memory(pid: int) -> dict[str, float]:
    """RSS, its anonymous (private) part and peak RSS of a process, GB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1e6
    return fields


def get(conn: http.client.HTTPConnection, url: str) -> float:
    """Milliseconds of one GET, which must answer 200."""
    start = time.perf_counter()
    conn.request("GET", url)
    response = conn.getresponse()
    body = response.read()
    if response.status != 200:
        raise RuntimeError(f"GET {url}: {response.status} {body[:300]!r}")
    return (time.perf_counter() - start) * 1000


def serve(index: Path, catalog: Path, code: str, requests: int, n: int, rng) -> dict:
    """Start `retrieval serve`; return start-up seconds, memory and p50/p99 ms per endpoint."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "retrieval.cli", "serve", "--index", str(index), "--catalog", str(catalog),
           "--port", str(port), "--threads", "2"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=code, env={**os.environ, "PYTHONPATH": code}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        while True:
            try:
                get(http.client.HTTPConnection("127.0.0.1", port, timeout=60), "/api/health")
                break
            except (ConnectionError, OSError):
                if proc.poll() is not None:
                    raise RuntimeError(f"serve exited with {proc.returncode}")
                time.sleep(0.2)
        row = {"startup_s": time.perf_counter() - start}
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        ids = rng.integers(0, n, requests)
        endpoints = {"similar k=50": [f"/api/items/{i}/similar?k=50" for i in ids],
                     "similar k=50 in g03": [f"/api/items/{i}/similar?k=50&view=group-g03" for i in ids],
                     "browse ?q=": [f"/?q={WORDS[i % len(WORDS)]}" for i in range(requests)],
                     "browse ?q= + filter": [f"/?q={WORDS[i % len(WORDS)]}&g00=l0_{i % 3}" for i in range(requests)],
                     "api items + 2 filters": [f"/api/items?g02=l2_{i % 2}&g05=l5_{i % 3}" for i in range(requests)]}
        for name, urls in endpoints.items():
            get(conn, urls[0])  # warm-up
            cpu = cpu_seconds(proc.pid)
            times = [get(conn, url) for url in urls]
            cpu_ms = (cpu_seconds(proc.pid) - cpu) / len(urls) * 1000
            row[name] = (float(np.percentile(times, 50)), float(np.percentile(times, 99)), cpu_ms)
        row.update(memory(proc.pid))
        return row
    finally:
        proc.terminate()
        proc.wait(30)


def bench(n: int, root: Path, args) -> None:
    """Generate the corpus of size n, build every index type, serve the first; print the rows."""
    began = time.perf_counter()
    catalog, emb = write_corpus(root, n, args.seed)
    print(f"\n## N = {n:,} (generated in {time.perf_counter() - began:.0f} s; EMB.h5 "
          f"{emb.stat().st_size / 1e9:.2f} GB)\n", flush=True)
    print("| stage | wall s | peak RSS GB | index dir GB |\n|---|---:|---:|---:|")
    for index_type in args.types:
        out = root / f"index-{index_type}"
        seconds, peak = run_timed(cli(args.code) + ["index", "build", "--embeddings", str(emb), "--out", str(out),
                                                     "--type", index_type, "--gpu", "off"], args.code)
        size = sum(p.stat().st_size for p in out.iterdir()) / 1e9
        print(f"| index build --type {index_type} | {seconds:.1f} | {peak:.2f} | {size:.2f} |", flush=True)
    for index_type in args.types:
        row = serve(root / f"index-{index_type}", catalog, args.code, args.requests, n, np.random.default_rng(1))
        print(f"\nserve ({index_type}): start-up until /api/health {row.pop('startup_s'):.1f} s; RSS "
              f"{row.pop('VmRSS'):.2f} GB (private {row.pop('RssAnon', 0):.2f}, file pages "
              f"{row.pop('RssFile', 0):.2f}), peak {row.pop('VmHWM'):.2f} GB\n")
        print("| endpoint | p50 ms | p99 ms | server CPU ms / request |\n|---|---:|---:|---:|")
        for name, (p50, p99, cpu_ms) in row.items():
            print(f"| {name} | {p50:.1f} | {p99:.1f} | {cpu_ms:.1f} |", flush=True)


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    for n in args.sizes:
        if args.keep:
            bench(n, Path(args.keep) / str(n), args)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                bench(n, Path(tmp), args)
    print(f"\ncode: {args.code}; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; requests "
          f"sequential, {args.requests} per endpoint")
    return 0


if __name__ == "__main__":
    sys.exit(main())
