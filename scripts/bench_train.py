"""Training images/s: JPEG decoding vs the pre-decoded HDF5 cache vs the backbone's own limit.

The limit is forward+backward of the whole model on random tensors already on the device; a data
path should reach at least 80% of it. Prints a Markdown table.

    python scripts/bench_train.py --catalog ../shared/datasets/fashion-product-images --images 256
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from retrieval.data.catalog import read_catalog
from retrieval.data.datasets import ImageCache, ImageDataset, collate_images, loader_workers
from retrieval.data.imagecache import build_image_cache
from retrieval.data.images import augment_batch, normalize_batch
from retrieval.devices import resolve_device
from retrieval.net.model import create_model


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--catalog", default=str(Path(__file__).resolve().parents[2] / "shared/datasets/fashion-product-images"))
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--images", type=int, default=256, help="images per measurement")
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int)
    return p


def train_step(model, optimizer, x, device):
    """One full forward+backward+step (bf16 autocast on CUDA)."""
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        emb, logits, _ = model(x)
        loss = sum(z.float().logsumexp(1).mean() for z in logits.values())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure_limit(model, optimizer, args, device) -> float:
    """Images/s of training steps on random tensors already on the device."""
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    train_step(model, optimizer, x, device)
    sync(device)
    steps = max(1, args.images // args.batch_size)
    began = time.perf_counter()
    for _ in range(steps):
        train_step(model, optimizer, x, device)
    sync(device)
    return steps * args.batch_size / (time.perf_counter() - began)


def measure_loader(model, optimizer, dataset, args, device) -> float:
    """Images/s of training steps fed by a DataLoader over ``dataset`` (decode/read + augment)."""
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=loader_workers(args.workers),
                        collate_fn=collate_images, pin_memory=device.type == "cuda", drop_last=True)
    seen, began = 0, None
    for images, _, _ in loader:
        x = normalize_batch(augment_batch(images.to(device, non_blocking=True)))
        train_step(model, optimizer, x, device)
        if began is None:  # first batch warms the workers up
            sync(device)
            began = time.perf_counter()
            continue
        seen += len(images)
    sync(device)
    return seen / (time.perf_counter() - began)


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    device = resolve_device(args.device)
    catalog = read_catalog(args.catalog)
    catalog.items = catalog.items[: args.images + args.batch_size]
    model = create_model(args.backbone, catalog.vocab, image_size=args.image_size).to(device).train()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    rows = [("forward+backward on random tensors (limit)", measure_limit(model, optimizer, args, device))]
    rows.append(("JPEG decoding", measure_loader(model, optimizer, ImageDataset(catalog, catalog.items, args.image_size),
                                                 args, device)))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "images.h5"
        build_image_cache(catalog, path, args.image_size, args.workers)
        dataset = ImageDataset(catalog, catalog.items, args.image_size, ImageCache(path))
        rows.append(("pre-decoded HDF5 cache", measure_loader(model, optimizer, dataset, args, device)))
    limit = rows[0][1]
    print(f"\n{args.backbone} at {args.image_size}px, batch {args.batch_size}, {device}, "
          f"{loader_workers(args.workers)} loader workers\n")
    print("| input | images/s | share of limit |\n|---|---:|---:|")
    for name, rate in rows:
        print(f"| {name} | {rate:.1f} | {rate / limit:.0%} |")
    print(f"\nHDF5 cache reaches {rows[2][1] / limit:.0%} of the limit (target 80%): "
          f"{'met' if rows[2][1] >= 0.8 * limit else 'NOT met'}")


if __name__ == "__main__":
    main()
