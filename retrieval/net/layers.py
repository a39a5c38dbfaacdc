"""The shared layers between the pooled trunk features and the heads (what gets indexed)."""
from __future__ import annotations

from torch import nn

# the product's embedding block, or AlexNet's fc6/fc7 as in Li et al. 2017 (Dropout, Linear, ReLU
# twice; the fc7 output is the retrieval feature)
SHARED_LAYERS = ("embedding", "fc")


def shared_layers(kind: str, width: int, hidden: int, out: int, dropout: float) -> nn.Sequential:
    """Layers from ``width`` pooled features to ``out``.

    Args:
        kind: ``embedding`` = BatchNorm, Dropout, (Linear ``hidden``, BatchNorm, ReLU when hidden > 0),
            Linear ``out``; ``fc`` = Dropout, Linear ``hidden`` (fc6), ReLU, Dropout, Linear ``out`` (fc7), ReLU.
        dropout: the dropout probability (before each Linear of ``fc``, after the first BatchNorm otherwise).
    """
    if kind not in SHARED_LAYERS:
        raise ValueError(f"Unknown shared layers {kind!r}; choose one of: {', '.join(SHARED_LAYERS)}")
    if kind == "fc":
        if hidden <= 0:
            raise ValueError("shared layers 'fc' need a positive fc6 width (--embed-hidden)")
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(width, hidden), nn.ReLU(),
                             nn.Dropout(dropout), nn.Linear(hidden, out), nn.ReLU())
    layers = [nn.BatchNorm1d(width), nn.Dropout(dropout)]
    if hidden:  # a hidden layer: non-linear mixing of the scales and the colour
        layers += [nn.Linear(width, hidden), nn.BatchNorm1d(hidden), nn.ReLU()]
        width = hidden
    return nn.Sequential(*layers, nn.Linear(width, out))
