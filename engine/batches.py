"""Training epochs over cached tensors without a DataLoader: the head and the gate take one
optimiser step per image by default (the reference code's regime), so per-step overhead matters.
:func:`per_step_epoch` is the one epoch loop of both."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn


def shuffled_batches(count: int, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """One epoch's mini-batches of indices, shuffled on the generator's device (no host round trip)."""
    return torch.randperm(count, generator=generator, device=generator.device).split(batch_size)


def per_step_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, inputs: Sequence[torch.Tensor],
                   targets: Sequence[torch.Tensor], loss: Callable[..., torch.Tensor], generator: torch.Generator,
                   batch_size: int, epoch: int) -> dict:
    """One epoch of optimiser steps over device-resident tensors, ``batch_size`` rows a step in an
    order drawn from ``generator``: ``loss(model(*inputs[rows]), *targets[rows])``.

    Returns ``{"train_loss"}``, the mean over the rows; the loss is summed on the device and read
    back once, not once per step. ``epoch`` is engine.fit's epoch number (the order depends only on
    the generator's state).
    """
    count = len(inputs[0])
    total = torch.zeros((), device=inputs[0].device)
    for rows in shuffled_batches(count, batch_size, generator):
        step_loss = loss(model(*(tensor[rows] for tensor in inputs)), *(tensor[rows] for tensor in targets))
        optimizer.zero_grad(set_to_none=True)
        step_loss.backward()
        optimizer.step()
        total += step_loss.detach() * len(rows)
    return {"train_loss": total.item() / max(count, 1)}  # the epoch's one host sync


def per_step_adam(params, lr: float, weight_decay: float) -> torch.optim.Adam:
    """Adam for the per-image loops of the head and the gate, with the fused kernel: one pass over
    every parameter per step instead of a dozen small operations per tensor. The update rule is
    Adam's (the reference's optimiser); only the last bits of rounding differ, and a batch-1 step
    is several times cheaper on CPU (``python -m bench --only batch_one``)."""
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=True)
