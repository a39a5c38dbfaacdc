"""The retrieval model: trunk, multi-scale pooling, shared embedding layer, one head per group."""
from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import asdict, dataclass, field, fields, replace

import torch
import torch.nn.functional as F
from torch import nn

from retrieval.net.backbones import create_trunk
from retrieval.net.colour import (attention_prior, attention_weights, check_colour_weighting, colour_cells,
                                  colour_histogram, foreground_weights, histogram_size, parse_bins, pool_cells)
from retrieval.net.layers import shared_layers

logger = logging.getLogger(__name__)

METHODS = ("multi-weight", "multi-task", "multi-label")
# photo search and `predict` embed the image alone even with flip_average: queries are interactive and
# the mirror view doubles their cost (fashion index, 2 cores, concurrency 4: upload p50 138 vs 256 ms),
# while single-view queries against the flip-averaged catalogue lose 0.1 shared / 0.2 group-view mAP@50
QUERY_VIEWS = 1
# what the shared view (the index searched for "similar clothing") ranks by: the shared embedding
# alone (as the papers retrieve), or followed by every group's view (cosine), or by every group's
# probabilities as the expected share of groups two items match (inner product; embfile.shared_vectors)
SHARED_VIEWS = ("embedding", "with-groups", "matches")
# label attention (class-specific residual attention, Zhu & Wu 2021): a label's logit is the mean of its
# cell scores plus LABEL_ATTENTION_WEIGHT x their softmax(LABEL_ATTENTION_SHARPNESS x score)-weighted
# mean. Measured post hoc on the street, multi-label stand-in (colour group view; weight / sharpness 0.3 / 1:
# 42.7, 1 / 1: 46.3, 3 / 3: 50.0, 10 / 5: 49.8; scripts/prototype_label_attention.py)
LABEL_ATTENTION_WEIGHT = 3.0
LABEL_ATTENTION_SHARPNESS = 3.0


@dataclass
class ModelConfig:
    """Everything needed to rebuild a model from a checkpoint. Its defaults are the product's: the
    training options (``TrainConfig``) and ``retrieval train``'s arguments take theirs from here."""

    backbone: str = "efficientnet_lite0"
    groups: dict[str, list[str]] = field(default_factory=dict)
    multi_label_groups: list[str] = field(default_factory=list)
    method: str = "multi-weight"
    embed_dim: int = 256
    taps: str = "all"
    gem_p: float = 3.0
    image_size: int = 288
    dropout: float = 0.3
    head_scale: float = 16.0
    pool_weighting: str = "auto"
    colour_bins: str = "4,6,6"
    colour_weighting: str = "learned"
    normalized_heads: bool = True
    embed_hidden: int = 1024
    flip_average: bool = True
    shared_layers: str = "embedding"
    shared_view: str = "matches"
    label_attention: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


