"""Stage 3's training: the gate's data (:class:`GateData`, per split) and its training on them.

Both of the gate's inputs come from frozen models and are computed once per image: the VLM's
answers are cached by stage 3 (engine/vlm_answers.py), the head's logits come from stage 2's
cached visual features (engine/features.py, models.heads.head_logits). Gate epochs then run on
those small tensors, one step per image by default.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from functools import partial
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from engine.batches import MemberAdam, TrainingOrder, per_step_epoch
from engine.fit import EpochLog, Fit, by_val_acc_then_loss, fit_members
from models.gates import GateEnsemble, build_gate
from models.heads import member_cross_entropy
from utils.errors import UserError
from utils.outputs import DivergedError


@dataclass
class GateData:
    """One split's cached gate inputs."""
    vlm_pred: torch.Tensor     # (N,) long, -1 where the VLM's answer could not be parsed
    vlm_signal: torch.Tensor   # (N, C) one-hot (zeros when unparseable) or class probabilities
    head_logits: torch.Tensor  # (N, C) the frozen distillation head's logits
    labels: torch.Tensor       # (N,) long
    # (N, C) what the gate is given of the head (--head_signal): its logits or their softmax; None:
    # the logits themselves (models.gates.head_gate_inputs makes it).
    head_signal: torch.Tensor | None = None
    vlm_probs: torch.Tensor | None = None  # (N, C) the VLM's class probabilities (score mode only)

    def head_input(self) -> torch.Tensor:
        """The gate's head input: ``head_signal`` where set, else the head's logits."""
        return self.head_logits if self.head_signal is None else self.head_signal


# ---------------------------------------------------------------- training on cached tensors

def subset(data: GateData, index: torch.Tensor) -> GateData:
    return GateData(*(None if getattr(data, f.name) is None else getattr(data, f.name)[index]
                      for f in fields(GateData)))


