"""Stage 2's caches of frozen passes, the contract between stage 2 and its readers: the VLM's
pooled visual features (the head's input) and the teacher's logits, per split.

The VLM's visual encoder and the teacher are frozen during distillation, so each image is
encoded once and cached under ``<output_dir>/<dataname>/distill/cache/``; the head then trains
from tensors. A cache file stores the key it was built for (model, config, weights, dtype, image
list, preprocessing) and a digest of its values, and is rebuilt, with a log line, when the key
differs or the values no longer match their digest or are not one finite row per image
(utils/cache.py, :func:`check_rows`).
Stage 2 builds the caches (:func:`cached_vlm_features`, :func:`cached_teacher_logits`); stage 3
reads them without ever building (:func:`read_vlm_features`, :func:`read_cached_teacher_logits`),
since the head must see the features it was trained on; the predictor encodes new images in the
dtype stage 2 recorded (:func:`recorded_dtype`). Under ``torchrun`` / ``accelerate launch`` the
images are sharded across processes and the results gathered in order (utils.dist.shard_map).
"""
from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import Sequence

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm
from transformers import AutoConfig

from data.datasets import PIXELS, SPLITS, DatasetSplits, ImageDataset, Sample, pre_resize_key, pre_resized
from models.teacher import load_teacher, teacher_transforms
from models.vlm import load_processor, load_vlm, pooled_image_features
from utils.cache import damage, digest, image_list_id, load_cached, load_or_build, weights_fingerprint
from utils.checkpoints import STAGE_COMMANDS, file_id
from utils.dist import distributed_rank, shard_map
from utils.errors import UserError
from utils.records import DistillRecord

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


def check_rows(splits: DatasetSplits, split: str, values) -> str | None:
    """What is wrong with a cache of one row per image of ``split`` (features or logits): not a 2-d
    floating tensor with one row per image, or non-finite numbers; None when it is sound."""
    count = len(splits.split(split))
    if not isinstance(values, torch.Tensor) or values.dim() != 2 or not values.is_floating_point():
        return "not a 2-d tensor of numbers"
    if values.shape[0] != count:
        return f"{values.shape[0]} rows for {count} images"
    if not torch.isfinite(values).all():
        return "non-finite numbers in it"
    return None


# ---------------------------------------------------------------- frozen VLM features