class GeM(nn.Module):
    """Generalised-mean pooling; p = 1 is average pooling, large p tends to max pooling."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p = p
        self.eps = eps

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """Pool NCHW to NC; ``weight`` (N1hw, any resolution) weights the spatial mean."""
        y = x if self.p == 1 else x.clamp(min=self.eps).pow(self.p)
        if weight is None:
            y = y.mean(dim=(2, 3))
        else:
            w = F.adaptive_avg_pool2d(weight.to(y.dtype), y.shape[-2:])
            y = (y * w).sum(dim=(2, 3)) / w.sum(dim=(2, 3)).clamp_min(1e-6)
        return y if self.p == 1 else y.pow(1.0 / self.p)


POOL_WEIGHTINGS = ("auto", "none", "foreground", "learned", "map")
ATTENDED = ("learned", "map")  # pool weightings that pool with the learned colour attention


def resolve_pool_weighting(config: ModelConfig, taps: list[int], n_units: int, frozen_trunk: bool = False) -> str:
    """``auto``: when the colour feature has the learned weighting (its attention is there to pool
    with), ``learned`` (the last unit) for a trunk that trains, ``map`` (the unit before the last,
    whose map the attention reads) for a frozen one, when that unit is tapped; else ``none``. Any
    other value as it is. A frozen trunk is cached, and the last unit would rerun on every batch
    (development catalog: CPU training ~16 -> ~21 min), while the map is in the cache."""
    if config.pool_weighting != "auto":
        return config.pool_weighting
    if config.colour_weighting != "learned" or parse_bins(config.colour_bins) is None:
        return "none"
    choice, unit = ("map", max(n_units - 2, 0)) if frozen_trunk else ("learned", n_units - 1)
    return choice if unit in taps else "none"


def resolve_taps(taps: str, n_units: int, strict: bool = False) -> list[int]:
    """Which trunk units are pooled: ``last``, ``all`` (every unit but the stem) or ``"2,3,4"`` (unit numbers; -1 the last)."""
    if taps == "last":
        return [n_units - 1]
    if taps == "all":
        return list(range(1, n_units))
    try:
        numbers = [int(t) for t in taps.split(",")]
    except ValueError:
        raise ValueError(f"Unknown taps {taps!r}; choose last, all or comma-separated unit numbers") from None
    outside = [t for t in numbers if not -n_units <= t < n_units]
    if outside and strict:  # a new model: 99 on a 5-unit trunk was unit 4, silently (a checkpoint keeps that)
        raise ValueError(f"taps {taps!r}: the trunk has units 0 to {n_units - 1} (or -1 for the last), not "
                         f"{', '.join(map(str, outside))}")
    return sorted({t % n_units for t in numbers})


def head_key(position: int, group: str) -> str:
    """A ModuleDict key for a group's head (no dots, no clash with Module attributes)."""
    return f"{position}_" + group.replace(".", "_")