def stratified_halves(labels: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of two halves of a split, each class divided evenly (the first half gets the odd one)."""
    generator = torch.Generator().manual_seed(seed)
    first, second = [], []
    for label in labels.unique():
        members = (labels == label).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        half = (len(members) + 1) // 2
        first.append(members[:half])
        second.append(members[half:])
    return torch.cat(first).sort().values, torch.cat(second).sort().values


def split_accuracies(data: dict) -> dict:
    """The VLM's and the head's accuracy per split: on the training images the instruction-tuned
    VLM is typically far better than on unseen ones, which a gate fitted there learns to trust."""
    return {split: {"n": len(d.labels), "vlm_accuracy": (d.vlm_pred == d.labels).float().mean().item(),
                    "head_accuracy": (d.head_logits.argmax(1) == d.labels).float().mean().item()}
            for split, d in data.items()}


def gate_training_data(data: dict, split: str, seed: int) -> tuple[GateData, GateData]:
    """``(fit, select)``, the data the gate trains on and the data its epoch is picked on: ``train``
    and ``val`` (the paper), or for ``split="val"`` two stratified, seed-fixed halves of ``val``."""
    if split == "train":
        return data["train"], data["val"]
    labels = data["val"].labels
    fit, select = stratified_halves(labels, seed) if len(labels) else (labels, labels)
    if not len(fit) or not len(select):
        raise UserError(f"--gate_train_split val: the {len(labels)} validation image(s) cannot fill two halves (one "
                        "to fit the gate, one to pick its epoch; a class needs 2 images to reach both); add "
                        "validation images or use --gate_train_split train")
    return subset(data["val"], fit), subset(data["val"], select)


@torch.no_grad()
def gate_logits(gate: nn.Module, data: GateData, batch_size: int = 4096) -> torch.Tensor:
    gate.eval()
    device = next(gate.parameters()).device
    head = data.head_input()
    parts = [gate(data.vlm_signal[i:i + batch_size].to(device), head[i:i + batch_size].to(device)).cpu()
             for i in range(0, len(data.labels), batch_size)]
    return torch.cat(parts)


def _scores(logits: torch.Tensor, data: GateData) -> dict:
    """``{"val_loss", "val_acc"}`` of a gate's logits on ``data`` (cross-entropy, accuracy)."""
    loss = F.cross_entropy(logits, data.labels).item()
    return {"val_loss": loss, "val_acc": (logits.argmax(dim=1) == data.labels).float().mean().item()}


def _evaluate(gate: nn.Module, data: GateData) -> dict:
    """``{"val_loss", "val_acc"}`` of the gate on ``data`` (cross-entropy, accuracy)."""
    return _scores(gate_logits(gate, data), data)


def _evaluate_each(ensemble: GateEnsemble, selects: Sequence[GateData]) -> list[dict]:
    """:func:`_evaluate` of each gate of ``ensemble``, alone with its current weights, on its own
    ``selects[i]``."""
    return [_scores(gate_logits(ensemble.member(index), data), data) for index, data in enumerate(selects)]


def train_gates(members: Sequence[tuple[str, int, GateData, GateData]], num_classes: int, epochs: int = 10,
                lr: float = 1e-4, weight_decay: float = 1e-4, batch_size: int = 1, device: str | torch.device = "cpu",
                epoch_logs: Sequence[EpochLog | None] | None = None,
                reshuffle: bool = False) -> list[Fit | DivergedError]:
    """Train one gate per member ``(name, seed, train, val)`` with cross-entropy and Adam, all as one
    ensemble (models.gates.GateEnsemble: one step for all, each gate with its own weights, order
    and data, engine.batches.MemberAdam); each keeps its epoch best on its ``val`` (engine.fit).

    Each gate draws what :func:`train_gate` draws alone with its seed (its initialisation, its
    order of the training rows) and computes exactly what it computes alone. The members' training
    sets must have one size (stage 3's seeds: the same split, or same-sized halves of validation).
    Returns per member, in order, its fit (``model``: the gate, best weights, eval mode) or the
    DivergedError that stopped it; ``epoch_logs[i]`` receives member i's rows (tagged with its name).
    """
    device = torch.device(device)
    if len({len(train.labels) for _, _, train, _ in members}) > 1:
        raise ValueError("the gates of an ensemble need training sets of one size")
    gates = []
    for name, seed, _, _ in members:
        torch.manual_seed(seed)
        gates.append(build_gate(name, num_classes))
    ensemble = GateEnsemble(gates).to(device)
    optimizer = MemberAdam(ensemble.parameters(), lr, weight_decay)
    trains = [train for _, _, train, _ in members]
    signal = torch.stack([train.vlm_signal for train in trains]).to(device)
    head_in = torch.stack([train.head_input() for train in trains]).to(device)
    labels = torch.stack([train.labels for train in trains]).to(device)
    orders = [TrainingOrder(len(labels[0]), torch.Generator(device=device).manual_seed(seed), reshuffle)
              for _, seed, _, _ in members]
    train_epoch = partial(per_step_epoch, ensemble, optimizer, (signal, head_in), (labels,), member_cross_entropy,
                          orders, batch_size, per_member=True)
    selects = [member[3] for member in members]  # the data each gate's epoch is picked on
    evaluate = partial(_evaluate_each, ensemble, selects)
    selections = fit_members(ensemble, epochs, train_epoch, evaluate, ensemble.member_state,
                             names=[f"{name} gate" for name, _, _, _ in members], flags="--lr",
                             score=by_val_acc_then_loss, tags=[{"gate": name} for name, _, _, _ in members],
                             epoch_logs=list(epoch_logs) if epoch_logs is not None else None)
    return [selection if isinstance(selection, DivergedError) else selection.fit(ensemble.member(i))
            for i, selection in enumerate(selections)]


def train_gate(name: str, num_classes: int, train: GateData, val: GateData, epochs: int = 10,
               lr: float = 1e-4, weight_decay: float = 1e-4, batch_size: int = 1, seed: int = 42,
               device: str | torch.device = "cpu", epoch_log: EpochLog | None = None,
               reshuffle: bool = False) -> Fit:
    """Train gate ``name`` with cross-entropy and Adam; keep the epoch best on validation (engine.fit).

    Best means highest validation accuracy, ties going to the lower validation loss. The
    initialisation and the batch order depend only on ``seed``, not on which gates ran before.
    The examples are visited in one seeded order kept for every epoch, as the reference code's
    gate loop iterates its once-shuffled training list; ``reshuffle`` draws a new order each epoch
    (engine.batches.TrainingOrder). One step per image (``batch_size`` 1) is the reference code's
    regime; the inputs sit on ``device`` and the loss is read back once per epoch, so small batches stay cheap. Each
    history row carries the gate's name, so several gates can share one ``epoch_log``. The gate is
    an ensemble of one (:func:`train_gates`): a gate trained among others equals it. Returns the
    fit; its ``model`` is the gate (best weights, eval mode); a non-finite loss raises the DivergedError.
    """
    [result] = train_gates([(name, seed, train, val)], num_classes, epochs, lr, weight_decay, batch_size, device,
                           [epoch_log], reshuffle)
    if isinstance(result, DivergedError):
        raise result
    return result


def predictions(gate: nn.Module, data: GateData) -> torch.Tensor:
    return gate_logits(gate, data).argmax(dim=1)
