"""Measure the label audit: flip a known 5% of one group's training labels and blank another 5% in a
copy of a catalog, run ``retrieval audit``, and print precision / recall of finding the flipped ones
in the top k (k = the number flipped) beside a random ranking drawn in the same run, the accuracy of
the suggestions for the blanked ones, and the group's test mAP@50 trained on the clean, the noisy
and the fixed labels (found flips restored, confident suggestions accepted).

    python scripts/experiment_audit.py --catalog ../shared/datasets/fashion-product-images \\
        --trunk-cache RUN/trunk-cache.h5 --work /tmp/audit-exp
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import time
from pathlib import Path

import numpy as np

from retrieval.atomic import atomic_write, write_text
from retrieval.cli import main as cli
from retrieval.data.catalog import LABELS_FILE, decode_labels_file, link_or_copy
from retrieval.experiments import TRAINED, trained


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--catalog", required=True)
    p.add_argument("--work", required=True)
    p.add_argument("--group", default="articleType", help="the group whose labels are flipped and blanked")
    p.add_argument("--share", type=float, default=0.05, help="share of its training labels flipped (and blanked)")
    p.add_argument("--trunk-cache", help="a frozen-trunk cache of the catalog, shared by every run")
    p.add_argument("--train-args", default="", help="extra 'retrieval train' options (e.g. for a tiny test run)")
    p.add_argument("--seed", type=int, default=0)
    return p


def read_rows(root: Path) -> tuple[list[str], list[dict]]:
    reader = csv.DictReader(io.StringIO(decode_labels_file(root / LABELS_FILE), newline=""))
    return list(reader.fieldnames), list(reader)


def write_catalog(src: Path, out: Path, header: list[str], rows: list[dict]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    for row in rows:
        link_or_copy(src / row["image"], out / row["image"])
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, header)
    writer.writeheader()
    writer.writerows(rows)
    labels = out / LABELS_FILE
    if not labels.exists() or labels.read_bytes() != text.getvalue().encode():  # the same rows: its runs stand
        with atomic_write(labels, newline="") as f:  # last: a stopped run leaves no half catalog
            f.write(text.getvalue())
    return out


def corrupt(rows: list[dict], group: str, share: float, rng) -> tuple[dict, dict]:
    """Flip ``share`` of the group's single-label training cells to another label, blank as many
    others; returns ({image: true label} flipped, {image: true label} blanked)."""
    candidates = [r for r in rows if r.get("split", "train") == "train" and r[group] and "|" not in r[group]]
    vocab = sorted({r[group] for r in candidates})
    chosen = rng.permutation(len(candidates))
    n = round(share * len(candidates))
    flipped, blanked = {}, {}
    for i in chosen[:n]:
        row = candidates[i]
        flipped[row["image"]] = row[group]
        row[group] = rng.choice([v for v in vocab if v != row[group]])
    for i in chosen[n:2 * n]:
        row = candidates[i]
        blanked[row["image"]] = row[group]
        row[group] = ""
    return flipped, blanked


def train_and_score(name: str, catalog: Path, work: Path, args) -> dict:
    """Train (default options, shared trunk cache), embed, evaluate; the group's test mAP@50."""
    run, emb, report = work / name, work / f"{name}.h5", work / f"{name}-report"
    cache = ["--trunk-cache", args.trunk_cache] if args.trunk_cache else []
    began = time.perf_counter()
    if not trained(run, str(catalog)):  # best.pt alone: a stopped run has one from its first epoch
        resume = ["--resume"] if (run / "last.pt").exists() else []
        assert cli(["train", "--catalog", str(catalog), "--out", str(run), *cache, *args.train_args.split(),
                    *resume]) == 0
        write_text(run / TRAINED, "retrieval train\n")
    if not emb.exists():
        assert cli(["embed", "--checkpoint", str(run / "best.pt"), "--catalog", str(catalog), "--out", str(emb),
                    *cache]) == 0
    assert cli(["evaluate", "--embeddings", str(emb), "--catalog", str(catalog), "--out", str(report)]) == 0
    g = json.loads((report / "report.json").read_text())["groups"][args.group]
    return {"shared": g["map_paper"], "view": g["group_view"]["map_paper"], "s": time.perf_counter() - began}


