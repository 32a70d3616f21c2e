"""The head and the gate train with one optimiser step per image by default (the reference
code's regime) and stay cheap doing so: no host synchronisation per step."""
from __future__ import annotations

import sys

import pytest
import torch

import train_distillation
import train_gate
from engine.batches import MemberAdam, TrainingOrder, per_step_epoch
from engine.distill import train_head
import engine.gate
from engine.gate import GateData

N_TRAIN, N_VAL, CLASSES, DIM, EPOCHS = 40, 12, 3, 8, 2


def _head_data():
    generator = torch.Generator().manual_seed(0)
    features = {"train": torch.randn(N_TRAIN, DIM, generator=generator),
                "val": torch.randn(N_VAL, DIM, generator=generator)}
    teacher = {split: torch.randn(len(x), CLASSES, generator=generator) for split, x in features.items()}
    labels = {split: torch.randint(0, CLASSES, (len(x),), generator=generator) for split, x in features.items()}
    return features, teacher, labels


def _gate_data(n: int, seed: int) -> GateData:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, CLASSES, (n,), generator=generator)
    return GateData(vlm_pred=labels, vlm_signal=torch.nn.functional.one_hot(labels, CLASSES).float(),
                    head_logits=torch.randn(n, CLASSES, generator=generator), labels=labels)


@pytest.fixture
def counted(monkeypatch):
    """Counts of optimiser steps (MemberAdam's: a single head or gate is an ensemble of one) and of
    ``Tensor.item`` calls made by the training loops (each one a host synchronisation on a GPU)."""
    counts = {"steps": 0, "items": 0}
    step, item = MemberAdam.step, torch.Tensor.item

    def counting_step(self, *args, **kwargs):
        counts["steps"] += 1
        return step(self, *args, **kwargs)

    def counting_item(self):
        counts["items"] += sys._getframe(1).f_globals["__name__"] in ("engine.batches", "engine.distill", "engine.gate",
                                                                      "engine.fit")
        return item(self)

    monkeypatch.setattr(MemberAdam, "step", counting_step)
    monkeypatch.setattr(torch.Tensor, "item", counting_item)
    return counts


def test_head_defaults_to_one_step_per_image_without_a_sync_per_step(counted):
    features, teacher, labels = _head_data()
    train_head(features, teacher, labels, DIM, CLASSES, epochs=EPOCHS, lr=1e-3)
    assert counted["steps"] == EPOCHS * N_TRAIN
    assert counted["items"] <= 4 * EPOCHS  # a few per epoch (loss, val loss, val acc), none per step


def test_gate_defaults_to_one_step_per_image_without_a_sync_per_step(counted):
    engine.gate.train_gate("concat_linear", CLASSES, _gate_data(N_TRAIN, 1), _gate_data(N_VAL, 2), epochs=EPOCHS)
    assert counted["steps"] == EPOCHS * N_TRAIN
    assert counted["items"] <= 4 * EPOCHS


def test_head_epoch_loss_is_the_mean_of_its_step_losses():
    """Summing on the device loses nothing: with lr 0 every step sees the same head, so the
    epoch's loss equals the loss of the whole training split at once (dropout off: depth 0)."""
    from models.heads import distillation_loss
    from models.heads import DistillHead

    features, teacher, labels = _head_data()
    result = train_head(features, teacher, labels, DIM, CLASSES, depth=0, epochs=1, lr=0.0, seed=3)
    torch.manual_seed(3)
    fresh = DistillHead(DIM, CLASSES, 0, 0.1)
    per_image = torch.stack([distillation_loss(fresh(features["train"][i:i + 1]), teacher["train"][i:i + 1],
                                               labels["train"][i:i + 1], 0.5, 2.0) for i in range(N_TRAIN)])
    assert result.history[0]["train_loss"] == pytest.approx(per_image.mean().item(), rel=1e-5)


def test_member_adam_is_adam():
    """The fused optimiser of the per-image loops takes Adam's steps (with the weight decay added
    to the gradient, not decoupled as in AdamW): a few steps match the reference implementation."""
    from engine.batches import MemberAdam

    torch.manual_seed(0)
    reference = torch.nn.Linear(DIM, CLASSES)
    stacked = [torch.nn.Parameter(p.detach().clone().unsqueeze(0)) for p in reference.parameters()]  # one member
    optimizers = (torch.optim.Adam(reference.parameters(), lr=1e-2, weight_decay=1e-1, foreach=False),
                  MemberAdam(stacked, 1e-2, 1e-1))
    x, y = torch.randn(5, DIM), torch.randint(0, CLASSES, (5,))
    for _ in range(5):
        optimizers[0].zero_grad()
        torch.nn.functional.cross_entropy(reference(x), y).backward()
        optimizers[0].step()
        optimizers[1].zero_grad()
        torch.nn.functional.cross_entropy(torch.nn.functional.linear(x, stacked[0][0], stacked[1][0]), y).backward()
        optimizers[1].step()
    for a, b in zip(reference.parameters(), stacked):
        torch.testing.assert_close(a, b[0], rtol=0, atol=1e-6)


