"""Loss weights (Li et al. 2017), masked per-group losses, early-learning regularisation and Range loss."""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

GROUP_LOSSES = ("auto", "bce", "ce")
WEIGHTINGS = ("group", "label", "none")
LOSS_NORMS = ("auto", "labelled", "item", "balanced", "batch")


def resolve_loss_norm(norm: str, method: str) -> str:
    """``auto``: ``balanced`` for the per-group methods (a multi-label group counts as much as a
    softmax one), ``labelled`` for the multi-label method (one sigmoid loss in which every label
    counts equally, as the baseline was measured); any other value as it is."""
    if norm != "auto":
        return norm
    return "labelled" if method == "multi-label" else "balanced"
RANGE_DISTANCES = ("l2", "squared")


def smoothed_weights(counts, c: float = 3.0) -> list[float]:
    """Li et al.: r = count / max count; weight = r if r >= mean(r)/c else mean(r)/c."""
    counts = [float(n) for n in counts]
    top = max(counts) if counts else 0.0
    if top <= 0:
        return [1.0] * len(counts)
    r = [n / top for n in counts]
    floor = sum(r) / len(r) / c
    return [x if x >= floor else floor for x in r]


def group_weights(method: str, counts: dict[str, int], c: float = 3.0) -> dict[str, float]:
    """Per-group loss weights: smoothed proportions for multi-weight, 1 otherwise."""
    if method != "multi-weight":
        return {g: 1.0 for g in counts}
    return dict(zip(counts, smoothed_weights(counts.values(), c)))


def label_weights(label_counts: dict[str, torch.Tensor], c: float = 3.0) -> dict[str, torch.Tensor]:
    """The same smoothing applied per label inside each group."""
    return {g: torch.tensor(smoothed_weights(n.tolist(), c)) for g, n in label_counts.items()}


def resolve_group_loss(choice: str, group: str, multi_label_groups, method: str) -> str:
    """``ce`` or ``bce`` for a group: auto = softmax CE for single-label groups."""
    if choice not in GROUP_LOSSES:
        raise ValueError(f"Unknown --group-loss {choice!r}; choose one of: {', '.join(GROUP_LOSSES)}")
    if method == "multi-label":
        return "bce"
    if choice == "auto":
        return "bce" if group in multi_label_groups else "ce"
    return choice


def masked_group_loss(logits: torch.Tensor, multi_hot: torch.Tensor, known: torch.Tensor, kind: str,
                      class_weights: torch.Tensor | None = None, smoothing: float = 0.0,
                      norm: str = "labelled") -> torch.Tensor:
    """A group's loss; unlabelled items contribute nothing. ``norm``: ``labelled`` = mean over the
    items labelled in this group (and, for sigmoids, over its labels); ``item`` = the same, but a
    sigmoid group's loss is summed over its labels (an item's loss counts as a softmax group's
    does, rather than 1/labels of it); ``balanced`` = the same, but an item's sigmoid loss is the
    mean over its positive labels plus the mean over its negative ones (scale-free in the number
    of labels, like a softmax); ``batch`` = Li et al.'s Eq. 1:
    summed over the group's labels, averaged over the whole batch. ``smoothing`` moves that share of
    a softmax target evenly onto every label.

    Computed on every row and masked (no boolean indexing, no ``if known.any()``), so a step never
    waits for the GPU to say which rows are labelled; a batch without labels gives 0, graph kept."""
    if norm not in LOSS_NORMS:
        raise ValueError(f"Unknown --loss-norm {norm!r}; choose one of: {', '.join(LOSS_NORMS)}")
    if norm == "auto":
        raise ValueError("--loss-norm auto depends on the method: resolve it first (resolve_loss_norm)")
    mask = known.to(logits.dtype)[:, None]
    n_known = mask.sum()
    if kind == "ce":
        target = multi_hot / multi_hot.sum(1, keepdim=True).clamp_min(1)
        if smoothing:
            target = (1 - smoothing) * target + smoothing / target.shape[1]
        per_item = -(target * F.log_softmax(logits, dim=1)) * mask
        if class_weights is not None:
            per_item = per_item * class_weights
            denominator = (target * mask * class_weights).sum().clamp_min(1e-12)
        else:
            denominator = n_known.clamp_min(1)
    elif norm == "balanced":
        per_label = F.binary_cross_entropy_with_logits(logits, multi_hot, reduction="none")
        cw = torch.ones_like(per_label[0]) if class_weights is None else class_weights
        per_item = sum(((per_label * side * cw).sum(1) / (side * cw).sum(1).clamp_min(1e-12))[:, None] * mask
                       for side in (multi_hot, 1 - multi_hot))
        denominator = n_known.clamp_min(1)
    else:
        per_item = F.binary_cross_entropy_with_logits(logits, multi_hot, reduction="none") * mask
        if class_weights is not None:
            per_item = per_item * class_weights
            labels = class_weights.mean() if norm == "item" else class_weights.sum()
            denominator = (labels * n_known).clamp_min(1e-12)
        else:
            denominator = (n_known * (1 if norm == "item" else logits.shape[1])).clamp_min(1)
    return per_item.sum() / (len(logits) if norm == "batch" else denominator)


