"""Label audit: out-of-sample probabilities for every catalogue item (k-fold heads on frozen trunk
features), then per group the labels most likely wrong (confident learning, ``cleanlab``), confident
suggestions for empty cells, and near-duplicate products whose labels disagree."""
from __future__ import annotations

import csv
import logging
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from retrieval.atomic import atomic_write
from retrieval.data.catalog import Catalog
from retrieval.data.datasets import ImageDataset, build_targets, collate_images, loader_workers
from retrieval.data.images import normalize_batch
from retrieval.embed.inference import cached_pooled, open_trunk_cache
from retrieval.evaluate.metrics import normalize_rows, topk_neighbors
from retrieval.net.backbones import fold_batchnorm
from retrieval.train.losses import multi_group_loss

logger = logging.getLogger(__name__)

KINDS = ("wrong", "missing", "conflicting-duplicate")
# a group with more of its labelled items flagged wrong than this share is one the features see poorly:
# clean multi-item stand-ins flag 6-71% a group, one with 30% of the labels swapped 21-78% (README)
CROWDED_SHARE = 0.25


@dataclass
class Issue:
    """One row of issues.csv: a label that looks wrong, a missing one, or a duplicate's conflict."""

    image: str
    group: str
    given: str
    suggested: str
    score: float
    kind: str
    neighbours: str = ""  # nearest items labelled in the group (evidence), images joined by '|'


