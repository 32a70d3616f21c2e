"""Stage folders describe themselves: ``<stage_dir>/meta.json`` says what a later stage needs.

Every stage writes ``meta.json`` (class names in order, the base VLM id, the ids of what it was
built on); the next stage reads it through :func:`read_meta`, which names the command to run
when the folder is missing, and :func:`check_compatible`, which refuses a mismatch.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

from utils.errors import UserError
from utils.io import read_json, write_json

META_FILE = "meta.json"

# How to produce each stage's folder; quoted in errors.
STAGE_COMMANDS = {
    "instructions": "python generate_instructions.py --dataname {dataname}",
    "vlm": "python train_vlm.py --dataname {dataname}",
    "teacher": "python train_distillation.py --dataname {dataname}",
    "distill": "python train_distillation.py --dataname {dataname}",
    "gate": "python train_gate.py --dataname {dataname}",
}


def write_meta(folder: str | Path, stage: str, class_names: Sequence[str], **fields) -> Path:
    return write_json(Path(folder) / META_FILE,
                      {"stage": stage, "class_names": list(class_names), **fields})


def read_meta(folder: str | Path, stage: str, dataname: str = "<dataname>") -> dict:
    """The ``meta.json`` of a finished stage; a missing one is a UserError naming the command."""
    path = Path(folder) / META_FILE
    if not path.is_file():
        command = STAGE_COMMANDS[stage].format(dataname=dataname)
        raise UserError(f"{folder}: no finished {stage} stage output ({META_FILE} missing); "
                        f"run `{command}` first")
    meta = read_json(path)
    if meta.get("stage") != stage:
        raise UserError(f"{path}: written by stage {meta.get('stage')!r}, expected {stage!r}")
    return meta


def check_compatible(meta: dict, folder: str | Path, class_names: Sequence[str] | None = None,
                     base_model: str | None = None) -> None:
    """Refuse a stage output trained for other classes or on another base VLM."""
    if class_names is not None and list(meta["class_names"]) != list(class_names):
        raise UserError(f"{folder}: trained for classes {meta['class_names']}, but this run has "
                        f"{list(class_names)}; retrain that stage for this dataset")
    if base_model is not None and meta.get("base_model") not in (None, base_model):
        raise UserError(f"{folder}: built on VLM {meta['base_model']!r}, but --vlm_model is "
                        f"{base_model!r}; pass the same --vlm_model or retrain that stage")


def file_id(*paths: str | Path) -> str:
    """A short content hash identifying trained weights (12 hex digits)."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:12]
