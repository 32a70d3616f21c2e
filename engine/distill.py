"""Stage 2 library: teacher fine-tuning, the frozen-feature and teacher-logit caches and head
training (the head, its loss and its checkpoint: models/heads.py).

The VLM's visual encoder and the teacher are frozen during distillation, so each image is
encoded once and cached under ``<output_dir>/<dataname>/distill/cache/``; the head then trains
from tensors. A cache file stores the key it was built for (model, config, weights, image list,
preprocessing) and is rebuilt, with a log line, when the key differs (utils/cache.py); stage 3
reads the features without ever rebuilding them, since the head must see the ones it was trained
on. Under ``torchrun`` / ``accelerate launch`` the images are sharded across processes and the
results gathered in order (utils.dist.shard_map).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm
from transformers import AutoConfig

from data.datasets import PIXELS, SPLITS, DatasetSplits, ImageDataset, Sample
from engine.batches import per_step_adam, shuffled_batches
from engine.fit import EpochLog, fit
from models.heads import DistillHead, distillation_loss
from models.teacher import load_teacher, teacher_transforms
from models.vlm import load_processor, load_vlm, pooled_image_features
from utils.cache import digest, image_list_id, load_cached, load_or_build, readable, weights_fingerprint
from utils.checkpoints import STAGE_COMMANDS, file_id
from utils.dist import distributed_rank, shard_map
from utils.errors import UserError
from utils.metrics import save_curves_png

log = logging.getLogger(__name__)


def _as_list(batch):
    return [image for image, _ in batch]


def _image_batches(splits: DatasetSplits, samples: Sequence[Sample], batch_size: int, num_workers: int,
                   transform=None, desc: str = ""):
    """Batches of PIL images (no ``transform``) or of tensors, with a progress bar on rank 0."""
    dataset = ImageDataset(splits.data_root, samples, transform)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                        collate_fn=None if transform else _as_list)
    return tqdm(loader, desc=desc, disable=distributed_rank()[0] != 0, leave=False)


# ---------------------------------------------------------------- frozen VLM features

def feature_dtype(device: str | torch.device) -> torch.dtype:
    """The dtype the frozen VLM encodes in: bfloat16 on CUDA (as trained), float32 on CPU."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def vlm_feature_key(vlm_model: str, processor, config, dtype: torch.dtype) -> dict:
    size = processor.image_processor.size
    return {"vlm_model": str(vlm_model), "config": digest(config.to_dict()),
            "weights": weights_fingerprint(str(vlm_model)), "dtype": str(dtype),
            "min_pixels": size.shortest_edge, "max_pixels": size.longest_edge, "pixels": PIXELS}


def cached_vlm_features(splits: DatasetSplits, vlm_model: str, processor_kwargs: dict | None,
                        device: str | torch.device, batch_size: int, cache_dir: str | Path,
                        num_workers: int = 0, names: Sequence[str] = SPLITS, dtype: str | None = None,
                        build: bool = True) -> dict[str, torch.Tensor]:
    """Mean-pooled visual features (after the patch merger) per split: ``{split: (N, in_dim)}``.

    Reuses ``cache_dir/vlm_features_<split>.pt`` when built for the same model, config, weights,
    dtype (``dtype`` e.g. ``"torch.bfloat16"``; default :func:`feature_dtype` of ``device``),
    image list and pixel budget; otherwise loads the VLM once and encodes the missing splits.
    ``build=False`` (stage 3: the head must see the features it was trained on) turns a miss
    into a UserError naming stage 2's command instead.
    """
    device = torch.device(device)
    dtype = getattr(torch, dtype.removeprefix("torch.")) if dtype else feature_dtype(device)
    processor = load_processor(vlm_model, **(processor_kwargs or {}))
    base = vlm_feature_key(vlm_model, processor, AutoConfig.from_pretrained(vlm_model), dtype)
    keys = {split: {**base, "images": image_list_id(splits.data_root, splits.split(split))} for split in names}

    def encode_splits(missing: list[str]) -> dict[str, torch.Tensor]:
        model = load_vlm(vlm_model, device, dtype=dtype)
        out = {}
        for split in missing:
            samples = splits.split(split)

            def encode(indices: range) -> torch.Tensor:
                chunks = [pooled_image_features(model, processor, images) for images in _image_batches(
                    splits, [samples[i] for i in indices], batch_size, num_workers, desc=f"VLM features {split}")]
                return torch.cat(chunks)

            out[split] = shard_map(len(samples), encode, unit=batch_size)
            log.info("encoded %d %s images with the frozen visual encoder -> %s", len(samples), split,
                     tuple(out[split].shape))
        return out

    cache_dir = Path(cache_dir)
    features = load_or_build(cache_dir, "vlm_features", keys, encode_splits if build else None)
    missing = [split for split in names if features[split] is None]
    if missing:
        command = STAGE_COMMANDS["distill"].format(dataname=splits.name)
        files = [cache_dir / f"vlm_features_{split}.pt" for split in missing]
        absent = [split for split, f in zip(missing, files) if not f.is_file()]
        damaged = [f.name for f in files if f.is_file() and not readable(f)]
        if absent or damaged:
            what = (f"{', '.join(damaged)} cannot be read (damaged)" if damaged
                    else f"the cached {'/'.join(absent)} features are missing")
            raise UserError(f"{cache_dir}: {what}; rerun `{command}` to rebuild the feature cache")
        raise UserError(f"{cache_dir}: the cached {'/'.join(missing)} features do not match these images, the "
                        f"VLM or the pixel budget the head was trained with; rerun `{command}`")
    return features


# ---------------------------------------------------------------- teacher