@torch.no_grad()
def catalog_features(model, catalog: Catalog, start: int, trunk_cache=None, device="cpu",
                     batch_size: int = 64, workers: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Pooled trunk features of every item (mean of the image and its mirror) and which items were
    readable: from the run's trunk cache when it serves this catalog, else computed from the images."""
    cache = open_trunk_cache(trunk_cache, model, catalog, start) if trunk_cache else None
    model.eval().to(device)
    if cache is not None and start == len(model.trunk):
        return _cached_features(model, cache, start, batch_size, device), cache.ok.copy()
    n = len(catalog.items)
    ok, feats = np.zeros(n, bool), None
    loader = DataLoader(ImageDataset(catalog, catalog.items, model.config.image_size), batch_size=batch_size,
                        num_workers=loader_workers(workers), collate_fn=collate_images)
    units = fold_batchnorm(model.trunk.units)  # the same function, faster
    for images, index, _ in loader:
        if images is None:
            continue
        pooled = model.embedding_input(model.view_features(normalize_batch(images.to(device)), views=2,
                                                           units=units))  # and its mirror
        if feats is None:
            feats = np.zeros((n, pooled.shape[1]), np.float32)
        feats[index.numpy()], ok[index.numpy()] = pooled.float().cpu().numpy(), True
    return (feats if feats is not None else np.zeros((n, 1), np.float32)), ok


def _cached_features(model, cache, start: int, batch_size: int, device) -> np.ndarray:
    """Pooled features of every cached row (the model pools what the cache holds: with the learned
    colour weighting, per-cell colour mass into the histogram), the mean of both views."""
    parts = []
    for chunk in torch.arange(len(cache.ok)).split(max(batch_size, 256)):
        views = [cached_pooled(model, cache, chunk, view, start, device) for view in (0, 1)]
        parts.append(model.embedding_input((views[0] + views[1]) / 2).float().cpu().numpy())
    return np.concatenate(parts) if parts else np.zeros((0, model.feature_dim), np.float32)


def fold_of(n: int, folds: int, seed: int = 0) -> np.ndarray:
    """Fold number of each of ``n`` items: a seeded permutation dealt round-robin."""
    fold = np.empty(n, np.int64)
    fold[np.random.default_rng(seed).permutation(n)] = np.arange(n) % folds
    return fold


def out_of_fold_probabilities(x: np.ndarray, catalog: Catalog, multi_label: set[str], folds: int = 5,
                              steps: int = 300, seed: int = 0) -> dict[str, np.ndarray]:
    """Per group, every item's label probabilities from linear heads trained on the other folds
    (softmax for single-label groups, sigmoids for multi-label ones): no item is scored by a model
    that saw its label."""
    x = reduce_dimensions(torch.from_numpy((x - x.mean(0)) / (x.std(0) + 1e-6)).float(), seed=seed)
    targets = build_targets(catalog.items, catalog.vocab)
    kinds = {g: "bce" if g in multi_label else "ce" for g in catalog.groups}
    fold = fold_of(len(x), folds, seed)
    probs = {g: np.zeros((len(x), len(v)), np.float32) for g, v in catalog.vocab.items()}
    for k in range(folds):
        train, held = np.flatnonzero(fold != k), np.flatnonzero(fold == k)
        heads = _fit_heads(x[train], targets.take(torch.from_numpy(train)), kinds, steps, seed + k)
        with torch.no_grad():
            for g, head in heads.items():
                z = head(x[held])
                probs[g][held] = (torch.sigmoid(z) if kinds[g] == "bce" else z.softmax(1)).numpy()
    return probs


def reduce_dimensions(x: torch.Tensor, dims: int = 256, seed: int = 0) -> torch.Tensor:
    """Standardised principal components (at most ``dims``): the k-fold heads then train ~9x
    faster on a 2,208-wide trunk feature, with the variance that separates products kept. The
    randomised PCA draws from a generator seeded by ``seed`` (it drew from torch's global one: two
    audits of one catalog listed 1,548 and 1,551 issues)."""
    if x.shape[1] <= dims:
        return x
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        u, s, v = torch.pca_lowrank(x, q=min(dims, *x.shape), center=True, niter=3)
    z = (x - x.mean(0)) @ v
    return (z - z.mean(0)) / (z.std(0) + 1e-6)


def _fit_heads(x: torch.Tensor, targets, kinds: dict[str, str], steps: int, seed: int) -> dict[str, torch.nn.Linear]:
    """Linear heads for every group, trained full-batch with AdamW and weight decay."""
    torch.manual_seed(seed)
    heads = torch.nn.ModuleDict({f"h{i}": torch.nn.Linear(x.shape[1], t.shape[1])
                                 for i, t in enumerate(targets.multi_hot.values())})
    optimizer = torch.optim.AdamW(heads.parameters(), lr=1e-2, weight_decay=1e-2)
    groups = list(targets.multi_hot)
    weights = {g: 1.0 for g in groups}
    for _ in range(steps):
        logits = {g: head(x) for g, head in zip(groups, heads.values())}
        loss, _ = multi_group_loss(logits, targets, kinds, weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return dict(zip(groups, heads.values()))


def wrong_labels(catalog: Catalog, group: str, probs: np.ndarray, rows: np.ndarray, multi: bool) -> list[Issue]:
    """Labels that confident learning flags as likely wrong, scored 1 - self-confidence."""
    from cleanlab.filter import find_label_issues

    vocab = catalog.vocab[group]
    position = {label: i for i, label in enumerate(vocab)}
    items = [catalog.items[i] for i in rows]
    if multi:
        labels = [[position[label] for label in it.labels[group]] for it in items]
    else:
        keep = [len(it.labels[group]) == 1 for it in items]
        rows, items = rows[keep], [it for it, k in zip(items, keep) if k]
        labels = np.array([position[it.labels[group][0]] for it in items], dtype=np.int64)
    if len(items) < 2 or len(vocab) < 2:
        return []
    p = probs[rows]
    with warnings.catch_warnings(record=True) as said:  # one line per group below, not one per class
        warnings.simplefilter("always")
        if multi:
            from cleanlab.multilabel_classification.filter import find_label_issues as find_multi_label_issues

            flagged = find_multi_label_issues(labels, p, return_indices_ranked_by="self_confidence")
        else:
            flagged = find_label_issues(labels, p, return_indices_ranked_by="self_confidence")
    others = [w for w in said if "too few examples" not in str(w.message)]
    if len(others) < len(said):
        logger.info("%s: %d of its labels have too few examples for cleanlab to flag all their issues", group,
                    len(said) - len(others))
    for w in others:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    issues, most = [], most_labels(catalog, group)
    for i in flagged:
        given = labels[i] if multi else [labels[i]]
        confidence = float(np.mean([p[i, c] for c in given])) if len(given) else 0.0
        issues.append(Issue(items[i].image, group, "|".join(vocab[c] for c in given),
                            suggest(p[i], vocab, multi, most=most), round(1 - confidence, 4), "wrong"))
    return issues


def suggest(p: np.ndarray, vocab: list[str], multi: bool, threshold: float = 0.5, most: int | None = None) -> str:
    """The labels a probability row suggests: the top one, or for a multi-label group every one over
    ``threshold`` but at most the ``most`` likeliest (the most labels an item of the group has: an
    out-of-sample probe over a few items can put dozens of labels over it), in vocabulary order."""
    if multi and (p >= threshold).any():
        over = np.flatnonzero(p >= threshold)
        if most is not None and len(over) > most:
            over = np.sort(over[np.argsort(-p[over], kind="stable")[:max(most, 1)]])
        return "|".join(vocab[c] for c in over)
    return vocab[int(p.argmax())]


def most_labels(catalog: Catalog, group: str) -> int:
    """The most labels any item has in a group (1 for a single-label group)."""
    return max((len(it.labels[group]) for it in catalog.items), default=1) or 1


def missing_labels(catalog: Catalog, group: str, probs: np.ndarray, rows: np.ndarray, multi: bool,
                   min_confidence: float) -> list[Issue]:
    """Empty cells whose out-of-sample prediction is confident: a suggestion with its probability."""
    vocab, issues, most = catalog.vocab[group], [], most_labels(catalog, group)
    for i in rows:
        p = probs[i]
        if p.max() >= min_confidence:
            chosen = suggest(p, vocab, multi, min_confidence, most)
            issues.append(Issue(catalog.items[i].image, group, "", chosen, round(float(p.max()), 4), "missing"))
    return issues


def conflicting_duplicates(catalog: Catalog, x: np.ndarray, ok: np.ndarray, threshold: float,
                           k: int = 5) -> list[Issue]:
    """Pairs of near-duplicate items (cosine >= threshold) labelled differently in a group: one row
    per pair and group, on the lower row, suggesting the other item's labels."""
    rows = np.flatnonzero(ok)
    if len(rows) < 2:
        return []
    scores, neighbours = topk_neighbors(normalize_rows(x[rows]), min(k, len(rows) - 1))
    issues = []
    for a, b in zip(*np.nonzero(scores >= threshold)):
        i, j = rows[a], rows[neighbours[a, b]]
        if i > j:
            continue
        first, second = catalog.items[i], catalog.items[j]
        for g in catalog.groups:
            if first.labels[g] and second.labels[g] and not set(first.labels[g]) & set(second.labels[g]):
                issues.append(Issue(first.image, g, "|".join(first.labels[g]), "|".join(second.labels[g]),
                                    round(float(scores[a, b]), 4), "conflicting-duplicate", second.image))
    return issues


def add_evidence(issues: list[Issue], catalog: Catalog, x: np.ndarray, ok: np.ndarray, k: int = 5) -> None:
    """Fill each issue's ``neighbours`` (unless set) with the nearest items labelled in its group."""
    row_of = {it.image: i for i, it in enumerate(catalog.items)}
    z = torch.from_numpy(normalize_rows(x))
    for group in {issue.group for issue in issues}:
        labelled = np.flatnonzero(ok & np.array([bool(it.labels[group]) for it in catalog.items]))
        if not len(labelled):
            continue
        todo = [issue for issue in issues if issue.group == group and not issue.neighbours]
        if not todo:
            continue
        queries = torch.stack([z[row_of[issue.image]] for issue in todo])
        scores = queries @ z[labelled].T
        for issue, row in zip(todo, scores.topk(min(k + 1, len(labelled)), dim=1).indices.tolist()):
            near = [catalog.items[labelled[c]].image for c in row if catalog.items[labelled[c]].image != issue.image]
            issue.neighbours = "|".join(near[:k])


def audit_catalog(catalog: Catalog, x: np.ndarray, ok: np.ndarray, groups: list[str], folds: int = 5,
                  min_confidence: float = 0.9, duplicate_threshold: float = 0.98, seed: int = 0) -> list[Issue]:
    """Every issue of the chosen groups, ranked within each group and kind by score."""
    multi = set(catalog.multi_label_groups())
    readable = np.flatnonzero(ok)
    sub = Catalog(catalog.root, catalog.groups, [catalog.items[i] for i in readable], catalog.vocab)
    probs_sub = out_of_fold_probabilities(x[readable], sub, multi, folds, seed=seed)
    issues = []
    for g in groups:
        probs = np.zeros((len(catalog.items), len(catalog.vocab[g])), np.float32)
        probs[readable] = probs_sub[g]
        labelled = np.array([bool(catalog.items[i].labels[g]) for i in readable], bool)
        if len(catalog.vocab[g]) < 2:  # nothing tells its label from another: a heads' 'probability' of 1
            logger.warning("group %r has one label (%r): no label of it can be wrong or suggested for an empty "
                           "cell (a flag written only where it holds? catalog-info names such a group)",
                           g, catalog.vocab[g][0] if catalog.vocab[g] else "")
            continue
        issues += wrong_labels(catalog, g, probs, readable[labelled], g in multi)
        issues += missing_labels(catalog, g, probs, readable[~labelled], g in multi, min_confidence)
    # cosine of standardised features: raw pooled activations are all positive, so any two images
    # look alike; identical images still score 1
    z = (x - x[readable].mean(0)) / (x[readable].std(0) + 1e-6)
    issues += [i for i in conflicting_duplicates(catalog, z, ok, duplicate_threshold) if i.group in groups]
    add_evidence(issues, catalog, z, ok)
    issues.sort(key=lambda i: (groups.index(i.group), KINDS.index(i.kind), -i.score))
    return issues


def summarize(issues: list[Issue], catalog: Catalog, groups: list[str]) -> str:
    """Markdown table: per group, labelled items and issues of each kind; a note under it for the
    groups with more than ``CROWDED_SHARE`` of their labelled items flagged wrong (``crowded_groups``)."""
    lines = ["| group | labelled | wrong | missing | conflicting duplicates |", "|---|---:|---:|---:|---:|"]
    counts = group_counts(issues, catalog, groups)
    for g, (labelled, count) in counts.items():
        lines.append(f"| {g} | {labelled} | {count['wrong']} | {count['missing']} | {count['conflicting-duplicate']} |")
    crowded = crowded_groups(issues, catalog, groups, counts=counts)
    if crowded:
        lines += ["", f"{', '.join(crowded)}: more than {CROWDED_SHARE:.0%} of the labelled items flagged wrong. The "
                  "out-of-sample predictions disagree with many labels there (photos that show the group poorly, "
                  "or many wrong labels), so the count is no estimate of the wrong labels; review from the top, "
                  "where wrong labels rank first."]
    return "\n".join(lines)


def group_counts(issues: list[Issue], catalog: Catalog, groups: list[str]) -> dict[str, tuple[int, dict[str, int]]]:
    """Per group: (its labelled items, {kind: issues})."""
    return {g: (sum(1 for it in catalog.items if it.labels[g]),
                {k: sum(1 for i in issues if i.group == g and i.kind == k) for k in KINDS}) for g in groups}


def crowded_groups(issues: list[Issue], catalog: Catalog, groups: list[str], share: float = CROWDED_SHARE,
                   counts: dict | None = None) -> list[str]:
    """The groups with more than ``share`` of their labelled items flagged as wrong (``counts``: their
    ``group_counts``, when already made)."""
    counts = counts or group_counts(issues, catalog, groups)
    return [g for g, (labelled, count) in counts.items() if labelled and count["wrong"] > share * labelled]


def write_issues(path: Path, issues: list[Issue]) -> None:
    """issues.csv, written to a temporary file and renamed into place."""
    with atomic_write(path, newline="") as f:
        writer = csv.DictWriter(f, [fl.name for fl in fields(Issue)])
        writer.writeheader()
        writer.writerows(asdict(i) for i in issues)


def read_issues(path: str | Path) -> list[Issue]:
    """The rows of an issues.csv. A ValueError names the file (and line) of one that is not: a column
    missing from the header, a row with a cell too few or too many (hand-edited, cut short: it made the
    review a 500), a score that is not a number. Columns it does not know are ignored."""
    from dataclasses import MISSING

    names = [f.name for f in fields(Issue)]
    required = [f.name for f in fields(Issue) if f.default is MISSING]
    issues = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        absent = [n for n in required if n not in header]
        if absent:
            raise ValueError(f"{path}: not an issues file (no column {', '.join(absent)}; its header is "
                             f"{','.join(names)})")
        for row in reader:
            where = f"{path}, line {reader.line_num}"
            if None in row or None in row.values():  # DictReader: extra cells under None, missing ones None
                cells = len(header) - sum(v is None for v in row.values()) + len(row.get(None) or ())
                raise ValueError(f"{where}: {cells} cells, the header has {len(header)}")
            try:
                score = float(row["score"])
            except ValueError:
                raise ValueError(f"{where}: score {row['score']!r} is not a number") from None
            issues.append(Issue(**{**{n: row[n] for n in names if n in row}, "score": score}))
    return issues
