"""Stage 3's training: the gate's data (:class:`GateData`, per split) and its training on them.

Both of the gate's inputs come from frozen models and are computed once per image: the VLM's
answers are cached by stage 3 (engine/vlm_answers.py), the head's logits come from stage 2's
cached visual features (engine/features.py, models.heads.head_logits). Gate epochs then run on
those small tensors, one step per image by default.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from engine.batches import TrainingOrder, per_step_adam, per_step_epoch
from engine.fit import EpochLog, Fit, by_val_acc_then_loss, fit
from models.gates import build_gate
from utils.errors import UserError


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


def _evaluate(gate: nn.Module, data: GateData) -> dict:
    """``{"val_loss", "val_acc"}`` of the gate on ``data`` (cross-entropy, accuracy)."""
    logits = gate_logits(gate, data)
    loss = F.cross_entropy(logits, data.labels).item()
    return {"val_loss": loss, "val_acc": (logits.argmax(dim=1) == data.labels).float().mean().item()}


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
    history row carries the gate's name, so several gates can share one ``epoch_log``. Returns the
    fit; its ``model`` is the gate (best weights, eval mode).
    """
    torch.manual_seed(seed)
    device = torch.device(device)
    gate = build_gate(name, num_classes).to(device)
    optimizer = per_step_adam(gate.parameters(), lr, weight_decay)
    signal, head_in, labels = train.vlm_signal.to(device), train.head_input().to(device), train.labels.to(device)
    order = TrainingOrder(len(labels), torch.Generator(device=device).manual_seed(seed), reshuffle)
    train_epoch = partial(per_step_epoch, gate, optimizer, (signal, head_in), (labels,), F.cross_entropy, order,
                          batch_size)
    evaluate = partial(_evaluate, gate, val)
    return fit(gate, epochs, train_epoch, evaluate, name=f"{name} gate", flags="--lr", score=by_val_acc_then_loss,
               tag={"gate": name}, epoch_log=epoch_log)


def predictions(gate: nn.Module, data: GateData) -> torch.Tensor:
    return gate_logits(gate, data).argmax(dim=1)
