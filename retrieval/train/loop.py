"""The training loop proper, torchvision-references style: ``train_one_epoch`` and ``validate`` over
a small ``TrainState``, each testable on its own. Data, checkpoints and resume live in trainer.py."""
from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from retrieval.data import embfile
from retrieval.data.cooccurrence import STRENGTHS, from_others, mixed
from retrieval.data.datasets import Targets
from retrieval.evaluate.metrics import ap_means, evaluate_retrieval, label_matrix, rank_views
from retrieval.net.model import RetrievalModel
from retrieval.train.config import AUTO_MIN_VALIDATION, freeze_units
from retrieval.train.losses import EarlyLearning, attention_key, multi_group_loss, overlap_contrastive_loss, range_loss


@dataclass
class LossSettings:
    """How a batch's loss is made: per-group kinds and weights, the extra terms and their weights."""

    kinds: dict[str, str]
    weights: dict[str, float]
    class_weights: dict[str, torch.Tensor] | None = None
    label_smoothing: float = 0.0
    metric_scale: float = 0.0  # the heads' loss again at this logit scale (0 = off; not for multi-label)
    head_scale: float = 16.0
    multi_label_method: bool = False
    contrastive: float = 0.0
    range_weight: float = 0.0
    classes: np.ndarray | None = None  # per training item, for Range loss
    norm: str = "labelled"  # how a group's loss is averaged (losses.LOSS_NORMS)
    range_distance: str = "l2"
    head_fit: float = 0.0  # the sigmoid groups' heads again, item-normalised, on the detached embedding
    early_learning: EarlyLearning | None = None  # ELR of the heads (sigmoid groups label by label), by training position


@dataclass
class TrainState:
    """What one step needs: the model, the module trained (``net``, DDP-wrapped under torchrun) and
    its unwrapped form (``forward``, for validation on one rank), optimiser, schedule, device, loss."""

    model: RetrievalModel
    net: nn.Module
    forward: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    device: torch.device
    loss: LossSettings
    start: int = 0  # first trainable trunk unit: the units before it stay frozen (and in eval mode)
    world: int = 1
    progress: bool = True
    freeze_bn: bool = False  # every BatchNorm of the trunk stays frozen too


def batch_loss(state: TrainState, net: nn.Module, inputs, targets, positions=None):
    """Total loss, per-group losses (of the heads), the logits labels are scored with (label
    attention's for the attended groups: ``RetrievalModel.group_logits``) and embeddings of a batch
    (bf16 autocast on CUDA)."""
    s = state.loss
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=state.device.type == "cuda"):
        emb, logits, attended = net(*inputs) if isinstance(inputs, tuple) else net(inputs)
    logits = {g: z.float() for g, z in logits.items()}
    attended = {g: z.float() for g, z in attended.items()}
    total, parts = multi_group_loss(logits, targets, s.kinds, s.weights, s.class_weights, s.label_smoothing, s.norm)
    if s.metric_scale and not s.multi_label_method:
        # the per-group heads again at a higher temperature: keeps pulling items towards their labels
        soft = {g: z * (s.metric_scale / s.head_scale) for g, z in logits.items()}
        total = total + multi_group_loss(soft, targets, s.kinds, s.weights, s.class_weights, s.label_smoothing,
                                         s.norm)[0]
    sigmoid = [g for g in logits if s.kinds[g] == "bce"]
    if s.head_fit and sigmoid and not s.multi_label_method:
        # each label's own loss fits the heads' probabilities; the embedding is held fixed, so the
        # many negative labels do not take it over (the balanced loss above shapes it)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=state.device.type == "cuda"):
            fitted = state.model.forward_heads(emb.detach())
        fitted = {g: fitted[g].float() for g in sigmoid}
        total = total + s.head_fit * multi_group_loss(fitted, targets, s.kinds, s.weights, s.class_weights,
                                                      norm="item")[0]
    if s.early_learning is not None and positions is not None:  # training batches only
        held = {**logits, **{attention_key(g): z for g, z in attended.items()}}
        total = total + s.early_learning(held, targets, positions, s.weights)
    if s.contrastive:
        total = total + s.contrastive * overlap_contrastive_loss(emb.float(), targets, s.weights)
    if s.range_weight and positions is not None:
        labels = torch.as_tensor(s.classes[positions.numpy()], device=emb.device)
        total = total + s.range_weight * range_loss(emb.float(), labels, distance=s.range_distance)[0]
    if attended:
        # label attention learns as the heads do (the balanced loss, then each label's own with
        # head_fit), on its own: its cells are detached, and no group weight (it shares nothing)
        kinds, ones = {g: "bce" for g in attended}, {g: 1.0 for g in attended}
        total = total + multi_group_loss(attended, targets, kinds, ones, s.class_weights, norm=s.norm)[0]
        if s.head_fit:
            total = total + s.head_fit * multi_group_loss(attended, targets, kinds, ones, s.class_weights,
                                                          norm="item")[0]
    return total, parts, {**logits, **attended}, emb


