"""Where work runs: one rule for every command's ``--device``, and one way to join torchrun's group."""
from __future__ import annotations

import datetime as dt
import os

import torch
import torch.distributed as dist

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


def setup_distributed(device: torch.device, timeout: dt.timedelta | None = None) -> tuple[int, int, torch.device]:
    """Join the torchrun process group when launched by torchrun (nccl on CUDA, gloo on the CPU);
    returns (rank, world, device), the device being cuda:LOCAL_RANK on CUDA. ``timeout`` bounds
    every collective (torch's default when None)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    return dist.get_rank(), world, device