def _teacher_key(splits: DatasetSplits, teacher_id: str, split: str) -> dict:
    return {"teacher_id": teacher_id, "images": image_list_id(splits.data_root, splits.split(split)),
            "pixels": PIXELS}


def read_cached_teacher_logits(splits: DatasetSplits, teacher_id: str, cache_dir: str | Path,
                               split: str = "test") -> torch.Tensor | None:
    """Stage 2's cached teacher logits of one split, or None when the cache holds no matching ones
    (stage 3 reads them for its statistics and never runs the teacher)."""
    return load_cached(Path(cache_dir) / f"teacher_logits_{split}.pt", _teacher_key(splits, teacher_id, split))


@torch.no_grad()
def cached_teacher_logits(splits: DatasetSplits, teacher_path: str | Path, device: str | torch.device,
                          batch_size: int, cache_dir: str | Path, num_workers: int = 0,
                          names: Sequence[str] = SPLITS) -> dict[str, torch.Tensor]:
    """The teacher's logits (eval transform) per split, cached by teacher file and image list."""
    teacher_id = file_id(teacher_path)
    keys = {split: _teacher_key(splits, teacher_id, split) for split in names}

    def build(missing: list[str]) -> dict[str, torch.Tensor]:
        model, checkpoint = load_teacher(teacher_path, splits.class_names, device)
        _, eval_transform = teacher_transforms(checkpoint["data_config"])
        out = {}
        for split in missing:
            samples = splits.split(split)

            def run(indices: range) -> torch.Tensor:
                batches = _image_batches(splits, [samples[i] for i in indices], batch_size, num_workers,
                                         eval_transform, desc=f"teacher logits {split}")
                return torch.cat([model(images.to(device)).float().cpu() for images, _ in batches])

            out[split] = shard_map(len(samples), run, unit=batch_size)
        return out

    return load_or_build(Path(cache_dir), "teacher_logits", keys, build)


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


def train_teacher(model: torch.nn.Module, splits: DatasetSplits, data_config: dict, device: torch.device,
                  epochs: int, lr: float, weight_decay: float, batch_size: int, num_workers: int,
                  seed: int, out_dir: Path) -> dict:
    """Fine-tune the teacher with Adam; keep the epoch best on validation (engine.fit).

    Returns ``{state_dict, epoch, best_val_acc, history}``; writes ``log.txt`` and ``curves.png``.
    """
    train_tf, eval_tf = teacher_transforms(data_config)
    generator = torch.Generator().manual_seed(seed)
    train_loader = DataLoader(ImageDataset(splits.data_root, splits.train, train_tf), batch_size=batch_size,
                              shuffle=True, num_workers=num_workers, generator=generator)
    val_loader = DataLoader(ImageDataset(splits.data_root, splits.val, eval_tf), batch_size=batch_size,
                            num_workers=num_workers)
    model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)

    def train_epoch(epoch: int) -> dict:
        total = count = 0.0
        for images, labels in tqdm(train_loader, desc=f"teacher epoch {epoch}/{epochs}", leave=False):
            loss = F.cross_entropy(model(images.to(device)), labels.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(labels)
            count += len(labels)
        return {"train_loss": total / count}

    fitted = fit(model, epochs, train_epoch, lambda: evaluate_teacher(model, val_loader, device),
                 name="teacher", flags="--teacher_lr", epoch_log=EpochLog(out_dir / "log.txt"))
    save_curves_png(fitted.history, out_dir / "curves.png", "stage 2: teacher fine-tuning")
    return {"state_dict": fitted.best_state, "epoch": fitted.best_epoch, "best_val_acc": fitted.best["val_acc"],
            "history": fitted.history}


# ---------------------------------------------------------------- head

def train_head(features: dict[str, torch.Tensor], teacher_logits: dict[str, torch.Tensor],
               labels: dict[str, torch.Tensor], in_dim: int, num_classes: int, *, depth: int = 1,
               dropout: float = 0.1, epochs: int = 5, lr: float = 1e-5, weight_decay: float = 1e-4,
               batch_size: int = 1, alpha: float = 0.5, temperature: float = 2.0, standardize: bool = False,
               seed: int = 0, device: str | torch.device = "cpu",
               log_path: Path | None = None) -> tuple[DistillHead, dict]:
    """Train the head on cached tensors with the distillation loss; keep the epoch best on validation
    (engine.fit).

    The reference code takes one optimiser step per image (``batch_size`` 1, the default). So
    that this stays cheap, the cached tensors move to ``device`` once, the batch order is drawn
    there, and the epoch's loss is summed there and read back once per epoch (no DataLoader, no
    host synchronisation per step).
    Returns the head (best weights, eval mode, CPU) and ``{epoch, best_val_acc, history}``.
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
    generator = torch.Generator(device=device).manual_seed(seed)

    def train_epoch(epoch: int) -> dict:
        total = torch.zeros((), device=device)
        for index in shuffled_batches(len(y_all), batch_size, generator):
            loss = distillation_loss(head(x_all[index]), t_all[index], y_all[index], alpha, temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach() * len(index)
        return {"train_loss": total.item() / max(len(y_all), 1)}  # the epoch's one host sync

    def evaluate() -> dict:
        val_logits = head(x_val).float().cpu()
        val_loss = distillation_loss(val_logits, t_val, y_val, alpha, temperature)
        return {"val_loss": val_loss.item(), "val_acc": (val_logits.argmax(-1) == y_val).float().mean().item()}

    fitted = fit(head, epochs, train_epoch, evaluate, name="head", flags="--lr (or --temperature)",
                 epoch_log=EpochLog(log_path) if log_path is not None else None)
    return head.cpu().eval(), {"epoch": fitted.best_epoch, "best_val_acc": fitted.best["val_acc"],
                               "history": fitted.history}