def train_one_epoch(state: TrainState, batches, targets, desc: str = "epoch") -> dict:
    """One pass over ``batches`` of (positions, inputs); ``targets`` are indexed by positions. Besides
    the loss and speed, it records the seconds spent waiting for batches (the data path's share:
    each step ends with the loss read back, so the rest is the device's work) and those until the
    first step had ended (loader start, first batch, first kernels)."""
    state.net.train()
    freeze_units(state.model, state.start, state.freeze_bn)
    seen, total_loss, waited, first, began = 0, 0.0, 0.0, None, time.perf_counter()
    bar = tqdm(batches, desc=desc, unit="batch", disable=not state.progress, leave=False)
    steps = iter(bar)
    while True:
        asked = time.perf_counter()
        batch = next(steps, None)
        waited += time.perf_counter() - asked
        if batch is None:
            break
        positions, inputs = batch
        loss, *_ = batch_loss(state, state.net, inputs, targets.take(positions).to(state.device), positions)
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        state.optimizer.step()
        state.scheduler.step()
        seen += len(positions)
        total_loss += loss.item() * len(positions)
        first = time.perf_counter() - began if first is None else first
        bar.set_postfix(loss=f"{loss.item():.3f}", img_s=f"{seen / (time.perf_counter() - began):.0f}")
    elapsed = time.perf_counter() - began
    return {"train_loss": total_loss / max(1, seen), "images_per_s": seen * state.world / elapsed,
            "seconds": elapsed, "waiting_s": waited, "first_step_s": first}


# validation items the strengths are fitted on (the first ones): two rankings of n^2 scores per group at
# every validation; 5,000 items of 10 groups took 28 s an epoch on 2 busy cores, 2,000 about a sixth
FIT_ITEMS = 2000


def fit_strengths(probs: Mapping[str, np.ndarray], labels: Mapping[str, Sequence[tuple]],
                  cooccurrence: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, float]:
    """{g: s_g} for the groups where mixing with what the other heads say (``cooccurrence.apply_prior``,
    at a strength of ``STRENGTHS``) raises the group view's mAP@min(50, n-1) (standard) among the
    first ``FIT_ITEMS`` validation items (``probs`` and ``labels`` in one item order) over their own
    head's; the best strength, the smallest on a tie. Groups where none does are left out."""
    n = min(len(next(iter(probs.values()))) if probs else 0, FIT_ITEMS)
    if n < 3:
        return {}
    probs = {g: p[:n] for g, p in probs.items()}
    queries, chosen = np.arange(n), {}
    for g, sources in cooccurrence.items():
        told = from_others(probs, sources) if g in probs and g in labels else None
        if told is None:
            continue
        sets = labels[g][:n]
        y = label_matrix(sets, sorted({label for s in sets for label in s}))

        def score(s: float) -> float:  # the group view alone, ranked as evaluate_retrieval ranks it
            view = mixed(probs[g], told, s)
            return ap_means(*rank_views({g: (view, [g])}, {g: y}, queries, min(50, n - 1))[g, g][1:])[
                "map_standard"] or 0.0

        own = score(0.0)
        best, at = max((score(s), -s) for s in STRENGTHS)
        if best > own + 1e-9:
            chosen[g] = -at
    return chosen


@torch.no_grad()
def validate(state: TrainState, batches, targets, items, groups: list[str], limit: int = 5000,
             cooccurrence: dict | None = None) -> dict:
    """Validation loss (weighted, and per group), top-1 accuracy per group, retrieval mAP among
    the validation items (the shared embedding and the group view, standard normalisation), the
    ``matches`` shared view's group weights from their probabilities (``embfile.group_spread_weights``)
    and, given the training labels' ``cooccurrence``, the strength of each group view's prior
    (``fit_strengths``; the group views this mAP ranks are the heads' own)."""
    state.model.eval()
    if not items:
        return {}
    total_loss, n = 0.0, 0
    group_loss = {g: 0.0 for g in groups}
    hits = {g: [0, 0] for g in groups}
    seen, vectors, batch_probs = [], [], {g: [] for g in groups}
    for positions, x in batches:
        t = targets.take(positions).to(state.device)
        total, parts, logits, emb = batch_loss(state, state.forward, x, t)
        seen.append(positions)
        vectors.append(emb.float().cpu().numpy())
        for g, z in logits.items():
            batch_probs[g].append(state.model.probabilities(g, z).float().cpu().numpy())
        total_loss += total.item() * len(positions)
        n += len(positions)
        for g, z in logits.items():
            group_loss[g] += parts[g].item() * len(positions)
            known = t.known[g]
            top = z[known].argmax(1)
            hits[g][0] += int(t.multi_hot[g][known].gather(1, top[:, None]).sum())
            hits[g][1] += int(known.sum())
    n_ = max(1, n)
    probs = {g: np.concatenate(v) for g, v in batch_probs.items() if v}
    # the matches shared view's group weights, from items the model has not learnt (as a catalogue's new ones)
    weights = embfile.group_spread_weights(probs)
    prior = {}
    if cooccurrence and seen:  # the first ``limit`` items, as validation_map ranks
        order = torch.cat(seen)[:limit].tolist()
        prior = fit_strengths({g: p[:limit] for g, p in probs.items()},
                              {g: [items[i].labels[g] for i in order] for g in cooccurrence}, cooccurrence)
    return {"val_loss": total_loss / n_, "val_group_loss": {g: v / n_ for g, v in group_loss.items()},
            "val_accuracy": {g: h / c if c else None for g, (h, c) in hits.items()},
            **({"shared_view_weights": weights} if weights else {}),
            **({"group_view_prior": prior} if prior else {}),
            **validation_map(items, groups, seen, vectors, embfile.group_vectors(probs, state.model.sigmoid_groups),
                             limit)}


