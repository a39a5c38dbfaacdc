"""Checkpoints: atomic save, load with a clear error, model rebuilt from its own config."""
from __future__ import annotations

import logging
import pickle
import re
from pathlib import Path

import torch

from retrieval.atomic import atomic_write
from retrieval.data.cooccurrence import prior_from_state
from retrieval.net.model import RetrievalModel, fingerprint, model_from_config

logger = logging.getLogger(__name__)

def atomic_save(obj, path: str | Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename it into place; temporaries
    that killed writers left in the directory are removed first."""
    with atomic_write(path, "wb") as f:
        torch.save(obj, f)


def make_checkpoint(model: RetrievalModel, **extra) -> dict:
    """The checkpoint dict of a model plus training state (optimizer, epoch, ...)."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return {"model": state, "model_config": model.config.to_dict(), "fingerprint": fingerprint(model), **extra}


def unpickler_detail(err: Exception) -> str:
    """``: Unsupported global: GLOBAL x`` from torch's long weights-only message, or nothing."""
    found = re.search(r"Unsupported global: GLOBAL [\w.]+", str(err))
    return f": {found.group(0)}" if found else ""


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint dict, naming the file when it is not one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:  # tensors and plain data only: unpickling runs code, and serve or predict may be given any file
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(f"{path}: not a retrieval checkpoint (it holds Python objects besides tensors and "
                         f"plain data, which are not unpickled{unpickler_detail(err)})") from None
    except Exception as err:  # torch raises many types for corrupt files
        raise ValueError(f"{path}: not a readable checkpoint ({err})") from err
    if not isinstance(ckpt, dict):  # a saved tensor or module: `in` raised torch's own errors
        raise ValueError(f"{path}: not a retrieval checkpoint (it holds a {type(ckpt).__name__}, not a dict)")
    missing = [k for k in ("model", "model_config", "fingerprint") if k not in ckpt]
    if missing:
        raise ValueError(f"{path}: not a retrieval checkpoint (missing {', '.join(missing)})")
    return ckpt


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[RetrievalModel, dict]:
    """The model of a checkpoint in eval mode, and the checkpoint dict."""
    ckpt = load_checkpoint(path)
    model = model_from_config(ckpt["model_config"])
    model.load_state_dict(ckpt["model"])
    model.shared_view_weights = dict(ckpt.get("shared_view_weights") or {})  # none before they existed: equal
    model.group_view_prior = prior_from_state(ckpt.get("group_view_prior"))  # none before it existed
    return model.to(device).eval(), ckpt
