"""Stage 2's training: the teacher's fine-tuning and the head's training on cached tensors (the
head, its loss and its checkpoint: models/heads.py; the frozen-feature and teacher-logit caches
it trains from: engine/features.py).
"""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from data.datasets import DatasetSplits, ImageDataset
from engine.batches import MemberAdam, TrainingOrder, epoch_steps, per_step_epoch
from engine.fit import EpochLog, Fit, fit, fit_members
from models.heads import HEAD_DROPOUT, DistillHead, DropoutMasks, HeadEnsemble, distillation_loss
from models.teacher import teacher_transforms
from utils.metrics import save_curves_png
from utils.outputs import DivergedError


@torch.no_grad()
def evaluate_teacher(model, loader, device) -> dict:
    """``{"val_loss", "val_acc"}`` of the teacher over ``loader`` (mean cross-entropy, accuracy)."""
    model.eval()
    loss = 0.0
    correct = total = 0
    for images, labels in loader:
        logits = model(images.to(device))
        loss += F.cross_entropy(logits.float(), labels.to(device), reduction="sum").item()
        correct += (logits.argmax(-1).cpu() == labels).sum().item()
        total += len(labels)
    return {"val_loss": loss / max(total, 1), "val_acc": correct / max(total, 1)}


def teacher_epoch(model: torch.nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
                  device: torch.device, epochs: int, epoch: int) -> dict:
    """One epoch of the teacher's fine-tuning over ``loader``: ``{"train_loss"}``, the mean cross-entropy."""
    total = count = 0.0
    for images, labels in tqdm(loader, desc=f"teacher epoch {epoch}/{epochs}", leave=False):
        loss = F.cross_entropy(model(images.to(device)), labels.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.item() * len(labels)
        count += len(labels)
    return {"train_loss": total / count}


def train_teacher(model: torch.nn.Module, splits: DatasetSplits, data_config: dict, device: torch.device,
                  epochs: int, lr: float, weight_decay: float, batch_size: int, num_workers: int,
                  seed: int, out_dir: Path) -> Fit:
    """Fine-tune the teacher with Adam; keep the epoch best on validation (engine.fit).

    Returns the fit (``model`` holds the best weights); writes ``log.txt`` and ``curves.png``.
    """
    train_tf, eval_tf = teacher_transforms(data_config)
    generator = torch.Generator().manual_seed(seed)
    train_loader = DataLoader(ImageDataset(splits.data_root, splits.train, train_tf), batch_size=batch_size,
                              shuffle=True, num_workers=num_workers, generator=generator)
    val_loader = DataLoader(ImageDataset(splits.data_root, splits.val, eval_tf), batch_size=batch_size,
                            num_workers=num_workers)
    model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)

    train_epoch = partial(teacher_epoch, model, train_loader, optimizer, device, epochs)
    evaluate = partial(evaluate_teacher, model, val_loader, device)
    fitted = fit(model, epochs, train_epoch, evaluate, name="teacher", flags="--teacher_lr",
                 epoch_log=EpochLog(out_dir / "log.txt"))
    save_curves_png(fitted.history, out_dir / "curves.png", "stage 2: teacher fine-tuning")
    return fitted


# ---------------------------------------------------------------- head

def evaluate_head(head: Callable[[torch.Tensor], torch.Tensor], features: torch.Tensor, teacher_logits: torch.Tensor,
                  labels: torch.Tensor, alpha: float, temperature: float) -> dict:
    """``{"val_loss", "val_acc"}`` of the head (or a member's forward) on validation tensors (the
    distillation loss, accuracy)."""
    val_logits = head(features).float().cpu()
    val_loss = distillation_loss(val_logits, teacher_logits, labels, alpha, temperature)
    return {"val_loss": val_loss.item(), "val_acc": (val_logits.argmax(-1) == labels).float().mean().item()}