def multi_group_loss(logits: dict[str, torch.Tensor], targets, kinds: dict[str, str],
                     weights: dict[str, float], class_weights: dict[str, torch.Tensor] | None = None,
                     smoothing: float = 0.0, norm: str = "labelled"):
    """Weighted sum of the per-group losses; returns (total, {group: loss}). With ``norm="batch"``
    and weights 1 (the multi-label method) the total is one sigmoid cross-entropy over all labels
    of all groups, every label counting equally: summed over labels, averaged over the batch, the
    labels of a group an item has no label in left out (neither positive nor negative)."""
    parts = {}
    for g, z in logits.items():
        cw = class_weights.get(g) if class_weights else None
        parts[g] = masked_group_loss(z, targets.multi_hot[g], targets.known[g], kinds[g], cw, smoothing, norm)
    total = sum(weights[g] * parts[g] for g in parts)
    return total, parts


def attention_key(group: str) -> str:
    """Where early learning keeps a group's targets for label attention's logits (beside the head's)."""
    return f"{group} (label attention)"


def balancing_divisors(label_counts: dict[str, torch.Tensor], tau: float) -> dict[str, torch.Tensor]:
    """Per group, each class's share of the group's training labels raised to ``tau``, the shares
    of classes rarer than uniform (1 / classes) raised from there: dividing by them lowers the
    classes that outnumber the others and leaves the rare ones as a uniform prior would, so a rare
    class's few (and, with wrong labels, often wrong) examples are not amplified. A class without
    training labels counts one."""
    if tau < 0:
        raise ValueError(f"--early-learning-balance must be 0 (off) or more, got {tau}")
    divisors = {}
    for g, counts in label_counts.items():
        counts = counts.float().clamp_min(1)
        divisors[g] = (counts / counts.sum()).clamp_min(1 / len(counts)) ** tau
    return divisors


