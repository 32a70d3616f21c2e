"""engine.fit, the loop the teacher, the head and the gate share: the state it keeps is the one
best on validation, its history has one row per epoch in one format, and log.txt holds those rows."""
from __future__ import annotations

import json

import pytest
import torch

from engine.fit import EpochLog, by_val_acc_then_loss, fit
from utils.outputs import DivergedError

# Validation accuracy and loss after each epoch of the toy fit below: accuracy peaks at epoch 3.
VAL_ACC = [0.25, 0.5, 0.75, 0.5, 0.25]
VAL_LOSS = [1.5, 1.25, 1.0, 0.75, 0.5]  # keeps falling: a rule on the loss would pick epoch 5


def toy_fit(val_acc=VAL_ACC, val_loss=VAL_LOSS, **kwargs):
    """A one-weight model whose weight is set to the epoch number by each training epoch, and whose
    validation metrics are read from the tables at that weight."""
    model = torch.nn.Linear(1, 1, bias=False)
    modes = []

    def train_epoch(epoch: int) -> dict:
        modes.append(model.training)
        with torch.no_grad():
            model.weight.fill_(float(epoch))
        return {"train_loss": 1.0 / epoch}

    def evaluate() -> dict:
        modes.append(model.training)
        index = int(model.weight.item()) - 1
        return {"val_loss": val_loss[index], "val_acc": val_acc[index]}

    fitted = fit(model, len(val_acc), train_epoch, evaluate, name="toy model", flags="--lr", **kwargs)
    return model, fitted, modes


def test_fit_keeps_the_state_best_on_validation_and_one_row_per_epoch(tmp_path):
    epoch_log = EpochLog(tmp_path / "log.txt")
    model, fitted, modes = toy_fit(epoch_log=epoch_log)
    assert fitted.best_epoch == 3
    assert model.weight.item() == 3.0 and fitted.best_state["weight"].item() == 3.0  # not the last epoch's 5
    assert not model.training and modes == [True, False] * 5  # train mode to train, eval mode to validate
    expected = [{"epoch": e, "train_loss": 1.0 / e, "val_loss": VAL_LOSS[e - 1], "val_acc": VAL_ACC[e - 1]}
                for e in range(1, 6)]
    assert fitted.history == expected and fitted.best == expected[2]
    assert [json.loads(line) for line in (tmp_path / "log.txt").read_text().splitlines()] == expected


def test_the_first_of_equal_epochs_wins_and_the_gate_breaks_ties_by_loss():
    ties = [0.5, 0.75, 0.75, 0.75, 0.25]
    assert toy_fit(ties)[1].best_epoch == 2  # teacher and head: the first epoch of the best accuracy
    assert toy_fit(ties, score=by_val_acc_then_loss)[1].best_epoch == 4  # gate: then the lowest loss
    assert toy_fit(ties, [1.0] * 5, score=by_val_acc_then_loss)[1].best_epoch == 2  # then the first


def test_several_fits_share_one_log_with_their_tag(tmp_path):
    epoch_log = EpochLog(tmp_path / "log.txt")
    (tmp_path / "log.txt").write_text("a line of an earlier run\n")
    for name in ("a", "b"):
        toy_fit(VAL_ACC[:2], tag={"gate": name}, epoch_log=epoch_log)
    rows = [json.loads(line) for line in (tmp_path / "log.txt").read_text().splitlines()]
    assert [(row["gate"], row["epoch"]) for row in rows] == [("a", 1), ("a", 2), ("b", 1), ("b", 2)]


def test_a_non_finite_loss_stops_naming_the_model_and_the_flag():
    with pytest.raises(DivergedError, match=r"the toy model's loss in epoch 2 is nan.*--lr"):
        toy_fit(VAL_ACC[:3], [1.0, float("nan"), 1.0])
    with pytest.raises(ValueError, match="at least 1"):
        toy_fit([], [])
