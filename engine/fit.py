"""The one training loop of the teacher, the head and the gate: run an epoch, evaluate on
validation, keep the state best on validation, record one history row per epoch. All three
return its :class:`Fit`: the model with its best weights, the best epoch and the history.

The callers keep what differs between them: how an epoch trains (the teacher through a
DataLoader, the head and the gate one step per image on device-resident tensors:
engine.batches.per_step_epoch) and what validation measures. They pass both as named functions
with their data bound (``functools.partial``), so each call reads as one line. Every history row has one format,
``{"epoch", "train_loss", "val_loss", "val_acc"}``, preceded by a caller's ``tag`` (the gate's
name, when several gates share one ``log.txt``); ``log.txt`` holds the rows as JSON lines and
``utils.metrics.save_curves_png`` draws them.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from utils.io import write_text
from utils.outputs import DivergedError, check_finite
from utils.tracking import track_row

log = logging.getLogger(__name__)


def by_val_acc(row: dict) -> float:
    """Highest validation accuracy; among equals the earliest epoch (teacher, head)."""
    return row["val_acc"]


def by_val_acc_then_loss(row: dict) -> tuple[float, float]:
    """Highest validation accuracy, ties to the lower validation loss, then the earliest epoch (gate)."""
    return row["val_acc"], -row["val_loss"]


@dataclass
class Fit:
    """A finished fit of the teacher, the head or a gate."""
    model: nn.Module                     # holding the best epoch's weights, in eval mode
    best_epoch: int
    history: list[dict]                  # one row per epoch, in order
    best_state: dict[str, torch.Tensor]  # a CPU copy of the best epoch's state_dict

    @property
    def best(self) -> dict:
        """The best epoch's history row."""
        return self.history[self.best_epoch - 1]

    @property
    def best_val_acc(self) -> float:
        return self.best["val_acc"]


class EpochLog:
    """``log.txt``: one JSON line per history row, the whole file rewritten atomically after each
    row (a killed run leaves whole lines). Several fits may add to one log; with ``group`` the
    lines are kept sorted by ``group(row)`` (stably), so fits trained together (an ensemble's
    members, whose rows arrive epoch by epoch) leave the log fits trained one after another do.
    While a stage runs with ``--report_to``, each row also goes to its trackers (utils.tracking)."""

    def __init__(self, path: str | Path, group: Callable[[dict], object] | None = None):
        self.path = Path(path)
        self.group = group
        self.rows: list[dict] = []

    def add(self, row: dict) -> None:
        self.rows.append(row)
        rows = self.rows if self.group is None else sorted(self.rows, key=self.group)
        write_text(self.path, "".join(json.dumps(r) + "\n" for r in rows))
        track_row(self.path, row)


class Selection:
    """One model's history and the epoch best on validation by ``score``, with that epoch's state
    (a CPU copy, taken by ``state()`` only when an epoch is better than all before it)."""

    def __init__(self, score: Callable[[dict], object] = by_val_acc):
        self.score = score
        self.history: list[dict] = []
        self.best_score = self.best_state = None
        self.best_epoch = 0

    def add(self, row: dict, state: Callable[[], dict[str, torch.Tensor]]) -> None:
        self.history.append(row)
        if self.best_score is None or self.score(row) > self.best_score:
            self.best_score, self.best_epoch, self.best_state = self.score(row), row["epoch"], state()

    def fit(self, model: nn.Module) -> Fit:
        """The finished fit: ``model`` with the best epoch's weights loaded, in eval mode."""
        model.load_state_dict(self.best_state)
        model.eval()
        return Fit(model, self.best_epoch, self.history, self.best_state)


def epoch_row(epoch: int, train_loss: float, validated: dict, tag: dict | None, name: str, flags: str) -> dict:
    """One history row; a non-finite loss stops with a DivergedError naming ``name`` and ``flags``."""
    row = {**(tag or {}), "epoch": epoch, "train_loss": train_loss,
           "val_loss": validated["val_loss"], "val_acc": validated["val_acc"]}
    check_finite(row["train_loss"] + row["val_loss"], f"the {name}'s loss in epoch {epoch}", flags)
    log.info("%s %s", name, json.dumps(row))
    return row


def fit(model: nn.Module, epochs: int, train_epoch: Callable[[int], dict], evaluate: Callable[[], dict], *,
        name: str, flags: str, score: Callable[[dict], object] = by_val_acc, tag: dict | None = None,
        epoch_log: EpochLog | None = None) -> Fit:
    """Train ``model`` for ``epochs`` epochs and load into it the state best on validation.

    ``train_epoch(epoch)`` runs one epoch in train mode and returns ``{"train_loss"}``;
    ``evaluate()`` runs in eval mode without gradients and returns ``{"val_loss", "val_acc"}``.
    ``score(row)`` ranks the epochs (the first of equals is kept). A non-finite loss stops with
    a DivergedError naming ``name`` and ``flags``; ``name`` also heads each logged row.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    selection = Selection(score)
    for epoch in range(1, epochs + 1):
        model.train()
        trained = train_epoch(epoch)
        model.eval()
        with torch.no_grad():
            validated = evaluate()
        row = epoch_row(epoch, trained["train_loss"], validated, tag, name, flags)
        if epoch_log is not None:
            epoch_log.add(row)
        selection.add(row, lambda: _cpu_copy(model))
    return selection.fit(model)


def fit_members(model: nn.Module, epochs: int, train_epoch: Callable[[int], dict],
                evaluate: Callable[[], list[dict]], member_state: Callable[[int], dict[str, torch.Tensor]], *,
                names: list[str], flags: str, score: Callable[[dict], object] = by_val_acc,
                tags: list[dict | None] | None = None,
                epoch_logs: list[EpochLog | None] | None = None) -> list[Selection | DivergedError]:
    """:func:`fit` for the E members stacked in ``model``, trained together, each selected alone.

    ``train_epoch(epoch)`` returns ``{"train_loss": [E values]}``, ``evaluate()`` E rows of
    ``{"val_loss", "val_acc"}``; each member gets its own history row per epoch (tagged
    ``tags[e]``, logged to ``epoch_logs[e]``) and keeps its own best epoch, whose state
    ``member_state(e)`` copies. A member whose loss turns non-finite stops there: its entry is the
    DivergedError ``fit`` would raise; the others train on (their weights and gradients are their
    own). Returns per member its :class:`Selection` (``.fit(lone model)`` finishes it) or error.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    selections: list[Selection | DivergedError] = [Selection(score) for _ in names]
    tags, epoch_logs = tags or [None] * len(names), epoch_logs or [None] * len(names)
    for epoch in range(1, epochs + 1):
        model.train()
        trained = train_epoch(epoch)["train_loss"]
        model.eval()
        with torch.no_grad():
            validated = evaluate()
        for index, selection in enumerate(selections):
            if isinstance(selection, DivergedError):
                continue
            try:
                row = epoch_row(epoch, trained[index], validated[index], tags[index], names[index], flags)
            except DivergedError as error:
                selections[index] = error
                continue
            if epoch_logs[index] is not None:
                epoch_logs[index].add(row)
            selection.add(row, lambda: member_state(index))  # noqa: B023 (called at once)
        if all(isinstance(selection, DivergedError) for selection in selections):
            break
    return selections


def _cpu_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().to("cpu", copy=True) for key, value in model.state_dict().items()}
