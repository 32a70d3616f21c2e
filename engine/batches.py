"""Mini-batches over cached tensors without a DataLoader: the head and the gate take one
optimiser step per image by default (the reference code's regime), so per-step overhead matters."""
from __future__ import annotations

import torch


def shuffled_batches(count: int, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """One epoch's mini-batches of indices, shuffled on the generator's device (no host round trip)."""
    return torch.randperm(count, generator=generator, device=generator.device).split(batch_size)
