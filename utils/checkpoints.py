"""One checkpoint schema: every saved artefact says what it is and in which format.

Every stage writes ``meta.json`` (class names in order, the base VLM, the ids of what it was
built on) through its typed record in ``utils/records.py``; the next stage reads it back there,
through :func:`read_meta`, which names the command to run when the folder is missing. The weights
files (``teacher.pt``, ``head.pt``, ``gate.pt``) are written and read by a pair of functions
beside their module (``models/teacher.py``, ``models/heads.py``, ``models/gates.py``).

Each record (a ``meta.json`` or a ``.pt`` dict) is stamped by :func:`stamp` with
``format_version`` and ``kind``; :func:`read_meta` and :func:`read_checkpoint` read them back, and
:func:`check_format` refuses, naming the stage to rerun, a
record this code cannot read (no ``format_version``, an unknown one, or another kind). The key
names are listed in docs/ARCHITECTURE.md ("Checkpoints").

The weights files are identified by their content hash (:func:`file_id`), recorded when they are
written (``adapter_id``, ``teacher_id``, ``head_id``, ``gate_id``); :func:`verify_file` checks a
file against its id before it is used, so a file damaged after it was written (a few flipped bytes
in a file that still opens) is refused, naming the stage to rerun, never used.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

import torch

from utils.errors import UserError, first_line
from utils.io import read_json, write_json

META_FILE = "meta.json"
# The layout of every record written by this code; a change of keys or meaning raises it.
FORMAT_VERSION = 1
READABLE_VERSIONS = (FORMAT_VERSION,)

# How to produce each stage's folder; quoted in errors. The teacher's needs --retrain_teacher,
# since stage 2 otherwise reuses the teacher it finds.
STAGE_COMMANDS = {
    "instructions": "python generate_instructions.py --dataname {dataname}",
    "vlm": "python train_vlm.py --dataname {dataname}",
    "vlm_zero_shot": "python train_vlm.py --dataname {dataname} --eval_only --zero_shot --vlm_model <base>",
    "teacher": "python train_distillation.py --dataname {dataname} --retrain_teacher",
    "distill": "python train_distillation.py --dataname {dataname}",
    "gate": "python train_gate.py --dataname {dataname}",
}
# The stage that writes each kind of weights file.
KIND_STAGES = {"teacher": "teacher", "head": "distill", "gate": "gate"}


def stamp(record: dict, kind: str) -> dict:
    """``record`` with this code's ``format_version`` and its ``kind`` first."""
    return {"format_version": FORMAT_VERSION, "kind": kind, **record}


def check_format(record, path: str | Path, kind: str, stage: str | None = None,
                 dataname: str = "<dataname>") -> dict:
    """``record`` when this code reads it: stamped with a known ``format_version`` and ``kind``.
    Otherwise a one-line UserError naming the file, what it holds and the command rewriting it."""
    stage = stage or KIND_STAGES[kind]
    if not isinstance(record, dict) or "format_version" not in record:
        found = "no format_version (not written by this version of the code)"
    elif record["format_version"] not in READABLE_VERSIONS:
        found = (f"format_version {record['format_version']!r}, but this code reads "
                 f"{', '.join(map(str, READABLE_VERSIONS))}")
    elif record.get("kind") != kind:
        found = f"a {record.get('kind')!r} record where a {kind!r} one belongs"
    else:
        return record
    raise UserError(f"{path}: {found}; {rewrite_hint(stage, dataname)}")


def rewrite_hint(stage: str, dataname: str = "<dataname>") -> str:
    """How to replace a record of ``stage`` this code cannot read: the command that rewrites it."""
    command = STAGE_COMMANDS[stage].format(dataname=dataname)
    if stage == "instructions":  # stage 0 reads its own meta.json when it resumes
        return f"delete it and rerun `{command}` (the annotations are kept)"
    return f"rerun `{command}` to rewrite it"


def read_checkpoint(path: str | Path, kind: str, dataname: str = "<dataname>") -> dict:
    """A ``.pt`` record of ``kind`` (tensors only, on the CPU), checked by :func:`check_format`; a
    file torch cannot read is a UserError naming the command that rewrites it."""
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the user's to fix
        command = STAGE_COMMANDS[KIND_STAGES[kind]].format(dataname=dataname)
        raise UserError(f"{path}: cannot read it ({first_line(err)}); rerun `{command}` to rewrite it") from None
    return check_format(record, path, kind, dataname=dataname)


def write_meta(folder: str | Path, stage: str, class_names: Sequence[str], **fields) -> Path:
    """``<folder>/meta.json``: the stage, its class names and ``fields``, stamped."""
    return write_json(Path(folder) / META_FILE,
                      stamp({"stage": stage, "class_names": list(class_names), **fields}, "meta"))


def read_meta(folder: str | Path, stage: str, dataname: str = "<dataname>") -> dict:
    """The ``meta.json`` of a finished stage; a missing or unreadable one is a UserError naming the command."""
    path = Path(folder) / META_FILE
    if not path.is_file():
        command = STAGE_COMMANDS[stage].format(dataname=dataname)
        raise UserError(f"{folder}: no finished {stage} stage output ({META_FILE} missing); "
                        f"run `{command}` first")
    try:
        record = read_json(path)
    except ValueError as err:  # not JSON, or not UTF-8 (UnicodeDecodeError is a ValueError)
        raise UserError(f"{path}: not a JSON record ({first_line(err)}); {rewrite_hint(stage, dataname)}") from None
    meta = check_format(record, path, "meta", stage, dataname)
    if meta.get("stage") != stage:
        raise UserError(f"{path}: written by stage {meta.get('stage')!r}, expected {stage!r}")
    return meta


def verify_file(path: str | Path, recorded_id: str | None, field: str, record: str | Path, stage: str,
                dataname: str = "<dataname>") -> None:
    """Refuse ``path`` when its content hash (:func:`file_id`) is not ``recorded_id``, the
    ``field`` of ``record`` (the meta.json that describes it): one UserError line naming the file
    and the command of ``stage`` that rewrites it. A record written before the id was recorded
    (None) has nothing to check against."""
    if recorded_id is None:
        return
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: missing, though {record} describes it; {rewrite_hint(stage, dataname)}")
    found = file_id(path)
    if found != recorded_id:
        raise UserError(f"{path}: damaged or replaced (its content hash is {found}, but {record} records "
                        f"{field} {recorded_id}); {rewrite_hint(stage, dataname)}")


def file_id(*paths: str | Path) -> str:
    """A short content hash identifying trained weights (12 hex digits)."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:12]
