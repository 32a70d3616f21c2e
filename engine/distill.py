"""Stage 2's training: the teacher's fine-tuning and the head's training on cached tensors (the
head, its loss and its checkpoint: models/heads.py; the frozen-feature and teacher-logit caches
it trains from: engine/features.py).
"""
from __future__ import annotations

import random
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate
from tqdm import tqdm

from data.datasets import DatasetSplits, ImageDataset
from engine.batches import MemberAdam, TrainingOrder, epoch_steps, per_step_epoch
from engine.fit import EpochLog, Fit, fit, fit_members
from models.heads import HEAD_DROPOUT, DistillHead, DropoutMasks, HeadEnsemble, distillation_loss
from models.teacher import teacher_transforms
from utils.dist import (all_sum, broadcast_state, distributed_rank, gradient_group, init_distributed, shard_range,
                        sum_gradients)
from utils.metrics import save_curves_png
from utils.outputs import DivergedError


# The teacher's compute precision (--teacher_precision): fp32, the reference code's, or bf16 autocast.
TEACHER_PRECISIONS = ("fp32", "bf16")


def teacher_autocast(device: torch.device, precision: str):
    """The context the teacher's forward passes run in: none for fp32; for bf16, torch.autocast on
    the device (CUDA; on the CPU, torch's CPU autocast: the same arithmetic, usually slower)."""
    if precision not in TEACHER_PRECISIONS:
        raise ValueError(f"teacher precision {precision!r} is not one of {TEACHER_PRECISIONS}")
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch's order and augmentation draws, mixed from the run's seed and the epoch."""
    return int(np.random.SeedSequence((seed, epoch)).generate_state(1, np.uint64)[0] >> 1)


class GlobalBatches(Sampler):
    """This process's share of every global batch of the teacher's training images.

    Each epoch, every process draws the same order of the ``count`` images (seeded by ``seed`` and
    the epoch: :meth:`set_epoch`) and cuts it into global batches of ``batch_size`` (the last one
    partial); this process takes its contiguous share of each (``utils.dist.shard_range``: 10
    images over 2 processes 5+5, over 3 4/3/3; a share may be empty). Every image also gets its
    own augmentation seed, drawn with the order, so its random crop and flip do not depend on the
    process that loads it (:class:`SeededAugmentation`). Yields lists of ``(index, seed)``.
    """

    def __init__(self, count: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.count, self.batch_size, self.seed, self.rank, self.world = count, batch_size, seed, rank, world
        self.epoch = 1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def global_batches(self) -> list[list[tuple[int, int]]]:
        """This epoch's global batches of ``(index, augmentation seed)``, the same on every process."""
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        order = torch.randperm(self.count, generator=generator).tolist()
        seeds = torch.randint(0, 2 ** 62, (self.count,), generator=generator).tolist()
        rows = list(zip(order, seeds))
        return [rows[start:start + self.batch_size] for start in range(0, self.count, self.batch_size)]

    def global_sizes(self) -> list[int]:
        """The number of images of each global batch (every process's shares together)."""
        return [min(self.batch_size, self.count - start) for start in range(0, self.count, self.batch_size)]

    def __iter__(self):
        for batch in self.global_batches():
            yield [batch[i] for i in shard_range(len(batch), self.rank, self.world)]

    def __len__(self) -> int:
        return -(-self.count // self.batch_size)


class SeededAugmentation(Dataset):
    """``dataset[index]`` with its random transform drawn from the item's own seed (``(index, seed)``
    keys, :class:`GlobalBatches`): Python's ``random`` and torch's CPU generator are seeded for the
    item and restored after it, so an image's augmentation is the same whichever process or worker
    loads it, and the global generators are left as they were. A plain index loads as ``dataset``."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        if not isinstance(key, tuple):
            return self.dataset[key]
        index, seed = key
        state = random.getstate()
        random.seed(seed)
        try:
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(seed)
                return self.dataset[index]
        finally:
            random.setstate(state)


def collate_share(batch: list):
    """A share of a global batch collated; None for an empty share (a process without images this step)."""
    return default_collate(batch) if batch else None


@torch.no_grad()
def evaluate_teacher(model, loader, device, *, precision: str = "fp32", sharded: bool = False) -> dict:
    """``{"val_loss", "val_acc"}`` of the teacher over ``loader`` (mean cross-entropy, accuracy).

    ``sharded``: ``loader`` holds this process's block of the images; the sums are added across the
    processes, so every process gets the same numbers (and picks the same best epoch)."""
    model.eval()
    loss = 0.0
    correct = total = 0
    for images, labels in loader:
        with teacher_autocast(device, precision):
            logits = model(images.to(device))
        loss += F.cross_entropy(logits.float(), labels.to(device), reduction="sum").item()
        correct += (logits.argmax(-1).cpu() == labels).sum().item()
        total += len(labels)
    if sharded:
        loss, correct, total = all_sum(loss, correct, total)
    return {"val_loss": loss / max(total, 1), "val_acc": correct / max(total, 1)}


def teacher_epoch(model: torch.nn.Module, loader, optimizer: torch.optim.Optimizer,
                  device: torch.device, epochs: int, epoch: int, *, precision: str = "fp32", group=None) -> dict:
    """One epoch of the teacher's fine-tuning over ``loader``: ``{"train_loss"}``, the mean cross-entropy.

    ``loader`` yields ``(images, labels)`` batches; a DataLoader over :class:`GlobalBatches` yields
    this process's share of each global batch (None: no images here this step). Each step's loss
    is the sum of the cross-entropy over the local images divided by the *global* batch's size,
    the gradients are summed across the processes (``group``), and every process takes the same
    Adam step: the optimiser steps of one process at the global batch size, whatever the number of
    processes.
    """
    sampler = getattr(loader, "batch_sampler", None)
    sizes, world = None, 1
    if isinstance(sampler, GlobalBatches):
        sampler.set_epoch(epoch)
        sizes, world = sampler.global_sizes(), sampler.world
    device = torch.device(device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    rows = 0
    progress = tqdm(loader, desc=f"teacher epoch {epoch}/{epochs}", leave=False, disable=distributed_rank()[0] != 0)
    for step, share in enumerate(progress):
        optimizer.zero_grad(set_to_none=True)
        if share is not None:
            images, labels = share
            labels = labels.to(device, non_blocking=True)
            with teacher_autocast(device, precision):
                logits = model(images.to(device, non_blocking=True))
            loss = F.cross_entropy(logits.float(), labels, reduction="sum")
            (loss / (sizes[step] if sizes is not None else len(labels))).backward()
            loss_sum += loss.detach()
            rows += len(labels)
        if world > 1:
            sum_gradients(model.parameters(), group)
        optimizer.step()
    total, count = float(loss_sum), rows
    if world > 1:
        total, count = all_sum(total, count)
    return {"train_loss": total / count}


def teacher_loader_options(device: torch.device, num_workers: int) -> dict:
    """The teacher's DataLoader settings: pinned host memory when the batches go to a GPU, and the
    ``num_workers`` workers kept alive across epochs (not restarted each epoch)."""
    return {"num_workers": num_workers, "pin_memory": torch.device(device).type == "cuda",
            "persistent_workers": num_workers > 0}


def describe_teacher_training(world: int, batch_size: int, precision: str) -> str:
    """The log's line on how the teacher trains, e.g. ``teacher: data-parallel over 2 processes,
    global batch 10 (5+5 per step), fp32``."""
    if world == 1:
        return f"teacher: one process, batch {batch_size}, {precision}"
    shares = "+".join(str(len(shard_range(batch_size, rank, world))) for rank in range(world))
    return f"teacher: data-parallel over {world} processes, global batch {batch_size} ({shares} per step), {precision}"


def train_teacher(model: torch.nn.Module, splits: DatasetSplits, data_config: dict, device: torch.device,
                  epochs: int, lr: float, weight_decay: float, batch_size: int, num_workers: int,
                  seed: int, out_dir: Path | None, *, precision: str = "fp32") -> Fit:
    """Fine-tune the teacher with Adam; keep the epoch best on validation (engine.fit).

    Under a launcher every process trains (:func:`teacher_epoch`): each global batch of
    ``batch_size`` images is split across the processes, the gradients summed, and every process
    takes the same step, so the weights are those one process trains at ``batch_size``. Validation
    is sharded the same way (whole batches per process) and its sums added, so every process keeps
    the same epoch. The images are visited in a seeded order, a new one each epoch, the same for
    any number of processes and workers (:class:`GlobalBatches`).

    Returns the fit (``model`` holds the best weights); writes ``log.txt`` and ``curves.png`` into
    ``out_dir`` (None: nothing written, the other processes of a launcher).
    """
    device = torch.device(device)
    rank, world = init_distributed()
    teacher_autocast(device, precision)  # refuses an unknown precision before any work
    group = gradient_group(device) if world > 1 else None
    train_tf, eval_tf = teacher_transforms(data_config)
    options = teacher_loader_options(device, num_workers)
    train_loader = DataLoader(SeededAugmentation(ImageDataset(splits.data_root, splits.train, train_tf)),
                              batch_sampler=GlobalBatches(len(splits.train), batch_size, seed, rank, world),
                              collate_fn=collate_share, generator=torch.Generator().manual_seed(seed), **options)
    val_block = shard_range(len(splits.val), rank, world, unit=batch_size)
    val_loader = DataLoader(ImageDataset(splits.data_root, [splits.val[i] for i in val_block], eval_tf),
                            batch_size=batch_size, **options)
    model.to(device)
    if world > 1:
        broadcast_state(model, group)  # every process starts from rank 0's weights
    if rank == 0:
        print(describe_teacher_training(world, batch_size, precision))
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)

    train_epoch = partial(teacher_epoch, model, train_loader, optimizer, device, epochs, precision=precision,
                          group=group)
    evaluate = partial(evaluate_teacher, model, val_loader, device, precision=precision, sharded=world > 1)
    fitted = fit(model, epochs, train_epoch, evaluate, name="teacher", flags="--teacher_lr",
                 epoch_log=EpochLog(out_dir / "log.txt") if out_dir is not None else None)
    if out_dir is not None:
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
