"""The GPU machine's report: the README's flow with its defaults on a generated 5,000-item demo
catalog (full fine-tuning, early learning's rule and the filling on the device), training and
embedding throughput beside the model's own limit, query=candidate evaluation beside the
matrix-product floor, IVF build time at corpus size, and full fine-tuning beside the frozen-trunk
default on the development catalog. Prints one Markdown
document and writes it to WORK/gpu-check.md. ``--dry-run``: every step at tiny sizes (CPU is fine),
so the script cannot rot untested.

    python scripts/gpu_report.py --catalog ../shared/datasets/fashion-product-images --work out/gpu-check
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark scripts

from bench_eval import run_one  # noqa: E402
from bench_train import measure_limit, measure_loader, sync  # noqa: E402

from retrieval.atomic import write_text  # noqa: E402
from retrieval.data.catalog import read_catalog  # noqa: E402
from retrieval.data.datasets import ImageCache, ImageDataset, loader_workers  # noqa: E402
from retrieval.data.imagecache import build_image_cache  # noqa: E402
from retrieval.devices import resolve_device  # noqa: E402
from retrieval.embed.embedding import embed_catalog  # noqa: E402
from retrieval.experiments import Experiment, run_experiment  # noqa: E402
from retrieval.net.checkpoint import load_checkpoint  # noqa: E402
from retrieval.net.model import create_model  # noqa: E402

DATASET = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "fashion-product-images"
FULL = dict(backbone="efficientnet_lite0", image_size=288, batch_size=128, images=2048, embed_images=8192,
            eval_sizes=[100_000, 392_000], dim=256, ivf_size=1_460_000, epochs=30, workers=None,
            flow_items=5000, flow_epochs=15)
DRY = dict(backbone="tiny", image_size=64, batch_size=16, images=32, embed_images=60, eval_sizes=[1500, 3000],
           dim=256, ivf_size=20_000, epochs=1, workers=0, flow_items=60, flow_epochs=2)
STEPS = ["flow", "train", "embed", "evaluate", "ivf", "quality"]


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--catalog", default=str(DATASET), help="the development catalog (dry run: a generated demo)")
    p.add_argument("--work", default="out/gpu-check", help="runs, embeddings, reports and gpu-check.md")
    p.add_argument("--device", default="auto")
    p.add_argument("--dry-run", action="store_true", help="every step at tiny sizes, on whatever device there is")
    p.add_argument("--skip", nargs="*", default=[], choices=STEPS,
                   help="steps to leave out (e.g. when a device lease is short)")
    return p


def flow_rows(s: SimpleNamespace, device, dry_run: bool):
    """The README's flow with its defaults (train, embed, evaluate) on a generated demo catalog on the
    device: what ``auto`` chose, epoch times, the second runs, the means. The paths that only a full
    default run takes (full fine-tuning from 3,000 training items, early learning's rule, the filling)
    run here."""
    from retrieval.data.demo import make_demo_catalog

    work = Path(s.work) / "flow"
    catalog = work / "catalog"
    if not (catalog / "labels.csv").exists():
        make_demo_catalog(catalog, n_items=s.flow_items, seed=0, image_size=s.image_size if dry_run else 224)
    workers = ["--workers", "0"] if dry_run else []  # train and embed both take it; the model comes with the run
    small = ["--backbone", s.backbone, "--image-size", str(s.image_size)] if dry_run else []
    exp = run_experiment(Experiment("defaults", ["--epochs", str(s.flow_epochs), "--device", device.type, *small,
                                                 *workers], ["--device", device.type, *workers],
                                    ["--device", device.type]),
                         str(catalog), work)
    run = work / "defaults"
    ckpt = load_checkpoint(run / "last.pt")
    history = json.loads((run / "metrics.json").read_text())
    later = [r["seconds"] for r in history[1:]] or [history[0]["seconds"]]
    items = f"{s.flow_items:,}-item demo catalog"
    yield (f"README flow, {items}: training (s)", f"{exp.seconds.get('train', 0):.0f}",
           f"input {ckpt['input_mode']}; runs: {', '.join(sorted(p.name for p in run.glob('best*.pt')))}", None, "-")
    yield (f"README flow, {items}: epoch (s)", f"{np.median(later):.1f}",
           f"first epoch {history[0]['seconds']:.1f} s, first step after {history[0].get('first_step_s', 0):.1f} s",
           None, "-")
    mean = exp.report["mean"]
    yield (f"README flow, {items}: mAP@50 shared / group view (%)",
           f"{100 * mean['map_paper']:.1f} / {100 * mean['group_view']['map_paper']:.1f}",
           f"embed {exp.seconds.get('embed', 0):.0f} s, evaluate {exp.seconds.get('evaluate', 0):.0f} s", None, "-")


def training_rows(catalog, s: SimpleNamespace, device):
    """Training images/s from JPEGs and from the HDF5 image cache beside random tensors (one row
    at a time, so that a stopped run keeps the rows it measured)."""
    model = create_model(s.backbone, catalog.vocab, image_size=s.image_size, weights="none").to(device).train()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    limit = measure_limit(model, optimizer, s, device)
    ref = f"{limit:.0f} (forward+backward, random tensors)"
    jpeg = measure_loader(model, optimizer, ImageDataset(catalog, catalog.items, s.image_size), s, device)
    yield "training, JPEG decoding (img/s)", f"{jpeg:.0f}", ref, jpeg / limit, ">= 0.80"
    path = Path(s.work) / f"images-{s.image_size}.h5"
    build_image_cache(catalog, path, s.image_size, s.workers)
    cached = measure_loader(model, optimizer, ImageDataset(catalog, catalog.items, s.image_size, ImageCache(path)), s, device)
    yield "training, HDF5 image cache (img/s)", f"{cached:.0f}", ref, cached / limit, ">= 0.80"


@torch.no_grad()
def forward_rate(model, s: SimpleNamespace, device) -> float:
    """Images/s of the embedding forward (flip-averaged features, heads) on random tensors."""
    x = torch.randn(s.batch_size, 3, s.image_size, s.image_size, device=device)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        model.forward_heads(model.embed_pooled(model.view_features(x).float()))
        sync(device)
        steps, began = max(1, s.images // s.batch_size), time.perf_counter()
        for _ in range(steps):
            model.forward_heads(model.embed_pooled(model.view_features(x).float()))
        sync(device)
    return steps * s.batch_size / (time.perf_counter() - began)


def embed_rate(model, catalog, s: SimpleNamespace, device, image_cache) -> tuple[float, float]:
    """Steady images/s of ``embed_catalog`` into EMB.h5 and its fixed seconds (loader workers'
    start, probe, merge; 0 where timing noise makes the estimate negative), from one run over a
    quarter of the items (at least two batches) and one over all of them."""
    seconds = {}
    for n in (max(2 * s.batch_size, len(catalog.items) // 4), len(catalog.items)):
        part = copy.copy(catalog)
        part.items = catalog.items[:n]
        out = Path(s.work) / f"embed-{n}.h5"
        began = time.perf_counter()
        embed_catalog(model, part, out, {"fingerprint": "gpu-report"}, device, True, False, s.batch_size,
                      s.workers, image_cache)
        seconds[n] = time.perf_counter() - began
        out.unlink()
    (n1, t1), (n2, t2) = seconds.items()
    rate = (n2 - n1) / (t2 - t1) if t2 > t1 else n2 / t2  # the latter: noise on a busy machine
    return rate, max(0.0, t1 - n1 / rate)


def embedding_rows(catalog, s: SimpleNamespace, device):
    """Embedding images/s into EMB.h5 (decoded JPEGs or the HDF5 image cache, flip-averaged
    features, heads, the work file and the merge) beside the forward alone on random tensors."""
    model = create_model(s.backbone, catalog.vocab, image_size=s.image_size, weights="none", flip_average=True,
                         colour_bins="4,6,6").to(device).eval()
    limit = forward_rate(model, s, device)
    path = Path(s.work) / f"embed-images-{s.image_size}.h5"
    build_image_cache(catalog, path, s.image_size, s.workers)
    for name, cache in (("JPEG decoding", None), ("HDF5 image cache", ImageCache(path))):
        rate, fixed = embed_rate(model, catalog, s, device, cache)
        yield (f"embedding, {name} (img/s, EMB.h5 written)", f"{rate:.0f}",
               f"{limit:.0f} (forward, random tensors); {loader_workers(s.workers)} loader workers, "
               f"{fixed:.1f} s start-up and merge", rate / limit, ">= 0.80")


def evaluation_rows(s: SimpleNamespace, device):
    """Query=candidate mAP@50 time of every view at each size beside the blocked X @ X.T alone."""
    for n in s.eval_sizes:
        r = run_one(n, device.type, 50, queries=None, rounds=1)
        yield (f"evaluation, N = {n:,}, {r['views']} views (s)", f"{r['wall']:.1f}",
               f"{r['floor']:.1f} (blocked X @ X.T of every view)", r["wall"] / r["floor"], "-")


def ivf_rows(s: SimpleNamespace):
    """IVF build time (train, add, tune search depth) at corpus size (the only step that needs FAISS)."""
    import faiss
    from bench_index import make_mixture, sample_mixture

    from indexer import build_index

    rng = np.random.default_rng(0)
    x = sample_mixture(make_mixture(1000, s.dim, 64, rng), s.ivf_size, rng)
    began = time.perf_counter()
    build_index(x, np.arange(len(x)), "ivf", use_gpu="auto")
    seconds = time.perf_counter() - began
    where = f"{faiss.get_num_gpus()} GPU(s) seen by FAISS" if hasattr(faiss, "get_num_gpus") else "CPU"
    yield f"IVF build, N = {s.ivf_size:,}, d = {s.dim} (s)", f"{seconds:.0f}", where, None, "-"


def quality_section(catalog_dir: str, s: SimpleNamespace, device) -> str:
    """Full fine-tuning (images mode) beside the frozen-trunk default, per group, mAP@50 %."""
    common = ["--backbone", s.backbone, "--image-size", str(s.image_size), "--epochs", str(s.epochs),
              "--device", device.type, "--batch-size", str(s.batch_size)]
    if s.workers is not None:
        common += ["--workers", str(s.workers)]
    work = Path(s.work)
    runs = [run_experiment(Experiment("frozen-trunk", common + ["--trainable-blocks", "0"], ["--device", device.type]),
                           catalog_dir, work),
            run_experiment(Experiment("full-fine-tuning", common + ["--trainable-blocks", "all"],
                                      ["--device", device.type]), catalog_dir, work)]
    lines = ["| group | frozen trunk, shared | frozen trunk, group view | full fine-tuning, shared | "
             "full fine-tuning, group view |", "|---|---:|---:|---:|---:|"]
    for g in [*runs[0].report["groups"], "mean"]:
        cells = []
        for r in runs:
            entry = r.report["mean"] if g == "mean" else r.report["groups"][g]
            for v in (entry, entry.get("group_view") or {}):
                cells.append("–" if v.get("map_paper") is None else
                             f"{100 * v['map_paper']:.1f} / {100 * v['map_standard']:.1f}")
        lines.append(f"| {g} | " + " | ".join(cells) + " |")
    times = ", ".join(f"{r.name} training {r.seconds.get('train', 0):.0f} s" for r in runs)
    return "\n".join(lines) + f"\n\nmAP@50 %, paper / standard normalisation, test split; {times}."


def format_rows(rows: list[tuple]) -> str:
    lines = ["| measurement | value | reference | ratio | target |", "|---|---:|---|---:|---|"]
    for name, value, ref, ratio, target in rows:
        lines.append(f"| {name} | {value} | {ref} | {'–' if ratio is None else f'{ratio:.2f}'} | {target} |")
    return "\n".join(lines)


def prepare(args) -> tuple[SimpleNamespace, str]:
    """Sizes and the catalog: the development one, or a generated demo for a dry run."""
    s = SimpleNamespace(**(DRY if args.dry_run else FULL), work=args.work)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    catalog_dir = args.catalog
    if args.dry_run:
        from retrieval.data.demo import make_demo_catalog

        catalog_dir = str(Path(args.work) / "demo-catalog")
        if not (Path(catalog_dir) / "labels.csv").exists():
            make_demo_catalog(Path(catalog_dir), n_items=60, seed=0, image_size=64)
    return s, catalog_dir


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    device = resolve_device(args.device)
    s, catalog_dir = prepare(args)
    catalog = read_catalog(catalog_dir)
    few = copy.copy(catalog)  # training rows run over every item they are given
    catalog.items, few.items = catalog.items[: s.embed_images], catalog.items[: s.images + s.batch_size]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    head = [f"## GPU check on {name}{' (dry run, tiny sizes)' if args.dry_run else ''}", "",
            f"{s.backbone} at {s.image_size} px, batch {s.batch_size}, torch {torch.__version__}", ""]
    rows, quality = [], []

    def write() -> str:  # after every row, so that a run stopped by a time limit keeps what it measured
        text = "\n".join(head + [format_rows(rows)] + quality) + "\n"
        write_text(Path(args.work) / "gpu-check.md", text)
        return text

    steps = [("flow", lambda: flow_rows(s, device, args.dry_run)),
             ("train", lambda: training_rows(few, s, device)), ("embed", lambda: embedding_rows(catalog, s, device)),
             ("evaluate", lambda: evaluation_rows(s, device)), ("ivf", lambda: ivf_rows(s)),
             ("quality", lambda: ["", f"### Full fine-tuning vs the frozen-trunk default ({s.epochs} epochs, "
                                      f"{catalog_dir})", "", quality_section(catalog_dir, s, device)])]
    text = write()  # the header at once: the file exists even when every step is skipped
    for step, run in steps:
        if step in args.skip:
            continue
        if step == "quality":
            quality = run()
            text = write()
            continue
        for row in run():
            rows.append(row)
            print(format_rows([row]).splitlines()[-1], flush=True)
            text = write()
    print("\n" + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