def train_heads(features: dict[str, torch.Tensor], teacher_logits: dict[str, torch.Tensor],
                labels: dict[str, torch.Tensor], in_dim: int, num_classes: int, settings: Sequence[dict], *,
                dropout: float = HEAD_DROPOUT, epochs: int = 5, lr: float = 1e-5, weight_decay: float = 1e-4,
                batch_size: int = 1, temperature: float = 2.0, standardize: bool = False,
                device: str | torch.device = "cpu", log_paths: Sequence[Path | None] | None = None,
                names: Sequence[str] | None = None, reshuffle: bool = False) -> list[Fit | DivergedError]:
    """Train one head per setting (``{"depth", "alpha", "seed"}``) on cached tensors with the
    distillation loss, all as one ensemble (models.heads.HeadEnsemble); each keeps the epoch best
    on validation (engine.fit.fit_members).

    One optimiser step (``batch_size`` rows per head, one step per image by default, as the
    reference code) runs every head's forward, backward and Adam update at once. Each head draws
    what a head trained alone with its seed draws: its initialisation (``torch.manual_seed(seed)``
    before building it), its dropout masks (the global generator's continuation, models.heads.
    DropoutMasks) and its order of the training rows (engine.batches.TrainingOrder: one seeded
    order kept every epoch, or a new one each epoch with ``reshuffle``), and takes its own alpha.
    Every operation rounds for each head as for the head alone, so each ends bit for bit as the
    head trained alone; a single setting is an ensemble of one and computes exactly what a lone
    ``DistillHead`` does. The cached tensors move
    to ``device`` once, the losses are summed there and read back once per epoch.
    Returns per setting, in order, its fit (``model``: that head alone, best weights, eval mode,
    CPU) or the DivergedError that stopped it (``names[i]``, default "head", names it; ``log_paths[i]``
    is its log.txt).
    """
    device = torch.device(device)
    count = len(settings)
    names = list(names) if names is not None else ["head"] * count
    log_paths = list(log_paths) if log_paths is not None else [None] * count
    # Deepest first (HeadEnsemble's layout); `ranked[j]` is the setting of member j.
    ranked = sorted(range(count), key=lambda i: -settings[i]["depth"])
    heads, generators = [], []
    for i in ranked:
        torch.manual_seed(settings[i]["seed"])  # same seed, same cached tensors -> the same head, teacher trained or not
        heads.append(DistillHead(in_dim, num_classes, settings[i]["depth"], dropout))
        generators.append(torch.Generator().set_state(torch.get_rng_state()))  # its dropout masks from here on
        if standardize:
            heads[-1].set_standardization(features["train"])
    ensemble = HeadEnsemble(heads).to(device)
    heads.clear()  # their weights are copied into the stacks (27 first layers at 3,584-d: 0.4 GB)
    optimizer = MemberAdam(ensemble.parameters(), lr, weight_decay)
    x_all, t_all, y_all = (values["train"].to(device) for values in (features, teacher_logits, labels))
    x_val, t_val, y_val = (values["val"] for values in (features, teacher_logits, labels))  # picks the epoch
    x_val = x_val.to(device)  # moved once, like the training tensors
    orders = [TrainingOrder(len(x_all), torch.Generator(device=device).manual_seed(settings[i]["seed"]), reshuffle)
              for i in ranked]
    masks = DropoutMasks(ensemble, generators, epoch_steps(len(x_all), batch_size), device)
    loss = partial(distillation_loss, alpha=[settings[i]["alpha"] for i in ranked], temperature=temperature)
    train_epoch = partial(per_step_epoch, ensemble, optimizer, (x_all,), (t_all, y_all), loss, orders, batch_size,
                          extras=lambda: ((step_masks,) for step_masks in masks.epoch()))

    def evaluate() -> list[dict]:
        return [evaluate_head(partial(ensemble.forward_member, j), x_val, t_val, y_val, settings[i]["alpha"],
                              temperature) for j, i in enumerate(ranked)]

    selections = fit_members(ensemble, epochs, train_epoch, evaluate, ensemble.member_state,
                             names=[names[i] for i in ranked], flags="--lr (or --temperature)",
                             epoch_logs=[EpochLog(log_paths[i]) if log_paths[i] is not None else None for i in ranked])
    results: list[Fit | DivergedError] = [None] * count  # type: ignore[list-item]
    for j, i in enumerate(ranked):
        selection = selections[j]
        results[i] = selection if isinstance(selection, DivergedError) else selection.fit(ensemble.member(j))
    return results


def train_head(features: dict[str, torch.Tensor], teacher_logits: dict[str, torch.Tensor],
               labels: dict[str, torch.Tensor], in_dim: int, num_classes: int, *, depth: int = 1,
               dropout: float = HEAD_DROPOUT, epochs: int = 5, lr: float = 1e-5, weight_decay: float = 1e-4,
               batch_size: int = 1, alpha: float = 0.5, temperature: float = 2.0, standardize: bool = False,
               seed: int = 0, device: str | torch.device = "cpu", log_path: Path | None = None,
               reshuffle: bool = False) -> Fit:
    """Train the head on cached tensors with the distillation loss; keep the epoch best on validation
    (engine.fit).

    The reference code takes one optimiser step per image (``batch_size`` 1, the default). So
    that this stays cheap, the cached tensors move to ``device`` once, the batch order is drawn
    there, and the epoch's loss is summed there and read back once per epoch (no DataLoader, no
    host synchronisation per step: engine.batches). The images are visited in one
    seeded order kept for every epoch, as the reference code's; ``reshuffle`` draws a new order
    each epoch (engine.batches.TrainingOrder). The head is an ensemble of one (:func:`train_heads`):
    a head of a sweep equals the head trained here with its setting.
    Returns the fit; its ``model`` is the head (best weights, eval mode, CPU); a non-finite loss
    raises the DivergedError.
    """
    [result] = train_heads(features, teacher_logits, labels, in_dim, num_classes,
                           [{"depth": depth, "alpha": alpha, "seed": seed}], dropout=dropout, epochs=epochs, lr=lr,
                           weight_decay=weight_decay, batch_size=batch_size, temperature=temperature,
                           standardize=standardize, device=device, log_paths=[log_path], reshuffle=reshuffle)
    if isinstance(result, DivergedError):
        raise result
    return result
