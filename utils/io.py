"""Atomic file writes (a reader never sees a half-written file) and the repair of an append-only
file an interrupted run left with an unfinished last line.

A write that fails on the file system (a full disk or quota, no rights) is raised as an OSError
naming the file, whatever the library that wrote it made of the error (torch.save chains the
OSError to a RuntimeError, or loses it when given a path; safetensors quotes it): see
:func:`write_failure` and :func:`names_failed_writes`; ``utils.errors.run_cli`` prints it in one line.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from utils.errors import UserError, folder_error

log = logging.getLogger(__name__)

# A Rust library's I/O error (safetensors): "... No space left on device (os error 28)".
_QUOTED_ERRNO = re.compile(r"\(os error (\d+)\)")
# torch.save's C++ writer when a write given a path failed (it keeps no errno).
_TORCH_WRITER = ("unexpected pos", "iostream error", "file write failed", "PytorchStreamWriter failed")


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
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        failure = write_failure(err, path, own_name=False) if isinstance(err, Exception) else None
        if failure is not None and failure is not err:
            raise failure from err
        raise
    return path


def follow_umask(*paths: str | Path) -> None:
    """Give files written with fixed rights (safetensors writes 0600) the mode of the umask, like
    every other file (e.g. 0644), so colleagues on a shared cluster can read them."""
    mode = 0o666 & ~current_umask()
    for path in paths:
        os.chmod(path, mode)


def write_failure(err: Exception, path: str | Path, own_name: bool = True) -> OSError | None:
    """The file-system error (a full disk or quota, no rights, a read-only mount) behind ``err``, a
    failed write of ``path`` (a file or a folder), as an OSError naming ``path`` (or, ``own_name``,
    the file the error names itself); None when ``err`` is no such error. Found in ``err``'s chain
    (torch.save through a file object), quoted in its message (safetensors), or, for torch's writer
    given a path (it keeps no errno), by writing into the folder once more."""
    found = folder_error(err)
    if found is not None:
        if found is err and found.filename and own_name:
            return err
        return OSError(found.errno, found.strerror, (own_name and found.filename) or str(path))
    code = None
    while err is not None and code is None:
        quoted = _QUOTED_ERRNO.search(str(err))
        if quoted:
            code = int(quoted.group(1))
        elif isinstance(err, RuntimeError) and any(text in str(err) for text in _TORCH_WRITER):
            code = _probe_write(Path(path))
        err = err.__cause__ or err.__context__
    return None if code is None else folder_error(OSError(code, os.strerror(code), str(path)))


def _probe_write(path: Path, size: int = 1 << 20) -> int | None:
    """The errno of writing ``size`` bytes into ``path``'s folder now (``path`` itself when it is a
    folder), or None when that works."""
    folder = path if path.is_dir() else path.parent
    while not folder.is_dir() and folder != folder.parent:
        folder = folder.parent
    try:
        fd, tmp = tempfile.mkstemp(prefix=".write-probe.", dir=folder)
    except OSError as err:
        return err.errno
    try:
        data = memoryview(bytes(size))
        while data:
            data = data[os.write(fd, data):]
        os.fsync(fd)
    except OSError as err:
        return err.errno
    finally:
        os.close(fd)
        os.unlink(tmp)
    return None


@contextmanager
def names_failed_writes(path: str | Path) -> Iterator[None]:
    """A write inside the block that fails on the file system (see :func:`write_failure`) is raised
    as an OSError naming ``path`` (the file or folder written), unless it names its own file."""
    try:
        yield
    except Exception as err:
        failure = write_failure(err, path)
        if failure is None or failure is err:
            raise
        raise failure from err


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


def read_utf8(path: str | Path) -> str:
    """The text of ``path`` as ``open(path, encoding="utf-8")`` reads it (universal newlines); bytes
    that are not UTF-8 are a UserError naming the file, the line and the column."""
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - data.rfind(b"\n", 0, err.start)
        raise UserError(f"{path}:{line}: not UTF-8 text (byte 0x{data[err.start]:02x} at column {column}); "
                        "save the file as UTF-8, or fix or delete that line") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


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
