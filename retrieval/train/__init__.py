"""Training: options, the loop, losses, sampling, the run (data, checkpoints, resume, DDP)."""
