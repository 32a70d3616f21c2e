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

import functools
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Iterable

from filelock import FileLock, Timeout

from utils.checkpoints import META_FILE
from utils.dist import distributed_rank
from utils.errors import UserError
from utils.io import read_json, write_json
from utils.run import _redact

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


def unstaged_name(name: str) -> str:
    """The output folder's name for a staging folder's (:func:`staging_dir`); other names as they are."""
    return name[1:-len(".new")] if name.startswith(".") and name.endswith(".new") and len(name) > 5 else name


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


def publish(run_dir: str | Path, folder: str | Path) -> Path:
    """Copy the files of a finished run folder into ``folder`` (the top-level stage folder that later
    stages, the demo and the predictor read), staged like every stage output: the old files stay
    trusted until the copy is complete. Subfolders of ``run_dir`` are not copied."""
    staged = StagedOutput(folder)
    new_dir = staged.begin()
    for path in sorted(Path(run_dir).iterdir()):
        if path.is_file():
            shutil.copyfile(path, new_dir / path.name)
    return staged.commit()


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


# ---------------------------------------------------------------- one run per folder

LOCK_FILE = ".lock"
LOCK_INFO = ".lock.json"
_held: dict[Path, tuple[object, Path]] = {}  # lock file -> (FileLock held by this process, its info file)


def lock_folder(*folders: str | Path) -> None:
    """Hold an exclusive lock on each stage folder until the stage's ``main`` returns (see
    :func:`releases_locks`). A folder another live run holds stops this run at once, naming that
    run's PID and start time; the lock of a killed run dies with it (an OS file lock) and is
    taken over. Under a launcher only the first process locks."""
    if distributed_rank()[0] != 0:
        return
    for folder in map(Path, folders):
        if (folder / LOCK_FILE).resolve() in _held:
            continue
        folder_writable(folder)
        _take(folder / LOCK_FILE, folder / LOCK_INFO,
              lambda holder: f"{folder} is in use by another run ({holder}); wait for it to finish "
                             "or write elsewhere with --output_dir")


def lock_output(path: str | Path, flag: str = "--out") -> None:
    """Hold an exclusive lock on an output file (predict.py's ``--out``) as :func:`lock_folder` holds
    a stage folder: ``.<name>.lock`` beside it, ``.<name>.lock.json`` naming the holder. A second
    run on the same file stops at once, naming the first."""
    if distributed_rank()[0] != 0:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _take(path.parent / f".{path.name}{LOCK_FILE}", path.parent / f".{path.name}{LOCK_INFO}",
          lambda holder: f"{flag} {path} is in use by another run ({holder}); wait for it to finish "
                         f"or pass another {flag}")


def _take(lock_file: Path, info: Path, busy: Callable[[str], str]) -> None:
    """Acquire ``lock_file`` (without waiting) and write ``info``; a held one is a UserError ``busy(holder)``."""
    key = lock_file.resolve()
    if key in _held:
        return
    lock = FileLock(lock_file, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise UserError(busy(_holder(info))) from None
    _held[key] = (lock, info)
    write_json(info, {"pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                      "command": " ".join(_redact(sys.argv))})  # no --api_key values


def _holder(info: Path) -> str:
    try:
        info = read_json(info)
        return f"PID {info['pid']}, started {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "PID unknown"


def release_locks() -> None:
    """Release every lock this process holds."""
    while _held:
        _, (lock, info) = _held.popitem()
        info.unlink(missing_ok=True)
        lock.release()


def releases_locks(main: Callable) -> Callable:
    """Decorate a stage's ``main``: the folder locks it took are released when it returns or fails."""
    @functools.wraps(main)
    def run(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        finally:
            release_locks()

    return run


def folder_writable(folder: str | Path) -> Path:
    """Create ``folder`` if needed; a UserError naming it when it cannot be created or written."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"{folder}: cannot create this output folder ({err.strerror}); choose another "
                        "--output_dir or fix its permissions") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"{folder}: this output folder is not writable; choose another --output_dir or fix "
                        "its permissions") from None
    return folder