def audit_scores(issues: list[dict], group: str, flipped: dict, blanked: dict, n_labelled: int, rng) -> dict:
    wrong = [i for i in issues if i["group"] == group and i["kind"] == "wrong"]
    k = len(flipped)
    top = [i["image"] for i in wrong[:k]]
    hits = sum(1 for image in top if image in flipped)
    random_hits = int(rng.hypergeometric(k, n_labelled - k, k))  # a random ranking of the labelled cells
    missing = {i["image"]: i for i in issues if i["group"] == group and i["kind"] == "missing" and i["image"] in blanked}
    confident = [m for m in missing.values() if float(m["score"]) >= 0.9]
    return {"k": k, "flagged": len(wrong), "precision": hits / max(1, len(top)), "recall": hits / max(1, k),
            "random": random_hits / max(1, k), "found": top,
            "suggest_all": np.mean([missing[b]["suggested"] == t for b, t in blanked.items() if b in missing]),
            "suggest_conf": np.mean([m["suggested"] == blanked[m["image"]] for m in confident]) if confident else None,
            "confident": len(confident), "blanked": len(blanked)}


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    src, work = Path(args.catalog), Path(args.work)
    rng = np.random.default_rng(args.seed)
    header, rows = read_rows(src)
    flipped, blanked = corrupt(rows, args.group, args.share, rng)
    noisy = write_catalog(src, work / "noisy-catalog", header, rows)
    audit = work / "audit"
    began = time.perf_counter()
    results = {"noisy": train_and_score("noisy", noisy, work, args)}
    assert cli(["audit", "--checkpoint", str(work / "noisy" / "best.pt"), "--catalog", str(noisy), "--out", str(audit),
                "--groups", args.group, "--min-confidence", "0", *(["--trunk-cache", args.trunk_cache]
                                                                 if args.trunk_cache else [])]) == 0
    audit_s = json.loads((audit / "audit.json").read_text())["seconds"]
    with open(audit / "issues.csv", newline="") as f:
        issues = list(csv.DictReader(f))
    n_labelled = sum(1 for r in rows if r.get("split", "train") == "train" and r[args.group])
    s = audit_scores(issues, args.group, flipped, blanked, n_labelled, rng)
    confident = {i["image"]: i["suggested"] for i in issues if i["kind"] == "missing" and float(i["score"]) >= 0.9}
    for row in rows:  # a reviewer restores the flips the audit found and accepts confident suggestions
        if row["image"] in s["found"] and row["image"] in flipped:
            row[args.group] = flipped[row["image"]]
        elif row["image"] in confident and not row[args.group]:
            row[args.group] = confident[row["image"]]
    fixed = write_catalog(src, work / "fixed-catalog", header, rows)
    results["fixed"] = train_and_score("fixed", fixed, work, args)
    results["clean"] = train_and_score("clean", src, work, args)
    print(f"\n{args.group}: {len(flipped)} training labels flipped, {len(blanked)} blanked "
          f"(of {n_labelled + len(blanked)} labelled); audit {audit_s:.0f} s, {s['flagged']} flagged as wrong\n")
    print("| | value |\n|---|---:|")
    print(f"| precision@k of the flipped labels (k = {s['k']}) | {100 * s['precision']:.1f}% |")
    print(f"| recall@k | {100 * s['recall']:.1f}% |")
    print(f"| random ranking, precision@k (same run) | {100 * s['random']:.1f}% |")
    print(f"| suggestions for blanked cells, accuracy (all {s['blanked']}) | {100 * s['suggest_all']:.1f}% |")
    if s["suggest_conf"] is not None:
        print(f"| suggestions at probability >= 0.9 ({s['confident']} of {s['blanked']}), accuracy | "
              f"{100 * s['suggest_conf']:.1f}% |")
    print(f"\n| training labels | {args.group} mAP@50 shared | group view | s |\n|---|---:|---:|---:|")
    for name in ("clean", "noisy", "fixed"):
        r = results[name]
        print(f"| {name} | {100 * r['shared']:.1f} | {100 * r['view']:.1f} | {r['s']:.0f} |")
    print(f"\ntotal {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
