"""``retrieval embed``: shared-layer embeddings (and group-focused vectors) of a catalog into EMB.h5."""
from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
from pathlib import Path

import torch
import torch.distributed as dist

from retrieval.commands.argtypes import image_size
from retrieval.data.catalog import LABELS_FILE, read_catalog
from retrieval.data.datasets import ImageCache
from retrieval.data.embfile import (GROUP_VIEW_PRIOR, HEAD_LABELS, MULTI_LABEL_VIEW_ATTR, MULTI_LABEL_VIEW_POWER,
                                    SHARED_VIEW_WEIGHTS)
from retrieval.devices import resolve_device, setup_distributed
from retrieval.embed.embedding import embed_catalog
from retrieval.embed.inference import open_trunk_cache
from retrieval.embed.shards import check_out
from retrieval.net.backbones import BACKBONES
from retrieval.net.checkpoint import load_model
from retrieval.net.model import POOL_WEIGHTINGS, SHARED_VIEWS, create_model

logger = logging.getLogger(__name__)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="retrieval embed", description=(
        "Embed every catalog image with the model's shared layers into HDF5: the shared view's vectors "
        "(the shared embedding, followed by every group's probabilities as the model's --shared-view "
        "says, or --shared-view here), each group's head-focused vectors and probabilities. "
        "Interrupted runs resume. Under torchrun "
        "(--nproc-per-node N, several nodes through its rendezvous) the rows are cut into shards, one "
        "resumable work file each beside --out, which rank 0 merges into the same file one process writes."))
    p.add_argument("--checkpoint", metavar="PT", help="trained checkpoint (RUN/best.pt)")
    p.add_argument("--reuse", metavar="EMB.h5|none", default=None,
                   help="an earlier embeddings file of the same model and options: the rows of images unchanged "
                        "since (same path, size and modification time) are copied from it, the others computed "
                        "(default: --out itself when it is one; none: compute every image)")
    p.add_argument("--pretrained-only", action="store_true",
                   help="no training: embed with the ImageNet trunk's pooled features (the off-the-shelf baseline)")
    p.add_argument("--backbone", default="efficientnet_lite0", choices=BACKBONES, help="with --pretrained-only")
    p.add_argument("--weights", help="with --pretrained-only: local trunk weights file")
    p.add_argument("--taps", default="last", help="with --pretrained-only: pooled units (last, all, or e.g. 2,3,4: "
                                                  "numbers from 0, -1 the last); several are standardised and "
                                                  "concatenated")
    p.add_argument("--gem-p", type=float, default=1.0, help="with --pretrained-only: pooling exponent (1 = average)")
    p.add_argument("--image-size", type=image_size, default=224, help="with --pretrained-only")
    p.add_argument("--pool-weighting", default="none", choices=POOL_WEIGHTINGS, help="with --pretrained-only")
    p.add_argument("--colour-bins", default="none", metavar="L,A,B",
                   help="with --pretrained-only: prepend a CIELAB colour histogram (e.g. 4,6,6)")
    p.add_argument("--shared-view", choices=SHARED_VIEWS,
                   help="with --checkpoint: what the shared view holds, instead of the model's own setting (an "
                        "older model's catalogue embedded as today's default, without training again): matches, "
                        "with-groups or embedding (see 'retrieval train --help')")
    p.add_argument("--catalog", required=True, metavar="DIR")
    p.add_argument("--out", required=True, metavar="EMB.h5")
    p.add_argument("--split", default="all", choices=("all", "train", "val", "test"))
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int)
    p.add_argument("--image-cache", metavar="H5", help="pre-decoded images from 'retrieval cache'")
    p.add_argument("--trunk-cache", metavar="H5", help="reuse the trunk cache of a frozen-trunk training run")
    g = p.add_argument_group("shards (torchrun)")
    g.add_argument("--shards", type=int, metavar="K",
                   help="cut the rows into K shards (default: the count of the work files beside --out, else "
                        "one per rank); ranks take shards rank, rank + world, ...")
    g.add_argument("--merge-only", action="store_true",
                   help="compute nothing: merge the finished shards beside --out (same other options as the run)")
    return p


