"""Training epochs over cached tensors without a DataLoader: the head and the gate take one
optimiser step per image by default (the reference code's regime), so per-step overhead matters.
:func:`per_step_epoch` is the one epoch loop of both; :class:`TrainingOrder` is the order it
visits the rows in."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn


class TrainingOrder:
    """The order each epoch visits ``count`` training rows in, drawn from a seeded generator on its
    device (no host round trip).

    By default one shuffle, drawn here and kept for every epoch: the reference code shuffles its
    training list once when it builds the dataset (``random.shuffle``) and iterates that list as it
    is in every epoch, for the head and for the gate. ``reshuffle`` draws a new order each epoch
    (ours, as a DataLoader with ``shuffle=True``). The first epoch's order is the same either way.
    """

    def __init__(self, count: int, generator: torch.Generator, reshuffle: bool = False):
        self.count, self.generator, self.reshuffle = count, generator, reshuffle
        self.fixed = None if reshuffle else self.draw()

    def draw(self) -> torch.Tensor:
        return torch.randperm(self.count, generator=self.generator, device=self.generator.device)

    def epoch_rows(self) -> torch.Tensor:
        """The row indices of the next epoch, in the order they are visited."""
        return self.draw() if self.reshuffle else self.fixed


def shuffled_batches(order: TrainingOrder, batch_size: int) -> tuple[torch.Tensor, ...]:
    """One epoch's mini-batches of indices, in the order's sequence for this epoch."""
    return order.epoch_rows().split(batch_size)


def per_step_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, inputs: Sequence[torch.Tensor],
                   targets: Sequence[torch.Tensor], loss: Callable[..., torch.Tensor], order: TrainingOrder,
                   batch_size: int, epoch: int) -> dict:
    """One epoch of optimiser steps over device-resident tensors, ``batch_size`` rows a step in
    ``order``'s sequence for this epoch: ``loss(model(*inputs[rows]), *targets[rows])``.

    Returns ``{"train_loss"}``, the mean over the rows; the loss is summed on the device and read
    back once, not once per step. ``epoch`` is engine.fit's epoch number (the order depends only on
    ``order``: its seed and whether it reshuffles).
    """
    count = len(inputs[0])
    total = torch.zeros((), device=inputs[0].device)
    for rows in shuffled_batches(order, batch_size):
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