def validation_map(items, groups, seen, vectors, group_vectors, limit: int = 5000) -> dict:
    """mAP@min(50, n-1) with the validation items (the first ``limit``, so that a huge catalog costs
    seconds per epoch) as queries and candidates: the shared embedding, the group view, and their
    mean (``val_map``, what picks best.pt). The shared embedding alone, whatever the shared view
    (``embfile.shared_vectors``): the view's other part is the group view's vectors, which the
    mean already counts; selecting by the joined view moved best.pt on three of six stand-ins,
    within a seed's spread (noisy street: colour group view -2.4), and bought nothing in the
    shared view."""
    order = torch.cat(seen)[:limit].tolist() if seen else []
    if len(order) < 2:
        return {}
    n = len(order)
    labels = {g: [items[i].labels[g] for i in order] for g in groups}
    report = evaluate_retrieval(np.concatenate(vectors)[:n], labels, k=min(50, n - 1),
                                vectors_by_group={g: v[:n] for g, v in group_vectors.items()})
    shared, view = report["views"]["shared"]["map_standard"], report["views"]["group"]["map_standard"]
    if shared is None or view is None:
        return {}
    return {"val_map_shared": shared, "val_map_group": view, "val_map": (shared + view) / 2}


def selection_score(record: dict, select_by: str = "map") -> float:
    """How an epoch's record ranks for best.pt, higher is better: validation mAP (``map``, the
    default) or minus the validation loss (``loss``; also where there are too few validation items
    for mAP)."""
    if select_by == "map" and record.get("val_map") is not None:
        return record["val_map"]
    return -record.get("val_loss", record["train_loss"])


def unlearnt_groups(history: list[dict], train: Targets, val: Targets, select_by: str = "map",
                    min_items: int = AUTO_MIN_VALIDATION, max_share: float = 0.9
                    ) -> dict[str, tuple[float, float, int]]:
    """Groups whose validation accuracy at the best epoch is no better than always answering the
    training items' largest class (a price, a stock code, anything the photos do not show), among
    groups with ``min_items`` or more labelled validation items where that class holds less than
    ``max_share`` of them (above it, accuracy cannot tell a model from the majority answer):
    {group: (accuracy, that baseline, the class)}. Such a group only adds noise to the shared
    embedding. Seen: a random price column of a retailer's export (0.133 against 0.133); season on
    the street stand-ins with 30% of the labels wrong (0.60 / 0.61 against 0.61: validated on wrong
    labels too); no group of the clean stand-ins or the development catalog."""
    scored = [r for r in history if r.get("val_accuracy")]
    if not scored:
        return {}
    best = max(scored, key=lambda record: selection_score(record, select_by))["val_accuracy"]
    found, per_label = {}, train.label_counts()
    for g, accuracy in best.items():
        known = val.known[g]
        if accuracy is None or int(known.sum()) < min_items:
            continue
        largest = int(per_label[g].argmax())
        baseline = float(val.multi_hot[g][known, largest].mean())
        if accuracy <= baseline < max_share:
            found[g] = (accuracy, baseline, largest)
    return found


def memorising(history: list[dict], epochs: int, select_by: str = "map", rise: float = 0.05) -> str | None:
    """Why a finished run of 8 or more epochs looks like it learnt wrong labels, or None: its best
    epoch (best.pt) in the first quarter, or its validation loss lowest in the first quarter and
    ``rise`` (5%) or more above that at the end. Measured (best epoch; epoch of the lowest
    validation loss, rise at the end): street stand-ins with 30% of their training labels wrong 3;
    3, +23% and 40; 1, +11%; the clean street stand-in 39; 5, +9% (a small catalogue of hard photos:
    early learning gains there too); the clean product shots (development catalog, missing labels,
    multicolour) 21-45; 25-48, +0 to +1%."""
    if epochs < 8 or len(history) < epochs:
        return None
    quarter = epochs / 4
    best = max(history, key=lambda record: selection_score(record, select_by))["epoch"]
    if best < quarter:
        return f"best.pt is epoch {best} of {epochs}"
    losses = [(r["val_loss"], r["epoch"]) for r in history if r.get("val_loss") is not None]
    if losses:
        low, at = min(losses)
        if at < quarter and losses[-1][0] >= (1 + rise) * low:
            return (f"the validation loss was lowest at epoch {at} of {epochs} and ends "
                    f"{100 * (losses[-1][0] / low - 1):.0f}% above it")
    return None