class RetrievalModel(nn.Module):
    """Shared trunk and embedding layer; ``forward_heads`` gives ``{group: logits}`` of the heads,
    ``group_logits`` those the product scores labels with (label attention's for multi-label groups)."""

    def __init__(self, config: ModelConfig, weights: str | None = None, frozen_trunk: bool = False,
                 strict_taps: bool = False):
        super().__init__()
        if config.pool_weighting not in POOL_WEIGHTINGS:
            raise ValueError(f"Unknown pool weighting {config.pool_weighting!r}; choose one of: "
                             f"{', '.join(POOL_WEIGHTINGS)}")
        if config.method not in METHODS:
            raise ValueError(f"Unknown method {config.method!r}; choose one of: {', '.join(METHODS)}")
        if config.shared_view not in SHARED_VIEWS:
            raise ValueError(f"Unknown shared view {config.shared_view!r}; choose one of: {', '.join(SHARED_VIEWS)}")
        check_colour_weighting(config.colour_weighting)
        self.trunk = create_trunk(config.backbone, weights)
        self.taps = resolve_taps(config.taps, len(self.trunk), strict_taps)  # a new model's first check
        # the checkpoint records what ran: auto resolved
        self.colour_bins = parse_bins(config.colour_bins)
        self.learned_colour = self.colour_bins is not None and config.colour_weighting == "learned"
        self.config = config = replace(config, pool_weighting=resolve_pool_weighting(config, self.taps, len(self.trunk),
                                                                                     frozen_trunk))
        if config.pool_weighting in ATTENDED and not self.learned_colour:
            raise ValueError(f"--pool-weighting {config.pool_weighting} pools with the learned colour weighting's "
                             "attention: it needs --colour-weighting learned and colour bins")
        if config.pool_weighting == "learned" and len(self.trunk) - 1 not in self.taps:
            raise ValueError("--pool-weighting learned weights the last unit's pooling: its taps must include it")
        self.pool = GeM(config.gem_p)
        self.colour_dim = histogram_size(self.colour_bins)
        self.feature_dim = self.colour_dim + sum(self.trunk.channels[i] for i in self.taps)
        if self.learned_colour:
            # the map that places the garment: the unit before the last (EfficientNet-Lite: its last
            # block, 320 channels at the last unit's resolution, of which the last is a 1x1 expansion)
            self.colour_unit = max(len(self.trunk) - 2, 0)
            self.colour_attention = nn.Linear(self.trunk.channels[self.colour_unit], 1)
            if config.pool_weighting == "map" and self.colour_unit not in self.taps:
                raise ValueError("--pool-weighting map weights the pooling of the unit before the last: "
                                 "its taps must include it")
            nn.init.zeros_(self.colour_attention.weight)  # starts as the attention weighting
            nn.init.zeros_(self.colour_attention.bias)
        self.embed = shared_layers(config.shared_layers, self.feature_dim, config.embed_hidden, config.embed_dim,
                                   config.dropout)
        sizes = {g: len(labels) for g, labels in config.groups.items()}
        if config.method == "multi-label":
            self.heads = nn.ModuleDict({"all": nn.Linear(config.embed_dim, sum(sizes.values()))})
        else:
            # keys by position: a group may be called "type" or "a.b", which nn.Module cannot hold
            self.heads = nn.ModuleDict({head_key(i, g): nn.Linear(config.embed_dim, n)
                                        for i, (g, n) in enumerate(sizes.items())})
        # label attention: the multi-label groups' scores come from the trunk's cells, each label
        # attending to its own (one 1x1 layer over every such group's labels); needs the cells of the
        # learned colour weighting. Their logits follow the pooled features (``label_logits``)
        self.attended_groups = [g for g in config.groups if g in config.multi_label_groups] \
            if config.label_attention and self.learned_colour and config.method != "multi-label" else []
        self.label_sizes = [sizes[g] for g in self.attended_groups]
        # the matches shared view's group weights (embfile.group_spread_weights), set after training from
        # the validation items' probabilities and kept in the checkpoint (not a parameter: no state-dict key)
        self.shared_view_weights: dict[str, float] = {}
        # what the other heads say of each single-label group, mixed into its group view where the
        # validation items chose it (cooccurrence.py): set after training, kept in the checkpoint
        self.group_view_prior: dict = {}
        if self.attended_groups:
            self.label_head = nn.Conv1d(self.colour_dim + 1 + self.trunk.channels[self.colour_unit],
                                        sum(self.label_sizes), 1)

    def pool_outputs(self, outputs: list[torch.Tensor], start: int = 0,
                     weight: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Pool the tapped ones of the unit outputs that begin at unit ``start``."""
        return [self.pool(out, weight) for i, out in enumerate(outputs, start) if i in self.taps]

    def pool_weight(self, x: torch.Tensor) -> torch.Tensor | None:
        """Spatial pooling weights of an image batch (None = uniform; ``learned`` weights only the
        last unit, in ``pooled_features``)."""
        return foreground_weights(x) if self.config.pool_weighting == "foreground" else None

    def colour_features(self, x: torch.Tensor, foreground: torch.Tensor | None = None,
                        outputs: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """The product's colour histogram of an image batch, as a list of 0 or 1 tensors;
        ``foreground``: the batch's ``foreground_weights`` when already computed; ``outputs``: the
        trunk's unit outputs (from unit 0), which the ``attention`` and ``learned`` weightings use."""
        if self.colour_bins is None:
            return []
        weight = foreground_weights(x) if foreground is None else foreground
        if self.learned_colour:
            return [self._learned_colour(x, weight, outputs)[0]]
        if self.config.colour_weighting == "attention":
            weight = weight * attention_weights(outputs[-1], weight.shape[-2:])
        return [colour_histogram(x, self.colour_bins, weight).to(x.dtype)]

    def _cells(self, image: torch.Tensor, foreground: torch.Tensor | None, cmap: torch.Tensor) -> torch.Tensor:
        """Per-cell colour mass of an image batch on the grid of the map ``cmap`` (NChw)."""
        foreground = foreground_weights(image) if foreground is None else foreground
        return colour_cells(image, self.colour_bins, foreground, cmap.shape[-2:])

    def _learned_colour(self, x: torch.Tensor, foreground: torch.Tensor | None, outputs: list[torch.Tensor]):
        """The learned weighting's histogram of an image batch (in ``x``'s dtype), its attention
        logits, the map it was computed from and the per-cell colour mass (N, B, cells)."""
        cmap = outputs[self.colour_unit]
        cells = self._cells(x, foreground, cmap)
        hist, logits = self.pool_colour(cells, cmap.flatten(2))
        return hist.to(x.dtype), logits, cmap, cells

    def pool_colour(self, cells: torch.Tensor, cmap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The learned weighting: per-cell colour mass (N, B, cells) pooled by a softmax over cells
        of the attention prior plus a trained linear score of the map (N, C, cells). Returns the
        histogram and those logits (N, cells), which ``pool_weighting="learned"`` pools with too."""
        score = self.colour_attention(cmap.transpose(1, 2).to(self.colour_attention.weight.dtype))
        logits = attention_prior(cmap) + score.squeeze(2).float()
        return pool_cells(cells, logits), logits

    def _colour_prefix(self, image: torch.Tensor, weight: torch.Tensor | None, outputs: list[torch.Tensor],
                       start: int) -> list[torch.Tensor]:
        """What the frozen units before ``start`` give the colour feature: the histogram, or with the
        learned weighting its inputs, flattened: per-cell colour mass, then the map when its unit
        is frozen (the weighting itself trains)."""
        if self.colour_bins is None:
            return []
        if start < len(self.trunk) and (self.learned_colour or self.config.colour_weighting == "attention"):
            with torch.no_grad():  # the maps of units still to train, as the trunk is now
                outputs = outputs + self.trunk(outputs[-1], start)
        if not self.learned_colour:
            return self.colour_features(image, weight, outputs)
        cmap = outputs[self.colour_unit]
        frozen = [cmap.flatten(1)] if self.colour_unit < start else []
        return [t.to(image.dtype) for t in [self._cells(image, weight, cmap).flatten(1), *frozen]]

    def trunk_prefix(self, x: torch.Tensor, start: int, taps: list[int] | None = None,
                     units: nn.ModuleList | None = None):
        """What the frozen units before ``start`` contribute: the colour feature (``_colour_prefix``)
        and the pooled outputs of units ``taps`` (default: the model's) as one prefix, the input of
        unit ``start`` (None when the whole trunk is frozen) and the pooling weights at its
        resolution. The trunk cache stores exactly this; ``pooled_features(act, start, prefix,
        weight)`` continues it. ``units``: the same units in another form (``fold_batchnorm``)."""
        taps = self.taps if taps is None else taps
        image, weight, pooled, outputs = x, self.pool_weight(x), [], []
        for i, unit in enumerate((self.trunk.units if units is None else units)[:start]):
            x = unit(x)
            outputs.append(x)
            if i in taps:
                pooled.append(self.pool(x, weight))
        if start > 0:  # at 0 the model sees the image itself
            pooled = self._colour_prefix(image, weight, outputs, start) + pooled
        prefix = torch.cat(pooled, 1) if pooled else x.new_zeros(len(x), 0)
        if start == len(self.trunk):
            return prefix, None, None
        if weight is not None:
            weight = F.adaptive_avg_pool2d(weight, x.shape[-2:])
        return prefix, x, weight

    def _pool_cached_colour(self, prefix: torch.Tensor, outputs: list[torch.Tensor], start: int):
        """A prefix whose learned-colour inputs (``_colour_prefix``) are replaced by the histogram;
        with the attention's logits, the map (N, C, cells) and the per-cell colour mass (N, B, cells)."""
        taps = sum(self.trunk.channels[t] for t in self.taps if t < start)
        raw, rest = prefix[:, :prefix.shape[1] - taps], prefix[:, prefix.shape[1] - taps:]
        bins = self.colour_dim
        if self.colour_unit < start:
            channels = self.trunk.channels[self.colour_unit]
            cells = raw.shape[1] // (bins + channels)
            mass, cmap = raw[:, :bins * cells], raw[:, bins * cells:].unflatten(1, (channels, cells))
        else:
            cmap = outputs[self.colour_unit - start].flatten(2)
            mass = raw
        mass = mass.unflatten(1, (bins, -1))
        hist, logits = self.pool_colour(mass, cmap)
        return torch.cat([hist.to(prefix.dtype), rest], 1), logits, cmap, mass

    @staticmethod
    def _square_side(cells: int, what: str) -> int:
        """The side of a square map of ``cells`` cells (a cached map is stored flat)."""
        side = math.isqrt(cells)
        if side * side != cells:
            raise ValueError(f"{what} needs a square map, got {cells} cells")
        return side

    def _repool(self, features: torch.Tensor, unit: int, fmap: torch.Tensor, logits: torch.Tensor,
                grid: tuple[int, int]) -> torch.Tensor:
        """``features`` with the pooled columns of tapped ``unit`` replaced by the GeM pooling of its
        output ``fmap`` (NChw) weighted by the garment attention: the softmax of ``logits`` over the
        cells of the attention's map, a ``grid`` (h, w), resampled to ``fmap``'s resolution."""
        attention = torch.softmax(logits, 1).view(len(logits), 1, *grid)
        at = self.colour_dim + sum(self.trunk.channels[t] for t in self.taps if t < unit)
        width = self.trunk.channels[unit]
        return torch.cat([features[:, :at], self.pool(fmap, attention).to(features.dtype), features[:, at + width:]], 1)

    def _attend_last(self, features: torch.Tensor, logits: torch.Tensor, last: torch.Tensor | None,
                     cmap: torch.Tensor) -> torch.Tensor:
        """``pool_weighting="learned"``: the last unit's pooled columns (the end of ``features``)
        pooled again with the garment attention. The last unit's output ``last`` is computed from
        the map (its input, N x C x cells) when cached."""
        side = self._square_side(logits.shape[1], "learned pooling")
        if last is None:  # the whole trunk is frozen and cached: the last unit runs on its cached input
            with torch.no_grad():
                last = self.trunk.units[-1](cmap.unflatten(2, (side, side)).to(features.dtype))
        return self._repool(features, len(self.trunk) - 1, last, logits, (side, side))

    def _attend_map(self, features: torch.Tensor, logits: torch.Tensor, cmap: torch.Tensor) -> torch.Tensor:
        """``pool_weighting="map"``: the pooled columns of the attention's own map (the unit before
        the last, N x C x h x w or N x C x cells) pooled again with the garment attention. Free from
        a trunk cache, which holds that map: the pooling for a frozen trunk."""
        if cmap.dim() == 3:
            side = self._square_side(logits.shape[1], "map pooling")
            cmap = cmap.unflatten(2, (side, side))
        return self._repool(features, self.colour_unit, cmap.to(features.dtype), logits, cmap.shape[-2:])

    def pooled_features(self, x: torch.Tensor | None, start: int = 0, prefix: torch.Tensor | None = None,
                        weight: torch.Tensor | None = None, units: nn.ModuleList | None = None) -> torch.Tensor:
        """Concatenated features: the colour histogram (if any), then the pooled taps (together the
        ``feature_dim`` columns the embedding layer reads), then the attended groups' logits (``label_logits``;
        averaged over views as the rest). ``x`` enters
        at unit ``start`` (None: the whole trunk is cached, ``prefix`` is everything); ``prefix``
        holds what comes before (histogram and earlier taps) and ``weight`` the pooling weights
        (computed from ``x`` when it is the image). ``units``: the trunk's units in another form
        (``fold_batchnorm``)."""
        outputs = [] if x is None else self.trunk(x, start, units)
        logits = cmap = cells = None
        if start > 0 and self.learned_colour:
            prefix, logits, cmap, cells = self._pool_cached_colour(prefix, outputs, start)
        pooled = []
        if start == 0:
            weight = self.pool_weight(x)  # the foreground weights, or None
            if self.learned_colour:
                hist, logits, cmap, cells = self._learned_colour(x, weight, outputs)
                pooled = [hist]
            else:
                pooled = self.colour_features(x, weight, outputs)
        pooled += self.pool_outputs(outputs, start, weight)
        if prefix is not None and prefix.shape[1]:
            pooled = [prefix, *pooled]
        features = torch.cat(pooled, dim=1)
        if self.config.pool_weighting == "learned":
            features = self._attend_last(features, logits, outputs[-1] if outputs else None, cmap)
        elif self.config.pool_weighting == "map":
            features = self._attend_map(features, logits, cmap)
        if self.attended_groups:
            features = torch.cat([features, self._label_scores(cells, cmap).to(features.dtype)], 1)
        return features

    @staticmethod
    def cell_features(cells: torch.Tensor, cmap: torch.Tensor) -> torch.Tensor:
        """What label attention reads in each cell (N, F, cells), without gradients: the cell's colour
        histogram (Hellinger), the log of its colour mass and the trunk map's channels at the cell,
        L2-normalised. ``cells``: per-cell colour mass (N, B, cells); ``cmap``: the map (NChw or N, C, cells)."""
        cells = cells.detach().float().clamp_min(0)  # a cached mass may round below 0
        cmap = cmap.detach().flatten(2).float()
        mass = cells.sum(1, keepdim=True)
        return torch.cat([(cells / mass.clamp_min(1e-8)).sqrt(), torch.log1p(100 * mass),
                          cmap / cmap.norm(dim=1, keepdim=True).clamp_min(1e-6)], 1)

    def _label_scores(self, cells: torch.Tensor, cmap: torch.Tensor) -> torch.Tensor:
        """The attended groups' logits (N, their labels): every label scores every cell (a 1x1 layer
        over ``cell_features``); its logit is the mean score plus the score pooled by the label's own
        softmax over cells (``LABEL_ATTENTION_WEIGHT``, ``LABEL_ATTENTION_SHARPNESS``). Trains on its
        own: the cells are detached, so the embedding is shaped by the heads alone."""
        x = self.cell_features(cells, cmap).to(self.label_head.weight.dtype)
        scores = self.label_head(x)
        attended = (torch.softmax(LABEL_ATTENTION_SHARPNESS * scores, 2) * scores).sum(2)
        return scores.mean(2) + LABEL_ATTENTION_WEIGHT * attended

    @property
    def catalog_views(self) -> int:
        """Views averaged for what gets indexed: 2 (the image and its mirror) with ``flip_average``,
        else 1. The trunk cache holds both; training sees both through random flips."""
        return 2 if self.config.flip_average else 1

    def view_features(self, x: torch.Tensor, views: int | None = None,
                      units: nn.ModuleList | None = None) -> torch.Tensor:
        """Pooled features averaged over ``views``: 1 = the image alone, 2 = with its mirror image;
        None = ``catalog_views``. The one place the number of views is applied. ``units``: as in
        ``pooled_features``."""
        views = self.catalog_views if views is None else views
        if views not in (1, 2):
            raise ValueError(f"views must be 1 or 2, got {views}")
        pooled = self.pooled_features(x, units=units)
        return pooled if views == 1 else (pooled + self.pooled_features(x.flip(3), units=units)) / 2

    def embedding_input(self, pooled: torch.Tensor) -> torch.Tensor:
        """The columns of pooled features the embedding layer reads (all but the label logits)."""
        return pooled[:, :self.feature_dim]

    def embed_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        """The shared embedding layer, L2-normalised."""
        return F.normalize(self.embed(self.embedding_input(pooled)), dim=1)

    def label_logits(self, pooled: torch.Tensor) -> dict[str, torch.Tensor]:
        """Label attention's logits of the attended groups, from the end of pooled features."""
        if not self.attended_groups:
            return {}
        return dict(zip(self.attended_groups, pooled[:, self.feature_dim:].split(self.label_sizes, dim=1)))

    def group_logits(self, emb: torch.Tensor, pooled: torch.Tensor) -> dict[str, torch.Tensor]:
        """The logits the product scores labels with: the heads' (``forward_heads``), but label
        attention's for the attended groups."""
        return {**self.forward_heads(emb), **self.label_logits(pooled)}

    def forward_features(self, x: torch.Tensor, views: int | None = None) -> torch.Tensor:
        """The L2-normalised shared embedding of images: with the default views, what gets indexed;
        ``views=QUERY_VIEWS`` for interactive queries (photo search, ``predict``)."""
        return self.embed_pooled(self.view_features(x, views))

    @staticmethod
    def _head(head: nn.Linear, scaled: torch.Tensor, normalized: bool) -> torch.Tensor:
        if not normalized:
            return head(scaled)
        return F.linear(scaled, F.normalize(head.weight, dim=1), head.bias)

    def forward_heads(self, emb: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits of every group from the normalised embedding: a cosine classifier. With
        ``normalized_heads`` the label weights of the per-group heads are unit vectors too, so
        each label is a direction of the embedding. The multi-label method keeps the paper's plain
        sigmoid layer over all labels (on the fashion catalog unit-length weights cost it 0.9 shared
        and 2.5 group-view mAP; on the demo's multi-label ``colours`` group of a multi-weight model
        they gain 16 group-view mAP)."""
        scaled = emb * self.config.head_scale
        if self.config.method != "multi-label":
            return {g: self._head(head, scaled, self.config.normalized_heads)
                    for g, head in zip(self.config.groups, self.heads.values())}
        logits = self._head(self.heads["all"], scaled, False)
        sizes = [len(labels) for labels in self.config.groups.values()]
        return dict(zip(self.config.groups, logits.split(sizes, dim=1)))

    def forward(self, x: torch.Tensor):
        """Training's forward: the embedding, the heads' logits and label attention's (``label_logits``)."""
        pooled = self.view_features(x, views=1)  # training: one view, random flips do the rest
        emb = self.embed_pooled(pooled)
        return emb, self.forward_heads(emb), self.label_logits(pooled)

    def is_multi_label(self, group: str) -> bool:
        """Whether a group's scores are independent sigmoids (rather than one softmax)."""
        return self.config.method == "multi-label" or group in self.config.multi_label_groups

    @property
    def sigmoid_groups(self) -> list[str]:
        """Groups whose scores are independent sigmoids (recorded in EMB.h5; see embfile.group_vectors)."""
        return [g for g in self.config.groups if self.is_multi_label(g)]

    def probabilities(self, group: str, logits: torch.Tensor) -> torch.Tensor:
        """Softmax or sigmoid probabilities of a group's labels."""
        return torch.sigmoid(logits) if self.is_multi_label(group) else logits.softmax(dim=1)


def create_model(backbone: str, groups: dict[str, list[str]], embed_dim: int = 256, *,
                 method: str = "multi-weight", multi_label_groups=(), weights: str | None = None,
                 frozen_trunk: bool = False, strict_taps: bool = True, **kwargs) -> RetrievalModel:
    """Build a retrieval model.

    Args:
        backbone: a name from ``retrieval.net.backbones.BACKBONES``.
        groups: label vocabulary of every attribute group, in order.
        embed_dim: size of the shared embedding layer.
        method: ``multi-weight``, ``multi-task`` (per-group heads) or ``multi-label`` (one head).
        multi_label_groups: groups whose labels are scored with independent sigmoids.
        weights: trunk weights file; ``None`` = packaged ImageNet weights when available.
        frozen_trunk: the whole trunk stays frozen (training from a trunk cache): settles
            ``pool_weighting="auto"`` (``resolve_pool_weighting``).
        strict_taps: taps must name units of the trunk (a new model; a resumed run keeps what it had).
        **kwargs: other ``ModelConfig`` fields (taps, gem_p, image_size, dropout, head_scale).
    """
    config = ModelConfig(backbone=backbone, groups={g: list(v) for g, v in groups.items()},
                         multi_label_groups=list(multi_label_groups), method=method,
                         embed_dim=embed_dim, **kwargs)
    return RetrievalModel(config, weights, frozen_trunk, strict_taps)


# what a checkpoint written before an option existed was trained with (the option's old value)
LEGACY = {"image_size": 224, "dropout": 0.1, "colour_bins": "none", "normalized_heads": False,
          "embed_hidden": 0, "flip_average": False, "pool_weighting": "none", "colour_weighting": "border",
          "shared_view": "embedding", "label_attention": False}


def model_from_config(config: dict) -> RetrievalModel:
    """Rebuild a model (random weights, to be loaded) from a checkpoint's config dict; fields the
    checkpoint lacks take their value from before the option existed (``LEGACY``)."""
    return RetrievalModel(ModelConfig(**{**LEGACY, **config}), weights="none")


def model_options(options) -> dict:
    """The ``ModelConfig`` fields (but the label schema) found on an options object such as a
    ``TrainConfig``: what ``create_model`` takes from a training run, with no field copied by hand."""
    schema = ("backbone", "groups", "multi_label_groups", "method", "embed_dim")
    return {f.name: getattr(options, f.name) for f in fields(ModelConfig)
            if f.name not in schema and hasattr(options, f.name)}


def fingerprint(model: nn.Module, keep=None) -> str:
    """sha256 of the model state (names, shapes and values); ``keep(name)`` picks the entries
    (None = all)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if keep is not None and not keep(name):
            continue
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
