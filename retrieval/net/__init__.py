"""The network: backbones, colour histogram, the model, the trunk cache, checkpoints."""