# --feature_dtype: the dtype the frozen VLM encodes in. fp32 is the reference code's (on every
# device); bf16 is a faster pass on CUDA, with features rounded as bf16 computes them.
FEATURE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def unrecorded_feature_dtype(device: str | torch.device) -> torch.dtype:
    """The dtype of a feature cache whose head does not record one (written before stage 2
    recorded ``feature_dtype``): stage 2 then encoded in bfloat16 on CUDA, float32 on CPU."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def vlm_feature_key(vlm_model: str, processor, config, dtype: torch.dtype, pre_resize: int | None = None) -> dict:
    size = processor.image_processor.size
    return {"vlm_model": str(vlm_model), "config": digest(config.to_dict()),
            "weights": weights_fingerprint(str(vlm_model)), "dtype": str(dtype),
            "min_pixels": size.shortest_edge, "max_pixels": size.longest_edge, "pixels": PIXELS,
            **pre_resize_key(pre_resize)}


def recorded_dtype(head: DistillRecord) -> torch.dtype | None:
    """The dtype stage 2 encoded its feature cache in, as the head's record says
    (``feature_dtype``, e.g. ``"torch.float32"``); None where not recorded."""
    name = head.feature_dtype
    return getattr(torch, name.removeprefix("torch.")) if name else None


def _feature_keys(splits: DatasetSplits, vlm_model: str, processor, dtype: torch.dtype,
                  names: Sequence[str], pre_resize: int | None) -> dict[str, dict]:
    base = vlm_feature_key(vlm_model, processor, AutoConfig.from_pretrained(vlm_model), dtype, pre_resize)
    return {split: {**base, "images": image_list_id(splits.data_root, splits.split(split))} for split in names}


def encode_block(block: range, model, processor, splits: DatasetSplits, samples: Sequence[Sample], batch_size: int,
                 num_workers: int, desc: str, pre_resize: int | None = None) -> torch.Tensor:
    """Pooled visual features of this rank's block of ``samples`` (a sharded pass: utils.dist.shard_map),
    each image first pre-resized to ``pre_resize`` px on its longer side (data.datasets.pre_resize)."""
    chunks = [pooled_image_features(model, processor, pre_resized(images, pre_resize)) for images in _image_batches(
        splits, [samples[i] for i in block], batch_size, num_workers, desc=desc)]
    return torch.cat(chunks)


class FeatureEncoder:
    """The frozen VLM encoding one split at a time (utils.cache.load_or_build's build). It loads on
    first use: once for every split the cache misses, never when they are all cached."""

    def __init__(self, splits: DatasetSplits, vlm_model: str, processor, device: torch.device, dtype: torch.dtype,
                 batch_size: int, num_workers: int, pre_resize: int | None = None):
        self.splits, self.vlm_model, self.processor = splits, vlm_model, processor
        self.device, self.dtype, self.batch_size, self.num_workers = device, dtype, batch_size, num_workers
        self.pre_resize = pre_resize
        self.model = None

    def encode_split(self, split: str) -> torch.Tensor:
        """``(N, in_dim)`` features of the split's images, sharded across ranks (each must call this)."""
        if self.model is None:
            self.model = load_vlm(self.vlm_model, self.device, dtype=self.dtype)
        samples = self.splits.split(split)
        features = shard_map(len(samples), encode_block, self.model, self.processor, self.splits, samples,
                             self.batch_size, self.num_workers, f"VLM features {split}", self.pre_resize,
                             unit=self.batch_size)
        log.info("encoded %d %s images with the frozen visual encoder -> %s", len(samples), split,
                 tuple(features.shape))
        return features


def cached_vlm_features(splits: DatasetSplits, vlm_model: str, processor_kwargs: dict | None,
                        device: str | torch.device, batch_size: int, cache_dir: str | Path,
                        num_workers: int = 0, names: Sequence[str] = SPLITS,
                        dtype: torch.dtype = torch.float32, pre_resize: int | None = None) -> dict[str, torch.Tensor]:
    """Mean-pooled visual features (after the patch merger) per split: ``{split: (N, in_dim)}``,
    encoded in ``dtype`` (float32 by default, as the reference code; see FEATURE_DTYPES), each image
    first pre-resized to ``pre_resize`` px on its longer side (0 or None: not; data.datasets.pre_resize).

    Reuses ``cache_dir/vlm_features_<split>.pt`` when built for the same model, config, weights,
    dtype, image list, pre-resize and pixel budget; otherwise loads the VLM once and encodes the missing splits.
    """
    device = torch.device(device)
    processor = load_processor(vlm_model, **(processor_kwargs or {}))
    keys = _feature_keys(splits, vlm_model, processor, dtype, names, pre_resize)
    encoder = FeatureEncoder(splits, vlm_model, processor, device, dtype, batch_size, num_workers, pre_resize)
    return load_or_build(Path(cache_dir), "vlm_features", keys, encoder.encode_split, partial(check_rows, splits))


def read_vlm_features(splits: DatasetSplits, head: DistillRecord, cache_dir: str | Path,
                      device: str | torch.device, names: Sequence[str] = SPLITS) -> dict[str, torch.Tensor]:
    """The features a head was trained on, ``{split: (N, in_dim)}``, read from stage 2's cache and
    never built: the VLM, pixel budget, pre-resize and dtype are the ones the head's record holds (a
    dtype it does not record: :func:`unrecorded_feature_dtype` of ``device``). A missing, damaged
    (unreadable, or its values not the ones it was written with) or mismatched file is a UserError
    naming stage 2's command, which rebuilds it."""
    dtype = recorded_dtype(head) or unrecorded_feature_dtype(device)
    vlm_model = head.base_model
    processor = load_processor(vlm_model, head.min_pixels, head.max_pixels)
    cache_dir = Path(cache_dir)
    keys = _feature_keys(splits, vlm_model, processor, dtype, names, head.pre_resize)  # None: an older head, none
    check = partial(check_rows, splits)
    features = load_or_build(cache_dir, "vlm_features", keys, None, check)
    missing = [split for split in names if features[split] is None]
    if missing:
        command = STAGE_COMMANDS["distill"].format(dataname=splits.name)
        files = {split: cache_dir / f"vlm_features_{split}.pt" for split in missing}
        absent = [split for split, f in files.items() if not f.is_file()]
        damaged = {f.name: problem for split, f in files.items() if (problem := damage(f, partial(check, split)))}
        if absent or damaged:
            what = ("; ".join(f"{name} {problem}" for name, problem in damaged.items()) if damaged
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
    (stage 3 reads them for its statistics and never runs the teacher); a damaged file is a
    UserError naming stage 2's command, which rebuilds it."""
    path, check = Path(cache_dir) / f"teacher_logits_{split}.pt", partial(check_rows, splits, split)
    logits = load_cached(path, _teacher_key(splits, teacher_id, split), check)
    if logits is None and (problem := damage(path, check)):
        raise UserError(f"{path.parent}: {path.name} {problem}; rerun "
                        f"`{STAGE_COMMANDS['distill'].format(dataname=splits.name)}` to rebuild it")
    return logits


def teacher_block(block: range, model, transform, splits: DatasetSplits, samples: Sequence[Sample], batch_size: int,
                  num_workers: int, device: torch.device, desc: str) -> torch.Tensor:
    """The teacher's logits for this rank's block of ``samples`` (a sharded pass: utils.dist.shard_map)."""
    batches = _image_batches(splits, [samples[i] for i in block], batch_size, num_workers, transform, desc=desc)
    return torch.cat([model(images.to(device)).float().cpu() for images, _ in batches])


class TeacherPass:
    """The trained teacher over one split at a time, with its evaluation transform
    (utils.cache.load_or_build's build); it loads on first use, like :class:`FeatureEncoder`."""

    def __init__(self, splits: DatasetSplits, teacher_path: str | Path, device: str | torch.device, batch_size: int,
                 num_workers: int):
        self.splits, self.teacher_path, self.device = splits, teacher_path, device
        self.batch_size, self.num_workers = batch_size, num_workers
        self.model = self.transform = None

    def logits_split(self, split: str) -> torch.Tensor:
        """``(N, C)`` teacher logits of the split's images, sharded across ranks (each must call this)."""
        if self.model is None:
            self.model, checkpoint = load_teacher(self.teacher_path, self.splits.class_names, self.device)
            _, self.transform = teacher_transforms(checkpoint["data_config"])
        samples = self.splits.split(split)
        return shard_map(len(samples), teacher_block, self.model, self.transform, self.splits, samples, self.batch_size,
                         self.num_workers, self.device, f"teacher logits {split}", unit=self.batch_size)


@torch.no_grad()
def cached_teacher_logits(splits: DatasetSplits, teacher_path: str | Path, device: str | torch.device,
                          batch_size: int, cache_dir: str | Path, num_workers: int = 0,
                          names: Sequence[str] = SPLITS) -> dict[str, torch.Tensor]:
    """The teacher's logits (eval transform) per split, cached by teacher file and image list."""
    teacher_id = file_id(teacher_path)
    keys = {split: _teacher_key(splits, teacher_id, split) for split in names}
    teacher = TeacherPass(splits, teacher_path, device, batch_size, num_workers)
    return load_or_build(Path(cache_dir), "teacher_logits", keys, teacher.logits_split, partial(check_rows, splits))
