"""Checkpoints: atomic save, load with a clear error, model rebuilt from its own config."""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import torch

from indexer.stale import HOST, writer_gone

from .model import RetrievalModel, fingerprint, model_from_config

logger = logging.getLogger(__name__)

# .NAME.HOST-PID.tmp; older versions wrote .NAME.PID.tmp
TEMPORARY = re.compile(r"^\..+\.(?:(?P<host>[\w-]+)-)?(?P<pid>\d+)\.tmp$")


def temporary_path(path: Path) -> Path:
    """The temporary file beside ``path`` that this process writes: ``.NAME.HOST-PID.tmp``."""
    return path.with_name(f".{path.name}.{HOST}-{os.getpid()}.tmp")


def remove_stale_temporaries(directory: Path) -> list[Path]:
    """Delete the temporaries in ``directory`` whose writer is gone: a dead process of this host,
    or older than a day (names without a host, and other hosts', are judged by age alone)."""
    removed = []
    for entry in os.scandir(directory) if directory.is_dir() else ():
        match = TEMPORARY.match(entry.name)
        try:
            if not match or not entry.is_file(follow_symlinks=False):
                continue
            mtime = entry.stat(follow_symlinks=False).st_mtime
        except FileNotFoundError:  # its writer finished meanwhile
            continue
        if writer_gone(match["host"], match["pid"], mtime):
            Path(entry.path).unlink(missing_ok=True)
            removed.append(Path(entry.path))
            logger.info("Removed %s, left by a writer that is gone", entry.path)
    return removed


def atomic_save(obj, path: str | Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename it into place; temporaries
    that killed writers left in the directory are removed first."""
    path = Path(path)
    remove_stale_temporaries(path.parent)
    tmp = temporary_path(path)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def make_checkpoint(model: RetrievalModel, **extra) -> dict:
    """The checkpoint dict of a model plus training state (optimizer, epoch, ...)."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return {"model": state, "model_config": model.config.to_dict(), "fingerprint": fingerprint(model), **extra}


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint dict, naming the file when it is not one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises many types for corrupt files
        raise ValueError(f"{path}: not a readable checkpoint ({err})") from err
    missing = [k for k in ("model", "model_config", "fingerprint") if k not in ckpt]
    if missing:
        raise ValueError(f"{path}: not a retrieval checkpoint (missing {', '.join(missing)})")
    return ckpt


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[RetrievalModel, dict]:
    """The model of a checkpoint in eval mode, and the checkpoint dict."""
    ckpt = load_checkpoint(path)
    model = model_from_config(ckpt["model_config"])
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt
