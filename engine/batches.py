"""Mini-batches over cached tensors without a DataLoader: the head and the gate take one
optimiser step per image by default (the reference code's regime), so per-step overhead matters."""
from __future__ import annotations

import torch


def shuffled_batches(count: int, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """One epoch's mini-batches of indices, shuffled on the generator's device (no host round trip)."""
    return torch.randperm(count, generator=generator, device=generator.device).split(batch_size)


def per_step_adam(params, lr: float, weight_decay: float) -> torch.optim.Adam:
    """Adam for the per-image loops of the head and the gate, with the fused kernel: one pass over
    every parameter per step instead of a dozen small operations per tensor. The update rule is
    Adam's (the reference's optimiser); only the last bits of rounding differ, and a batch-1 step
    is several times cheaper on CPU (``python -m bench --only batch_one``)."""
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=True)
