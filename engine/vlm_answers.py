"""The trained VLM answering a dataset's images as a classifier (the class scorer,
``models.scorer.predict_vlm``), a whole list of images sharded across ranks, and stage 3's cache
of those answers.

Stage 1's evaluation answers the test split with the VLM it has just tuned
(:func:`predict_samples`). Stage 3 caches the answers per split under ``<gate dir>/cache/``, keyed
by everything that decides them (adapter id, answer mode, classes, image list, pre-resize, parser and its revision:
:func:`vlm_cache_key`), and loads the VLM only when a split misses (:func:`cached_vlm_predictions`). A
cache whose answers no longer match the digest written with them, or are not one answer per image
in range (:func:`check_answers`), is rebuilt with a warning naming it (utils/cache.py).
Images are decoded a chunk at a time, never a whole split at once.
"""
from __future__ import annotations

import gc
import logging
from functools import partial
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from data.datasets import PIXELS, SPLITS, DatasetSplits, open_image, pre_resize_key, pre_resized
from data.prompts import PARSER_REVISIONS
from models.scorer import VLMPredictions, predict_vlm
from models.vlm import load_trained_vlm, vlm_torch_dtype
from utils.cache import image_list_id, load_or_build
from utils.dist import is_main_process, shard_map
from utils.records import VLMRecord

log = logging.getLogger(__name__)


