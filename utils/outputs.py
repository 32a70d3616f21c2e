"""A stage's outputs replace the previous ones only when the new run has finished well.

:class:`StagedOutput` gives a stage a staging folder beside its output folder
(``<stage>/`` -> ``.<stage>.new/``). The run writes its results there; :meth:`StagedOutput.commit`
moves them into the output folder file by file, ``meta.json`` last, once the run has finished
with finite numbers. A run that fails, diverges or is killed leaves the earlier results (and
their ``meta.json``) as they were. Caches and resumable checkpoints are not staged: they are
checked on every read and stay in the output folder.

:func:`check_finite` stops a diverged run with one line naming the flag most likely at fault.
"""
from __future__ import annotations

import math
import os
import shutil
from pathlib import Path
from typing import Iterable

from utils.errors import UserError

META_FILE = "meta.json"
# Written into the staging folder just before the move starts: a commit interrupted half-way is
# completed by the next run instead of being thrown away.
COMMIT_MARKER = ".commit"


class DivergedError(UserError):
    """Training produced a non-finite loss or metric."""


def check_finite(value: float, what: str, flags: str) -> None:
    """DivergedError (one line) unless ``value`` is a finite number."""
    if not math.isfinite(float(value)):
        raise DivergedError(f"{what} is {value}: training diverged; earlier results are kept. The likely cause "
                            f"is {flags}; lower it or check the inputs")


def staging_dir(folder: str | Path) -> Path:
    folder = Path(folder)
    return folder.parent / f".{folder.name}.new"


class StagedOutput:
    """Stage results written beside ``folder`` and swapped in by :meth:`commit`."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.staging = staging_dir(self.folder)

    def begin(self, keep: bool = False) -> Path:
        """The empty staging folder (``keep``: as a killed run left it, for resuming)."""
        finish_interrupted_commit(self.folder)
        if self.staging.exists() and not keep:
            shutil.rmtree(self.staging)
        self.staging.mkdir(parents=True, exist_ok=True)
        return self.staging

    def commit(self, numbers: Iterable[tuple[str, float]] = (), flags: str = "the learning rate") -> Path:
        """Check ``numbers`` (``(name, value)`` pairs) are finite, then move the staged files in."""
        for name, value in numbers:
            check_finite(value, name, flags)
        (self.staging / COMMIT_MARKER).touch()
        _move_in(self.staging, self.folder)
        return self.folder


def finish_interrupted_commit(folder: str | Path) -> None:
    """Complete a commit that a kill interrupted (its staging folder holds the marker)."""
    staging = staging_dir(folder)
    if (staging / COMMIT_MARKER).is_file():
        _move_in(staging, Path(folder))


def _move_in(staging: Path, folder: Path) -> None:
    """Replace each file of ``folder`` by its staged version: the old ``meta.json`` goes first (the
    folder is not trusted while mixed), the new one comes last."""
    folder.mkdir(parents=True, exist_ok=True)
    files = sorted(p for p in staging.rglob("*") if p.is_file() and p.name != COMMIT_MARKER)
    meta = staging / META_FILE
    if meta.is_file():
        (folder / META_FILE).unlink(missing_ok=True)
    for path in files:
        if path == meta:
            continue
        target = folder / path.relative_to(staging)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)
    if meta.is_file():
        os.replace(meta, folder / META_FILE)
    shutil.rmtree(staging)
