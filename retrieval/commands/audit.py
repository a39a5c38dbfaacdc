"""``retrieval audit``: rank the catalogue's likely wrong, missing and conflicting labels into
``AUDIT_DIR/issues.csv``; ``retrieval audit apply`` writes a corrected copy from review decisions."""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from retrieval.atomic import write_text
from retrieval.audit.labels import audit_catalog, catalog_features, summarize, write_issues
from retrieval.commands.argtypes import at_least, share_up_to_one
from retrieval.data.catalog import group_list, read_catalog, select_groups
from retrieval.devices import resolve_device
from retrieval.net.checkpoint import load_model

logger = logging.getLogger(__name__)
ISSUES_FILE, SUMMARY_FILE, SETTINGS_FILE, DECISIONS_FILE = "issues.csv", "summary.md", "audit.json", "decisions.csv"


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="retrieval audit", description=(
        "Find catalogue labels that are likely wrong (confident learning on out-of-sample "
        "probabilities of k-fold heads over frozen trunk features), confident suggestions for empty "
        "cells and near-duplicates labelled differently. 'retrieval audit apply --help' applies "
        "review decisions to a copy of the catalog."))
    p.add_argument("--checkpoint", required=True, metavar="PT", help="a run's best.pt: its trunk and pooling")
    p.add_argument("--catalog", required=True, metavar="DIR")
    p.add_argument("--out", required=True, metavar="AUDIT_DIR")
    p.add_argument("--trunk-cache", metavar="H5", help="the run's trunk cache (default: RUN/trunk-cache.h5 if present)")
    p.add_argument("--groups", help="comma-separated groups to audit (default: all)")
    p.add_argument("--folds", type=at_least(2), default=5,
                   help="k of the k-fold heads (default: 5; at least 2: each item is scored by heads that never saw it)")
    p.add_argument("--min-confidence", type=share_up_to_one, default=0.9,
                   help="suggest a missing label at this probability (above 0, up to 1)")
    p.add_argument("--duplicate-threshold", type=share_up_to_one, default=0.98,
                   help="cosine of near-duplicate products (above 0, up to 1)")
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int)
    p.add_argument("--seed", type=int, default=0)
    return p


def get_apply_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="retrieval audit apply", description=(
        "Write a corrected copy of a catalog: each accepted decision (the last per image and group) "
        "sets that group's cell to the suggested labels. labels.csv itself is never edited."))
    p.add_argument("--catalog", required=True, metavar="DIR")
    p.add_argument("--decisions", required=True, metavar="CSV", help="AUDIT_DIR/decisions.csv")
    p.add_argument("--out", required=True, metavar="NEW_DIR")
    return p


def run_audit(args) -> Path:
    began = time.perf_counter()
    catalog = read_catalog(args.catalog)
    groups = group_list(args.groups, catalog.groups) if args.groups else list(catalog.groups)
    select_groups(catalog, groups)  # refuses unknown groups, naming the valid ones
    device = resolve_device(args.device)
    model, ckpt = load_model(args.checkpoint, device)
    start = ckpt.get("start_unit", len(model.trunk))
    if start < len(model.trunk):
        logger.warning("%s fine-tuned trunk units %d..: their features saw these labels; the audit is "
                       "sharper with a frozen-trunk run", args.checkpoint, start)
    cache = args.trunk_cache or Path(args.checkpoint).parent / "trunk-cache.h5"
    x, ok = catalog_features(model, catalog, start, cache if Path(cache).exists() else None, device,
                             workers=args.workers)
    issues = audit_catalog(catalog, x, ok, groups, args.folds, args.min_confidence, args.duplicate_threshold,
                           args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_issues(out / ISSUES_FILE, issues)
    table = summarize(issues, catalog, groups)
    write_text(out / SUMMARY_FILE, table + "\n")
    settings = {"catalog": str(Path(args.catalog).resolve()), "checkpoint": str(Path(args.checkpoint).resolve()),
                "groups": groups, "folds": args.folds, "min_confidence": args.min_confidence,
                "duplicate_threshold": args.duplicate_threshold, "seconds": round(time.perf_counter() - began, 1)}
    write_text(out / SETTINGS_FILE, json.dumps(settings, indent=2))
    print(table)
    print(f"\n{len(issues)} issues in {out / ISSUES_FILE} ({settings['seconds']} s); review them with "
          f"retrieval serve ... --audit {out} --review")
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(argv or [])
    if argv[:1] == ["apply"]:
        from retrieval.audit.decisions import apply_decisions, read_decisions

        args = get_apply_parser().parse_args(argv[1:])
        if not Path(args.decisions).is_file():
            raise FileNotFoundError(f"{args.decisions}: no such decisions file (the review writes "
                                    "AUDIT_DIR/decisions.csv)")
        changed = apply_decisions(args.catalog, read_decisions(args.decisions), args.out)
        print(f"Wrote {Path(args.out) / 'labels.csv'}: {changed} cell(s) changed by accepted decisions")
        return 0
    run_audit(get_args_parser().parse_args(argv))
    return 0