# ---------------------------------------------------------------- the order of the training rows

class RowRecorder(torch.nn.Module):
    """A linear model that notes, step by step, which rows (their first feature: the row index) it was given."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(1, CLASSES)
        self.seen: list[int] = []

    def forward(self, x):  # x: (1 member, B, 1)
        self.seen += x[0, :, 0].long().tolist()
        return self.linear(x)


def _visits(reshuffle: bool, seed: int, epochs: int = 3) -> list[list[int]]:
    """The rows each epoch of per_step_epoch visits, in order, under a TrainingOrder (one member)."""
    model = RowRecorder()
    rows = torch.arange(N_TRAIN, dtype=torch.float32).unsqueeze(1)
    labels = torch.zeros(N_TRAIN, dtype=torch.long)
    order = TrainingOrder(N_TRAIN, torch.Generator().manual_seed(seed), reshuffle)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)

    def loss(logits, targets):  # the member's loss, (1,)
        return torch.nn.functional.cross_entropy(logits[0], targets[0]).unsqueeze(0)

    visits = []
    for epoch in range(1, epochs + 1):
        model.seen = []
        per_step_epoch(model, optimizer, (rows,), (labels,), loss, [order], 1, epoch)
        visits.append(model.seen)
    return visits


def test_default_order_is_one_seeded_shuffle_kept_every_epoch_and_reshuffle_draws_a_new_one():
    """The reference code shuffles its training list once and iterates it as it is every epoch."""
    fixed = _visits(reshuffle=False, seed=0)
    assert sorted(fixed[0]) == list(range(N_TRAIN)) and fixed[0] != list(range(N_TRAIN))  # shuffled, each row once
    assert fixed[0] == fixed[1] == fixed[2]                                              # the same every epoch
    assert _visits(reshuffle=False, seed=0) == fixed                                     # the seed fixes it
    assert _visits(reshuffle=False, seed=1)[0] != fixed[0]                               # another seed, another order
    fresh = _visits(reshuffle=True, seed=0)
    assert fresh[0] == fixed[0]                                    # the first epoch is the same either way
    assert fresh[1] != fresh[0] and fresh[2] != fresh[1]           # then a new order each epoch
    assert all(sorted(epoch) == list(range(N_TRAIN)) for epoch in fresh)
    assert _visits(reshuffle=True, seed=0) == fresh                # also fixed by the seed


def test_reshuffle_is_a_flag_of_stages_2_and_3_and_changes_what_is_trained():
    assert not train_distillation.parse(["--dataname", "toy"]).reshuffle  # the reference code's order
    assert train_distillation.parse(["--dataname", "toy", "--reshuffle"]).reshuffle
    assert not train_gate.parse(["--dataname", "toy"]).reshuffle
    assert train_gate.parse(["--dataname", "toy", "--reshuffle"]).reshuffle
    features, teacher, labels = _head_data()
    # The epochs' training losses (the kept weights may be an early epoch's, the same either way).
    kept = [row["train_loss"] for row in train_head(features, teacher, labels, DIM, CLASSES, epochs=3, lr=1e-2,
                                                     seed=0).history]
    redrawn = [row["train_loss"] for row in train_head(features, teacher, labels, DIM, CLASSES, epochs=3, lr=1e-2,
                                                        seed=0, reshuffle=True).history]
    assert kept[0] == redrawn[0]  # one epoch visits the same order either way
    assert kept[1:] != redrawn[1:]  # from the second on the orders, and so the heads, differ
    again = [row["train_loss"] for row in train_head(features, teacher, labels, DIM, CLASSES, epochs=3, lr=1e-2,
                                                      seed=0).history]
    assert again == kept  # the seed fixes the order
    train, val = _gate_data(N_TRAIN, 0), _gate_data(N_VAL, 1)
    kept = [row["train_loss"] for row in engine.gate.train_gate("concat_linear", CLASSES, train, val, epochs=3,
                                                                lr=1e-2, seed=0).history]
    redrawn = [row["train_loss"] for row in engine.gate.train_gate("concat_linear", CLASSES, train, val, epochs=3,
                                                                   lr=1e-2, seed=0, reshuffle=True).history]
    assert kept[0] == redrawn[0] and kept[1:] != redrawn[1:]
