"""Where work runs: one rule for every command's ``--device``."""
from __future__ import annotations

import torch

DEVICES = ("auto", "cpu", "cuda")  # and cuda:N


def resolve_device(choice: str | torch.device = "auto") -> torch.device:
    """``auto`` picks CUDA when present; ``cpu``, ``cuda`` or ``cuda:N`` as asked, and asking for CUDA
    without one is an error that says what to use instead."""
    if isinstance(choice, torch.device):
        return choice
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice not in ("cpu", "cuda") and not (choice.startswith("cuda:") and choice[5:].isdigit()):
        raise ValueError(f"Unknown device {choice!r}; choose one of: auto, cpu, cuda, cuda:N")
    if choice.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {choice} asked for, but no CUDA device is available; use --device cpu or auto")
    return torch.device(choice)
