"""Stage 2's training: the teacher's fine-tuning and the head's training on cached tensors (the
head, its loss and its checkpoint: models/heads.py; the frozen-feature and teacher-logit caches
it trains from: engine/features.py).
"""
from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from data.datasets import DatasetSplits, ImageDataset
from engine.batches import TrainingOrder, per_step_adam, per_step_epoch
from engine.fit import EpochLog, Fit, fit
from models.heads import HEAD_DROPOUT, DistillHead, distillation_loss
from models.teacher import teacher_transforms
from utils.metrics import save_curves_png


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

def evaluate_head(head: DistillHead, features: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                  alpha: float, temperature: float) -> dict:
    """``{"val_loss", "val_acc"}`` of the head on validation tensors (the distillation loss, accuracy)."""
    val_logits = head(features).float().cpu()
    val_loss = distillation_loss(val_logits, teacher_logits, labels, alpha, temperature)
    return {"val_loss": val_loss.item(), "val_acc": (val_logits.argmax(-1) == labels).float().mean().item()}


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
    host synchronisation per step: engine.batches.per_step_epoch). The images are visited in one
    seeded order kept for every epoch, as the reference code's; ``reshuffle`` draws a new order
    each epoch (engine.batches.TrainingOrder).
    Returns the fit; its ``model`` is the head (best weights, eval mode, CPU).
    """
    torch.manual_seed(seed)  # same seed, same cached tensors -> the same head, teacher trained or not
    device = torch.device(device)
    head = DistillHead(in_dim, num_classes, depth, dropout)
    if standardize:
        head.set_standardization(features["train"])
    head.to(device)
    optimizer = per_step_adam(head.parameters(), lr, weight_decay)
    x_all, t_all, y_all = (values["train"].to(device) for values in (features, teacher_logits, labels))
    x_val, t_val, y_val = (values["val"] for values in (features, teacher_logits, labels))  # picks the epoch
    x_val = x_val.to(device)  # moved once, like the training tensors
    order = TrainingOrder(len(x_all), torch.Generator(device=device).manual_seed(seed), reshuffle)
    loss = partial(distillation_loss, alpha=alpha, temperature=temperature)
    train_epoch = partial(per_step_epoch, head, optimizer, (x_all,), (t_all, y_all), loss, order, batch_size)
    evaluate = partial(evaluate_head, head, x_val, t_val, y_val, alpha, temperature)
    fitted = fit(head, epochs, train_epoch, evaluate, name="head", flags="--lr (or --temperature)",
                 epoch_log=EpochLog(log_path) if log_path is not None else None)
    head.cpu().eval()
    return fitted