class VLMAnswerer:
    """The VLM answering images with ``predict_vlm``: :meth:`answer_block` is the sharded pass over
    a rank's block of samples, ``chunk`` images decoded at a time.

    Without ``model`` it loads stage 1's trained VLM from ``vlm_dir`` on first use, inside the
    sharded pass: a run whose answers are all cached never loads it, and a rank that fails to load
    it is reported like any failed rank (utils.dist.shard_map).
    """

    def __init__(self, data_root: str | Path, class_names: Sequence[str], mode: str = "score", batch_size: int = 8,
                 max_new_tokens: int = 256, parser: str = "lenient", model=None, processor=None,
                 vlm_dir: str | Path | None = None, device: str | torch.device = "cpu", quant: str | None = None,
                 chunk: int = 64, vlm_dtype: str | None = None, pre_resize: int | None = None):
        self.data_root, self.class_names, self.mode, self.parser = Path(data_root), class_names, mode, parser
        self.batch_size, self.max_new_tokens, self.chunk = batch_size, max_new_tokens, chunk
        self.model, self.processor = model, processor
        self.vlm_dir, self.device, self.quant, self.vlm_dtype = vlm_dir, device, quant, vlm_dtype
        self.pre_resize = pre_resize  # the longer side each image is shrunk to first (data.datasets.pre_resize)

    def answer_block(self, block: range, samples: Sequence, desc: str) -> VLMPredictions:
        """``predict_vlm`` over this rank's block of ``samples`` (data.datasets.Sample)."""
        if self.model is None:
            self.model, self.processor, _ = load_trained_vlm(self.vlm_dir, self.device, quant=self.quant,
                                                             dtype=vlm_torch_dtype(self.vlm_dtype))
        samples = samples[block.start:block.stop]
        chunk = max(self.batch_size, self.chunk // self.batch_size * self.batch_size)  # whole batches: see shard_map
        parts = []
        for start in tqdm(range(0, len(samples), chunk), desc=desc, unit="chunk", disable=not is_main_process()):
            images = pre_resized([open_image(self.data_root / sample.path) for sample in samples[start:start + chunk]],
                                 self.pre_resize)
            parts.append(predict_vlm(self.model, self.processor, images, self.class_names, self.mode, self.batch_size,
                                     self.max_new_tokens, self.parser))
        if not parts:  # an empty split
            return predict_vlm(self.model, self.processor, [], self.class_names, self.mode, self.batch_size,
                               self.max_new_tokens)
        return VLMPredictions(pred=torch.cat([part.pred for part in parts]),
                              probs=torch.cat([part.probs for part in parts]) if self.mode == "score" else None,
                              texts=[text for part in parts for text in part.texts] if self.mode == "generate"
                              else None)

    def release(self) -> None:
        """Free a VLM this answerer loaded: a 7B model should not sit in memory while the gate trains."""
        if self.vlm_dir is None or self.model is None:
            return
        self.model = self.processor = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def predict_samples(model, processor, data_root: str | Path, samples: Sequence, class_names: Sequence[str],
                    mode: str, batch_size: int, max_new_tokens: int, desc: str = "VLM",
                    chunk: int = 64, parser: str = "lenient", pre_resize: int | None = None) -> VLMPredictions:
    """``predict_vlm`` over ``samples`` (data.datasets.Sample), decoding ``chunk`` images at a
    time, never the whole list at once, each pre-resized to ``pre_resize`` px on its longer side
    (0 or None: not). Under torchrun every rank must call this: each answers its block of the
    images and every rank gets all the answers, in order."""
    answerer = VLMAnswerer(data_root, class_names, mode, batch_size, max_new_tokens, parser, model, processor,
                           chunk=chunk, pre_resize=pre_resize)
    return shard_map(len(samples), answerer.answer_block, samples, desc, unit=batch_size)


# ---------------------------------------------------------------- stage 3: answers cached per split

def vlm_cache_key(vlm: VLMRecord, mode: str, max_new_tokens: int, quant: str | None,
                  class_names: Sequence[str], data_root: str | Path, samples: Sequence,
                  parser: str = "lenient", vlm_dtype: str | None = None, pre_resize: int | None = None) -> dict:
    """Everything that decides the VLM's answers for these images (a changed image file changes
    it: ``image_list_id`` hashes each file's path, size and modification time)."""
    return {
        "base_model": vlm.base_model, "adapter_id": vlm.adapter_id,
        "min_pixels": vlm.min_pixels, "max_pixels": vlm.max_pixels,
        "mode": mode, "max_new_tokens": max_new_tokens if mode == "generate" else None, "quant": quant,
        "vlm_dtype": vlm_dtype,
        "class_names": list(class_names), "images": image_list_id(data_root, samples), "pixels": PIXELS,
        **pre_resize_key(pre_resize),
        # The parser's revision too: a changed reading must not reuse answers parsed the old way.
        "parser": [parser, PARSER_REVISIONS[parser]] if mode == "generate" else None,
    }


def check_answers(splits: DatasetSplits, mode: str, split: str, values) -> str | None:
    """What is wrong with a split's cached answers (``answer_split``'s dict): not one answer per
    image, a class outside ``[0, C)`` (``-1``, no class read, too in ``generate`` mode), or
    non-finite probabilities; None when they are sound."""
    count, num_classes = len(splits.split(split)), len(splits.class_names)
    if not isinstance(values, dict) or not isinstance(values.get("pred"), torch.Tensor):
        return "no answers in it"
    pred, probs, texts = values["pred"], values.get("probs"), values.get("texts")
    if pred.dim() != 1 or pred.is_floating_point() or len(pred) != count:
        return f"{tuple(pred.shape)} answers for {count} images"
    if not count:
        return None
    lowest = -1 if mode == "generate" else 0
    if not (lowest <= int(pred.min()) and int(pred.max()) < num_classes):
        return f"answers outside the classes 0..{num_classes - 1}"
    if mode == "score" and (not isinstance(probs, torch.Tensor) or tuple(probs.shape) != (count, num_classes)
                            or not torch.isfinite(probs).all()):
        return f"not {count} finite rows of {num_classes} probabilities"
    if mode == "generate" and (not isinstance(texts, list) or len(texts) != count):
        return f"not {count} answer texts"
    return None


def answer_split(answerer: VLMAnswerer, splits: DatasetSplits, split: str) -> dict:
    """One split's answers as the cache stores them (utils.cache.load_or_build's build)."""
    samples = splits.split(split)
    log.info("predicting %d %s images with the VLM (%s)", len(samples), split, answerer.mode)
    # Under torchrun each rank answers its block; the cache is written once, complete.
    answers = shard_map(len(samples), answerer.answer_block, samples, f"VLM {answerer.mode} ({split})",
                        unit=answerer.batch_size)
    return {"pred": answers.pred, "probs": answers.probs, "texts": answers.texts}


def cached_vlm_predictions(splits: DatasetSplits, vlm: VLMRecord, cache_dir: str | Path, vlm_dir: str | Path,
                           device: str | torch.device, mode: str = "score", batch_size: int = 8,
                           max_new_tokens: int = 256, quant: str | None = None, split_names: Sequence[str] = SPLITS,
                           parser: str = "lenient", vlm_dtype: str | None = None,
                           pre_resize: int | None = None) -> dict:
    """``{split: VLMPredictions}``, read from ``cache_dir/vlm_<mode>_<split>.pt`` or predicted and
    stored there.

    Stage 1's trained VLM (``vlm_dir``, loaded on ``device`` with ``quant``, its other weights in
    ``vlm_dtype``: models.vlm.VLM_DTYPES) is loaded only on a cache miss, so a rerun never loads it.
    Each image is first pre-resized to ``pre_resize`` px on its longer side (0 or None: not). Under torchrun every rank must call this: the images
    of a missing split are sharded across the ranks and the answers gathered on each, in order.
    """
    keys = {}
    for split in split_names:
        log.info("VLM answers (%s) for %s", mode, split)
        keys[split] = vlm_cache_key(vlm, mode, max_new_tokens, quant, splits.class_names, splits.data_root,
                                    splits.split(split), parser, vlm_dtype, pre_resize)
    answerer = VLMAnswerer(splits.data_root, splits.class_names, mode, batch_size, max_new_tokens, parser,
                           vlm_dir=vlm_dir, device=device, quant=quant, vlm_dtype=vlm_dtype, pre_resize=pre_resize)
    values = load_or_build(Path(cache_dir), f"vlm_{mode}", keys, partial(answer_split, answerer, splits),
                           partial(check_answers, splits, mode))
    answerer.release()
    return {split: VLMPredictions(**values[split]) for split in split_names}
