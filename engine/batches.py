"""Training epochs over cached tensors without a DataLoader: the head and the gate take one
optimiser step per image by default (the reference code's regime), so per-step overhead matters.
:func:`per_step_epoch` is the one epoch loop of both; :class:`TrainingOrder` is the order it
visits the rows in. :func:`ensemble_epoch` is the same loop for an ensemble of models stacked in
one module (a sweep's heads, a gate's seeds), one step for all of them, each in its own order."""
from __future__ import annotations

import itertools
from typing import Callable, Iterable, Sequence

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


def epoch_steps(count: int, batch_size: int) -> list[int]:
    """The rows of each step of an epoch over ``count`` rows: full batches, then the rest."""
    return [len(rows) for rows in torch.arange(count).split(batch_size)]


def ensemble_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, inputs: Sequence[torch.Tensor],
                   targets: Sequence[torch.Tensor], loss: Callable[..., torch.Tensor], orders: Sequence[TrainingOrder],
                   batch_size: int, epoch: int, extras: Callable[[], Iterable[tuple]] | None = None,
                   per_member: bool = False) -> dict:
    """One epoch of :func:`per_step_epoch` for the E members stacked in ``model``, all in one step:
    member ``e`` visits the rows in ``orders[e]``'s sequence, so its step sees ``inputs[rows_e]``
    (``inputs[e][rows_e]`` with ``per_member``: each member its own (N, ...) data); ``model`` takes
    (E, B, ...) inputs (plus ``extras()``'s next tuple per step, e.g. the members' dropout masks)
    and ``loss`` returns the members' losses (E,). Their sum is differentiated: each member's
    weights get the gradient of its own loss alone.

    Returns ``{"train_loss": [E means over the rows]}``, read back once per epoch.
    """
    rows_all = torch.stack([order.epoch_rows() for order in orders])  # (E, N)
    members, count = rows_all.shape
    total = torch.zeros(members, device=inputs[0].device)
    per_step = extras() if extras is not None else itertools.repeat(())
    member = torch.arange(members, device=rows_all.device).unsqueeze(1)
    for rows, extra in zip(rows_all.split(batch_size, dim=1), per_step):
        at = (member, rows) if per_member else rows
        step_loss = loss(model(*(tensor[at] for tensor in inputs), *extra), *(tensor[at] for tensor in targets))
        optimizer.zero_grad(set_to_none=True)
        step_loss.sum().backward()
        optimizer.step()
        total += step_loss.detach() * rows.shape[1]
    return {"train_loss": [value / max(count, 1) for value in total.tolist()]}  # the epoch's one host sync


def per_step_adam(params, lr: float, weight_decay: float) -> torch.optim.Adam:
    """Adam for the per-image loops of the head and the gate, with the fused kernel: one pass over
    every parameter per step instead of a dozen small operations per tensor. The update rule is
    Adam's (the reference's optimiser); only the last bits of rounding differ, and a batch-1 step
    is several times cheaper on CPU (``python -m bench --only batch_one``)."""
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=True)


class MemberAdam:
    """Adam for the members stacked in an ensemble's parameters: each member's slice of each stacked
    parameter (its index along dim 0) is updated as its own tensor, by the fused kernel of
    :func:`per_step_adam`, with its own moments and step count, so a member takes exactly the steps
    ``torch.optim.Adam(fused=True)`` takes on the head trained alone (the kernel's rounding depends
    on each tensor's size, so one flat update of the stacks would round otherwise). Adam is
    elementwise: nothing flows between members. ``zero_grad``/``step`` as an optimiser's."""

    def __init__(self, stacks, lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8):
        self.stacks = list(stacks)
        self.lr, self.weight_decay, self.betas, self.eps = lr, weight_decay, betas, eps
        self.params = [member for stack in self.stacks for member in stack.detach().unbind(0)]  # views
        self.exp_avgs = [torch.zeros_like(param) for param in self.params]
        self.exp_avg_sqs = [torch.zeros_like(param) for param in self.params]
        # torch.optim.Adam(fused=True)'s step counters: a float32 scalar per tensor, on its device.
        self.steps = [torch.zeros((), dtype=torch.float32, device=param.device) for param in self.params]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for stack in self.stacks:
            stack.grad = None

    @torch.no_grad()
    def step(self) -> None:
        grads = [member for stack in self.stacks for member in stack.grad.unbind(0)]
        torch._foreach_add_(self.steps, 1)
        torch._fused_adam_(self.params, grads, self.exp_avgs, self.exp_avg_sqs, [], self.steps, amsgrad=False,
                           lr=self.lr, beta1=self.betas[0], beta2=self.betas[1], weight_decay=self.weight_decay,
                           eps=self.eps, maximize=False, grad_scale=None, found_inf=None)
