"""Atomic file writes (a reader never sees a half-written file) and the repair of an append-only
file an interrupted run left with an unfinished last line."""
from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

log = logging.getLogger(__name__)


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` and rename the result to ``path`` only when it succeeded."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; colleagues may need to read it
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def current_umask() -> int:
    """The process umask (read from /proc where possible: setting it to read it races threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: str | Path, obj: Any) -> Path:
    """``obj`` as indented JSON, atomically. JSON has no NaN or infinity: such a number (a statistic
    with no data to compute it from) is written as null, with a warning naming the file and key."""
    return write_text(path, json.dumps(finite_json(obj, str(path)), indent=2, ensure_ascii=False,
                                       allow_nan=False) + "\n")


def finite_json(obj: Any, path: str = "", where: str = "") -> Any:
    """``obj`` with every NaN or infinite float replaced by None (logged, naming ``path`` and the key)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        log.warning("%s: %s is %s; written as null", path, where or "a value", obj)
        return None
    if isinstance(obj, dict):
        return {key: finite_json(value, path, f"{where}.{key}" if where else str(key)) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(value, path, f"{where}[{i}]") for i, value in enumerate(obj)]
    return obj


def read_json(path: str | Path) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` atomically. Written through a file object: given a path, torch names the
    archive inside the file after it (here a random temporary name), so the same tensors would
    give different bytes, and different file ids, on every run."""
    def save(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)

    return atomic_write(path, save)


def repair_tail(path: str | Path, block: int = 1 << 16) -> None:
    """Cut an unfinished last line (no trailing newline) so appends start on a fresh line.

    Reads only the end of the file: the last byte, and on a cut, blocks backwards to the last newline."""
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "r+b") as fh:
        end = fh.seek(-1, os.SEEK_END) + 1
        if fh.read(1) == b"\n":
            return
        start = end
        while start > 0:
            start = max(0, start - block)
            fh.seek(start)
            newline = fh.read(end - start).rfind(b"\n")
            if newline >= 0:
                start += newline + 1
                break
        log.warning("%s: removing an unfinished last line left by an interrupted run", path)
        fh.truncate(start)
