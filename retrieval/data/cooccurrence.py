"""What the other groups' heads say of a group, through the training labels' co-occurrence.

A single-label group's head is often sure of its largest class for most items (a season or a usage
learnt from few or wrong labels): its group view then ranks most candidates alike, and the order
among them is chance. The other groups know something of it (an article type says much of the
season and the usage, a gender of the article type): each item's probabilities over the group's
labels, as the other heads predict them, are p_h · C_hg, where C_hg[j, i] = P(g = i | h = j) is
counted on the training items labelled in both (plus one in every cell). The group view of group g
ranks by

    p'_g = (1 - s_g) p_g + s_g mean_h (p_h · C_hg)

with s_g chosen among ``STRENGTHS`` on the validation items by the group view's mAP there (0 where
none is better: a group whose head is right keeps it; ``train.loop.fit_strengths``). Single-label
(softmax) groups only, both as the group and as the sources. Measured post hoc on the default's
files of 31 catalogues and seeds (docs/quality.md, issue 16): the group view's mean -0.2 to +1.6
mAP@50, +1.1 on the snapshot stand-in.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

STRENGTHS = (0.05,)  # the s_g tried besides 0 (post hoc, 19 catalogues: 0.1-0.3 lost more where it lost)
MAX_CELLS = 1 << 20  # a source-group pair whose matrix is larger is left out (a group of thousands of labels)


def label_cooccurrence(items: Sequence, vocab: Mapping[str, Sequence[str]],
                       groups: Sequence[str]) -> dict[str, dict[str, np.ndarray]]:
    """{g: {h: C_hg}} for every ordered pair of ``groups`` (single-label groups): C_hg[j, i] =
    (the items labelled j in h and i in g, plus one) over its row's sum, from ``items``' labels. A pair
    of more than ``MAX_CELLS`` cells is left out; a group none is left for is absent."""
    index = {g: {label: i for i, label in enumerate(vocab[g])} for g in groups}
    codes = {g: np.array([index[g].get(it.labels[g][0], -1) if it.labels.get(g) else -1 for it in items],
                         dtype=np.int64) for g in groups}
    out: dict[str, dict[str, np.ndarray]] = {}
    for g in groups:
        for h in groups:
            if h == g or len(vocab[h]) * len(vocab[g]) > MAX_CELLS:
                continue
            both = (codes[g] >= 0) & (codes[h] >= 0)
            counts = np.ones((len(vocab[h]), len(vocab[g])), dtype=np.float64)
            np.add.at(counts, (codes[h][both], codes[g][both]), 1.0)
            out.setdefault(g, {})[h] = (counts / counts.sum(1, keepdims=True)).astype(np.float32)
    return out


def from_others(probs: Mapping[str, np.ndarray], sources: Mapping[str, np.ndarray]) -> np.ndarray | None:
    """mean_h (p_h · C_hg) over the sources whose probabilities are given (None if none is)."""
    told = [np.asarray(probs[h], dtype=np.float32) @ c for h, c in sources.items() if h in probs]
    return np.mean(told, axis=0) if told else None


def mixed(p: np.ndarray, told: np.ndarray, strength: float) -> np.ndarray:
    """A group's probabilities ``p`` mixed with what the other heads say of it: (1 - s) p + s told."""
    return ((1 - strength) * np.asarray(p, dtype=np.float32) + strength * told).astype(np.float32)


def apply_prior(probs: Mapping[str, np.ndarray], prior: Mapping | None) -> dict[str, np.ndarray]:
    """``probs`` with each group of ``prior`` ({"strength": {g: s}, "sources": {g: {h: C_hg}}}) mixed
    with what its sources' heads say of it; the other groups as given."""
    out = dict(probs)
    if not prior:
        return out
    for g, s in prior.get("strength", {}).items():
        told = from_others(probs, prior["sources"].get(g, {})) if g in probs else None
        if told is not None and s:
            out[g] = mixed(probs[g], told, s)
    return out


def prior_state(strength: Mapping[str, float], cooccurrence: Mapping[str, Mapping[str, np.ndarray]]) -> dict:
    """What a checkpoint keeps: the chosen strengths and, for those groups only, their matrices (as
    tensors: a checkpoint holds tensors and plain data)."""
    import torch

    return {"strength": dict(strength),
            "sources": {g: {h: torch.from_numpy(np.asarray(c)) for h, c in cooccurrence[g].items()}
                        for g in strength}}


def prior_from_state(state: Mapping | None) -> dict:
    """A checkpoint's prior as ``apply_prior`` takes it; {} for a checkpoint from before it (none)."""
    if not state or not state.get("strength"):
        return {}
    return {"strength": {g: float(s) for g, s in state["strength"].items()},
            "sources": {g: {h: np.asarray(c, dtype=np.float32) for h, c in hs.items()}
                        for g, hs in state["sources"].items()}}