class EarlyLearning:
    """Early-learning regularisation (ELR; Liu et al., NeurIPS 2020) of the softmax groups, against
    wrong labels: a network fits the clean majority of its labels first and memorises the wrong ones
    later, so each training item keeps a running average of its own predictions (momentum
    ``momentum``, from zero) and the loss gains ``weight`` x log(1 - <p, t>), which holds the
    prediction p near that early target t while a wrong label pulls it away. The targets follow
    the items' positions in the training list (``batch_loss``'s ``positions``). Under torchrun each
    rank is dealt other items every epoch, so ``gather`` (``Collectives.all_gather``) brings every
    rank's batch of new targets to all of them, each batch padded to ``batch_size`` rows: every
    rank holds every item's target. Groups in ``sigmoid`` (multi-label) are held label by label: each
    label a two-class prediction (p, 1 - p) against its target (t, 1 - t), the logs averaged over the
    labels. ``divisors`` (a softmax group's, from ``balancing_divisors``) divide the predictions that
    enter a group's running target, renormalised: an imbalanced group's early predictions lean to
    its largest class, and a target held there collapses every prediction onto it. Groups in
    ``attended`` (multi-label, with label attention) are held a second time, label by label, on label
    attention's own logits (``logits[attention_key(g)]``, what the group's labels are scored with),
    at weight 1 as attention's own loss is."""

    def __init__(self, sizes: dict[str, int], n_items: int, weight: float, momentum: float = 0.7,
                 device: torch.device | str = "cpu", gather=None, batch_size: int = 0, sigmoid=(),
                 divisors: dict[str, torch.Tensor] | None = None, attended=()):
        if not 0 <= momentum < 1:
            raise ValueError(f"--early-learning-momentum must lie in [0, 1), got {momentum}")
        self.weight, self.momentum, self.gather, self.batch_size = weight, momentum, gather, batch_size
        self.group_of = {g: g for g in sizes} | {attention_key(g): g for g in attended if g in sizes}
        sizes = {k: sizes[g] for k, g in self.group_of.items()}
        self.sigmoid = (frozenset(sigmoid) & set(sizes)) | {attention_key(g) for g in attended if g in sizes}
        self.divisors = {g: d.to(device) for g, d in (divisors or {}).items() if g in sizes and g not in self.sigmoid}
        self.targets = {g: torch.zeros(n_items, c, device=device) for g, c in sizes.items()}

    def __call__(self, logits: dict[str, torch.Tensor], targets, positions: torch.Tensor,
                 weights: dict[str, float]) -> torch.Tensor:
        """The batch's term (each group's mean over its labelled items, times its group weight),
        after moving the batch's targets towards its predictions."""
        total, updated = 0.0, {}
        rows = positions.to(next(iter(self.targets.values())).device)  # every group's targets live together
        for g, memory in self.targets.items():
            binary = g in self.sigmoid
            p = (torch.sigmoid if binary else partial(torch.softmax, dim=1))(logits[g].float()).clamp(1e-4, 1 - 1e-4)
            with torch.no_grad():
                early = p if binary else p / p.sum(1, keepdim=True)
                if g in self.divisors:
                    early = early / self.divisors[g]
                    early = early / early.sum(1, keepdim=True)
                t = self.momentum * memory[rows] + (1 - self.momentum) * early.to(memory.device)
                memory[rows] = updated[g] = t
            t = t.to(p.device)
            if binary:  # each label a two-class softmax: <p, t> = pt + (1-p)(1-t), the logs averaged over the labels
                held = torch.log(1 - (t * p + (1 - t) * (1 - p))).mean(1)
            else:
                held = torch.log(1 - (t * p).sum(1))
            known = targets.known[self.group_of[g]].to(p.dtype)
            term = (held * known).sum() / known.sum().clamp_min(1)
            total = total + (weights[g] if g == self.group_of[g] else 1.0) * term
        if self.gather is not None:
            self._share(rows, updated)
        return self.weight * total

    @torch.no_grad()
    def _share(self, rows: torch.Tensor, updated: dict[str, torch.Tensor]) -> None:
        """Write every rank's new targets of this step into this rank's (rows padded with -1)."""
        pad = self.batch_size - len(rows)
        if pad < 0:
            raise ValueError(f"a batch of {len(rows)} rows is larger than the batch size {self.batch_size}")
        values = torch.cat([updated[g] for g in self.targets], 1)
        every_row = self.gather(F.pad(rows, (0, pad), value=-1))
        every_value = self.gather(F.pad(values, (0, 0, 0, pad))).to(values.device)
        keep = (every_row >= 0).to(values.device)
        every_row, every_value = every_row.to(values.device)[keep], every_value[keep]
        start = 0
        for g, memory in self.targets.items():
            memory[every_row] = every_value[:, start:start + memory.shape[1]]
            start += memory.shape[1]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {g: t.cpu() for g, t in self.targets.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> list[str]:
        """Take a checkpoint's targets; returns the label-attention targets it lacks (a run saved before
        early learning held label attention), which start from zero."""
        fresh = [k for k in self.targets if k not in state and k != self.group_of[k]]
        if set(state) != set(self.targets) - set(fresh) or any(state[g].shape != self.targets[g].shape for g in state):
            raise ValueError("the checkpoint's early-learning targets do not fit this run's groups and items (a run "
                             "started before early learning held the multi-label groups resumes with "
                             "--no-early-learning-sigmoid)")
        for g in state:
            self.targets[g].copy_(state[g])
        return fresh


def _distances(x: torch.Tensor, distance: str) -> torch.Tensor:
    d = torch.cdist(x, x)
    return d.square() if distance == "squared" else d


def range_loss(emb: torch.Tensor, labels: torch.Tensor, k: int = 2, margin: float = 1.0,
               alpha: float = 1.0, beta: float = 1.0,
               distance: str = "l2") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Range loss (Zhang et al. 2017) on a batch; ``labels`` -1 = unknown. Returns (loss, intra, inter).

    Intra: per class with >= 2 samples, the harmonic mean of its k largest pairwise distances,
    summed over classes. Inter: max(0, margin - smallest distance between class centres).
    ``distance``: ``l2`` (Euclidean) or ``squared`` (squared Euclidean, as in the dress-attribute study), for both.
    """
    if distance not in RANGE_DISTANCES:
        raise ValueError(f"Unknown --range-distance {distance!r}; choose one of: {', '.join(RANGE_DISTANCES)}")
    keep = labels >= 0
    emb, labels = emb[keep], labels[keep]
    zero = emb.sum() * 0.0
    classes = labels.unique()
    intra, centres = zero, []
    for cls in classes:
        members = emb[labels == cls]
        centres.append(members.mean(0))
        if len(members) < 2:
            continue
        d = _distances(members, distance)
        pairs = d[torch.triu_indices(len(members), len(members), 1, device=emb.device).unbind()]
        top = pairs.topk(min(k, len(pairs))).values
        intra = intra + len(top) / (1.0 / top.clamp_min(1e-12)).sum()
    inter = zero
    if len(centres) >= 2:
        cd = _distances(torch.stack(centres), distance)
        smallest = cd[torch.triu_indices(len(centres), len(centres), 1, device=emb.device).unbind()].min()
        inter = F.relu(margin - smallest)
    return alpha * intra + beta * inter, intra, inter


def label_overlap_targets(targets, weights: dict[str, float]) -> torch.Tensor:
    """Pairwise agreement in [0, 1]: the weighted share of groups (labelled on both items) in
    which two items share a label."""
    agree, total = 0.0, 0.0
    for g, y in targets.multi_hot.items():
        known = targets.known[g].float()
        both = known[:, None] * known[None, :]
        share = ((y @ y.T) > 0).float() * both
        agree = agree + weights[g] * share
        total = total + weights[g] * both
    return agree / total.clamp_min(1e-6) if torch.is_tensor(total) else None


def overlap_contrastive_loss(emb: torch.Tensor, targets, weights: dict[str, float],
                             temperature: float = 0.1) -> torch.Tensor:
    """Supervised contrastive loss with graded positives: each item's softmax over the cosine
    similarities of the others is pulled towards their label agreement with it, so that the
    shared embedding ranks items the way the labels of all groups together would."""
    agreement = label_overlap_targets(targets, weights)
    if agreement is None:
        return emb.sum() * 0.0
    n = len(emb)
    off_diagonal = ~torch.eye(n, dtype=torch.bool, device=emb.device)
    agreement = agreement * off_diagonal
    total = agreement.sum(1, keepdim=True)
    rows = (total > 0).to(emb.dtype)  # items with at least one agreeing other item (no host sync)
    logits = (emb @ emb.T / temperature).masked_fill(~off_diagonal, float("-inf"))
    log_prob = torch.log_softmax(logits, dim=1).masked_fill(~off_diagonal, 0.0)
    p = agreement / total.clamp_min(1e-12)
    return -((p * log_prob).sum(1) * rows[:, 0]).sum() / rows.sum().clamp_min(1)
