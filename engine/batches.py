"""Training epochs over cached tensors without a DataLoader: the head and the gate take one
optimiser step per image by default (the reference code's regime), so per-step overhead matters.
:func:`per_step_epoch` is the one epoch loop of both, for an ensemble of models stacked in one
module (a sweep's heads, stage 3's gates; a single run is an ensemble of one), one step for all of
them, each in its own :class:`TrainingOrder`; :class:`MemberAdam` is their optimiser."""
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


def epoch_steps(count: int, batch_size: int) -> list[int]:
    """The rows of each step of an epoch over ``count`` rows: full batches, then the rest."""
    return [len(rows) for rows in torch.arange(count).split(batch_size)]


def per_step_epoch(model: nn.Module, optimizer: MemberAdam, inputs: Sequence[torch.Tensor],
                   targets: Sequence[torch.Tensor], loss: Callable[..., torch.Tensor], orders: Sequence[TrainingOrder],
                   batch_size: int, epoch: int, extras: Callable[[], Iterable[tuple]] | None = None,
                   per_member: bool = False) -> dict:
    """One epoch of optimiser steps over device-resident tensors for the E members stacked in
    ``model``, all in one step, ``batch_size`` rows a member a step: member ``e`` visits the rows in
    ``orders[e]``'s sequence for this epoch, so its step sees ``inputs[rows_e]``
    (``inputs[e][rows_e]`` with ``per_member``: each member its own (N, ...) data); ``model`` takes
    (E, B, ...) inputs (plus ``extras()``'s next tuple per step, e.g. the members' dropout masks)
    and ``loss`` returns the members' losses (E,). Their sum is differentiated: each member's
    weights get the gradient of its own loss alone.

    Returns ``{"train_loss": [E means over the rows]}``; the losses are summed on the device and
    read back once, not once per step. ``epoch`` is engine.fit's epoch number (the orders depend
    only on ``orders``: their seeds and whether they reshuffle).
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


class MemberAdam:
    """Adam for the members stacked in an ensemble's parameters: each member's slice of each stacked
    parameter (its index along dim 0) is updated as its own tensor, with its own moments and step
    count, by ``torch.optim.Adam``'s fused kernel (weight decay added to the gradient, as the
    reference's Adam), so a member takes exactly the steps ``torch.optim.Adam(fused=True)`` takes
    on the model trained alone (the kernel's rounding depends on each tensor's size, so one flat
    update of the stacks would round otherwise). Adam is elementwise: nothing flows between
    members. The fused kernel makes a batch-1 step several times cheaper on a CPU than Adam's dozen
    small operations per tensor (``python -m bench --only batch_one``); only the last bits of
    rounding differ from them. ``zero_grad``/``step`` as an optimiser's."""

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