# ranks wait at the final barrier for the slowest: after a resume one may have hours of rows left
BARRIER_TIMEOUT = dt.timedelta(hours=12)


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    if bool(args.checkpoint) == bool(args.pretrained_only):
        raise ValueError("give either --checkpoint RUN/best.pt or --pretrained-only")
    if args.shared_view and args.pretrained_only:
        raise ValueError("--shared-view needs --checkpoint: the off-the-shelf trunk has no heads")
    rank, _, device = setup_distributed(resolve_device(args.device), BARRIER_TIMEOUT)
    try:
        return embed(args, rank, device)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def embed(args, rank: int, device) -> int:
    """The command proper, on one rank."""
    out = Path(args.out)
    # before the embedding, not at its merge: never replace a checkpoint, the labels or another file
    check_out(out, {"--checkpoint": args.checkpoint, "the catalog's labels.csv": Path(args.catalog) / LABELS_FILE,
                    "--image-cache": args.image_cache, "--trunk-cache": args.trunk_cache})
    catalog = read_catalog(args.catalog)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.pretrained_only:
        # a trunk without packaged weights starts random: the same on every rank and in every resumed run
        torch.manual_seed(0)
        model = create_model(args.backbone, {}, 1, method="multi-task", weights=args.weights, taps=args.taps,
                             gem_p=args.gem_p, image_size=args.image_size, pool_weighting=args.pool_weighting,
                             colour_bins=args.colour_bins, flip_average=False)
        model.embed = torch.nn.Identity()
        model.embed_pooled = lambda pooled: pooled
        start = len(model.trunk)
        fp = f"pretrained:{args.backbone}:{args.taps}:gem{args.gem_p}:{args.pool_weighting}:{args.colour_bins}"
        heads, standardise = False, len(model.taps) > 1 or model.colour_dim > 0
        if not standardise:
            model.embed_pooled = lambda pooled: torch.nn.functional.normalize(pooled, dim=1)
    else:
        model, ckpt = load_model(args.checkpoint)
        theirs, ours = list(model.config.groups), catalog.groups
        if set(theirs) != set(ours) and rank == 0:  # a checkpoint of another catalog: views and filters part ways
            logger.warning("%s was trained on groups %s, the catalog has %s: group views follow the model, "
                           "labels and filters the catalog (only %s have both)", args.checkpoint, ", ".join(theirs),
                           ", ".join(ours), ", ".join(g for g in ours if g in theirs) or "none")
        if args.shared_view:
            model.config.shared_view = args.shared_view
        start, fp = ckpt.get("start_unit", 0), ckpt["fingerprint"]
        heads, standardise = True, False
    trunk_cache = open_trunk_cache(args.trunk_cache, model, catalog, start) if args.trunk_cache else None
    meta = {"fingerprint": fp, "backbone": model.config.backbone, "catalog": str(Path(args.catalog).resolve()),
            "split": args.split, "sigmoid_groups": json.dumps(model.sigmoid_groups if heads else []),
            "image_size": model.config.image_size}  # what else tells the rows apart (--reuse, a resume)
    if args.pretrained_only:  # a checkpoint's fingerprint covers its weights; a local weights file, by its stat
        weights = Path(args.weights) if args.weights else None
        meta["weights"] = f"{weights.resolve()}:{weights.stat().st_size}:{weights.stat().st_mtime_ns}" if weights \
            else "packaged"
    if heads:  # the vectors' first embedding_dim columns, L2-normalised, are the shared embedding alone
        meta.update(shared_view=model.config.shared_view, embedding_dim=model.config.embed_dim)
        meta[HEAD_LABELS] = json.dumps(model.config.groups)  # what probs/'s columns are, whatever the catalog becomes
        if model.sigmoid_groups:  # group_vectors' rule for them, so that index add mixes no other
            meta[MULTI_LABEL_VIEW_ATTR] = MULTI_LABEL_VIEW_POWER
        if model.config.shared_view == "matches" and model.shared_view_weights:  # what weighed the groups
            meta[SHARED_VIEW_WEIGHTS] = json.dumps(model.shared_view_weights)
        if model.group_view_prior:  # the groups whose views were mixed with the other heads' say, and how much
            meta[GROUP_VIEW_PRIOR] = json.dumps(model.group_view_prior["strength"])
    image_cache = ImageCache(args.image_cache) if args.image_cache else None
    reuse = None if args.reuse == "none" else Path(args.reuse) if args.reuse else out
    if args.reuse not in (None, "none") and not reuse.is_file() and rank == 0:
        logger.warning("--reuse %s: no such file; computing every image", reuse)
    attrs = embed_catalog(model, catalog, out, meta, device, heads, standardise, args.batch_size, args.workers,
                          image_cache, trunk_cache, start, args.split, args.shards, args.merge_only, reuse)
    if rank != 0:
        return 0
    print(f"{'Left' if attrs.get('unchanged') else 'Wrote'} {out}"
          f"{' as it was (every image unchanged since it was written)' if attrs.get('unchanged') else ''}: "
          f"{attrs['count']} vectors of dimension {attrs['dimension']}, "
          f"groups {', '.join(json.loads(attrs['groups'])) or '-'}, fingerprint {fp[:16]}")
    return 0
