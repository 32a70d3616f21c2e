"""Evaluating the instruction-tuned VLM as a classifier: the class scorer over a split
(engine/vlm_answers.py: decoded a chunk at a time and sharded across ranks), and the evaluation
files it writes (``metrics.json``, the confusion PNG, ``predictions.jsonl``).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch

from engine.vlm_answers import predict_samples
from utils.dist import is_main_process
from utils.errors import UserError
from utils.io import write_text
from utils.metrics import NONE, classification_metrics, write_metrics
from utils.stats import bootstrap_ci, correctness


def evaluate_vlm(model, processor, data_root: str | Path, samples, class_names: Sequence[str],
                 out_dir: str | Path, mode: str = "score", batch_size: int = 8,
                 max_new_tokens: int = 256, title: str = "", parser: str = "lenient",
                 pre_resize: int | None = None, record: dict | None = None) -> dict:
    """Predict ``samples`` (data.datasets.Sample), write metrics.json, confusion PNG and
    predictions.jsonl into ``out_dir``; return the metrics. Each image is first pre-resized to
    ``pre_resize`` px on its longer side (0 or None: not; data.datasets.pre_resize); ``record``'s keys
    are added to metrics.json (a zero-shot evaluation's ``zero_shot`` and ``base_model``). Under torchrun
    the images are sharded across the ranks (each must call this) and only rank 0 writes."""
    # Under torchrun every rank predicts its block of the images; rank 0 writes the files.
    result = predict_samples(model, processor, data_root, samples, class_names, mode, batch_size, max_new_tokens,
                             desc=f"eval ({mode})", parser=parser, pre_resize=pre_resize)
    if result.probs is not None and not torch.isfinite(result.probs).all():  # never written as NaN
        first = int((~torch.isfinite(result.probs)).any(-1).nonzero()[0])
        raise UserError(f"{samples[first].path}: the VLM's class probabilities are not finite (NaN or infinity); "
                        "the adapter diverged or is damaged: retrain stage 1 (train_vlm.py)")
    labels = [sample.label for sample in samples]
    metrics = classification_metrics(labels, result.pred.tolist(), class_names)
    metrics["mode"] = mode
    metrics["pre_resize"] = pre_resize or 0  # how the images were prepared (data.datasets.pre_resize)
    if mode == "generate":  # how the decoded answers were read; "unparseable" counts the misses
        metrics["parser"] = parser
    metrics["ci95"] = list(bootstrap_ci(correctness(labels, result.pred.tolist())))
    metrics.update(record or {})
    rows = []
    for i, sample in enumerate(samples):
        pred = int(result.pred[i])
        row = {"image": sample.path, "label": class_names[sample.label],
               "pred": None if pred == NONE else class_names[pred]}
        if result.probs is not None:
            row["probs"] = [round(float(p), 6) for p in result.probs[i]]
        if result.texts is not None:
            row["text"] = result.texts[i]
        rows.append(json.dumps(row, ensure_ascii=False))
    out_dir = Path(out_dir)
    if is_main_process():
        write_text(out_dir / "predictions.jsonl", "\n".join(rows) + "\n")
        write_metrics(out_dir, metrics, title or f"VLM ({mode})")
    return metrics
