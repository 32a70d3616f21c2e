"""Key-checked caches of frozen-model outputs (visual features, teacher logits, VLM answers).

A cache file holds ``{"key": dict, "values": ..., "digest": str}``. It is reused only when its key
equals the key of the current run (model, weights, image list, preprocessing, ...) and its values
still hash to the digest stored beside them when it was written (:func:`values_digest`: a few
flipped bytes inside a file that still opens are caught here), and pass the reader's own check of
their shape and range when it gives one; otherwise, or when it cannot be read, it is rebuilt. A
cache without a digest (written by an older version) cannot be verified and is rebuilt too. Each
decision is logged: the key fields that changed, or a warning naming the damaged file.
"""
from __future__ import annotations

import hashlib
import json
import logging
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from utils.dist import barrier, distributed_rank
from utils.io import torch_save

log = logging.getLogger(__name__)


def digest(obj) -> str:
    """A short, order-independent hash of a JSON-able object."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def image_list_id(data_root: str | Path, samples: Sequence) -> str:
    """Hash of a split's images in order: path, size and modification time of each file."""
    rows = []
    for sample in samples:
        stat = (Path(data_root) / sample.path).stat()
        rows.append((sample.path, stat.st_size, stat.st_mtime_ns))
    return digest(rows)


def values_digest(values: Any) -> str:
    """A content hash of a cache's values: every tensor's dtype, shape and bytes, and every other
    value (dicts by sorted key, lists and tuples in order, None, numbers, strings), in a fixed order."""
    digest_ = hashlib.sha256()
    _feed(digest_, values)
    return digest_.hexdigest()[:32]


def _feed(digest_, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        digest_.update(f"tensor {tensor.dtype} {tuple(tensor.shape)};".encode())
        if tensor.numel():
            digest_.update(tensor.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(value, dict):
        digest_.update(f"dict {len(value)};".encode())
        for name in sorted(value, key=repr):
            _feed(digest_, name)
            _feed(digest_, value[name])
    elif isinstance(value, (list, tuple)):
        digest_.update(f"{type(value).__name__} {len(value)};".encode())
        for item in value:
            _feed(digest_, item)
    elif value is None or isinstance(value, (bool, int, float, str)):
        text = repr(value)
        digest_.update(f"{type(value).__name__} {len(text)} {text};".encode())
    else:
        raise TypeError(f"cannot cache a {type(value).__name__}")


def _changed(old: dict, new: dict) -> list[str]:
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def _problem(stored: dict, check: Callable[[Any], str | None] | None) -> str | None:
    """Why a cache's values cannot be trusted, said of the file (no digest, another digest,
    ``check``'s complaint), or None."""
    if "digest" not in stored:
        return "has no digest of its values (written by an older version)"
    if values_digest(stored["values"]) != stored["digest"]:
        return "no longer matches the digest of its values written with it (damaged)"
    problem = check(stored["values"]) if check is not None else None
    return None if problem is None else f"is damaged ({problem})"


def load_cached(path: str | Path, key: dict, check: Callable[[Any], str | None] | None = None) -> Any | None:
    """The values cached in ``path`` when it was built for ``key`` and they still match their
    digest (and ``check(values)``, when given, finds nothing wrong: it returns a problem or None);
    otherwise None, logging why."""
    path = Path(path)
    if not path.is_file():
        log.info("cache miss: %s does not exist", path)
        return None
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
        stored_key, values = stored["key"], stored["values"]
    except Exception as err:  # noqa: BLE001 - a damaged cache is rebuilt, never trusted
        log.warning("cache unreadable: %s (%s)", path, err.__class__.__name__)
        return None
    if stored_key != key:
        changed = _changed(stored_key if isinstance(stored_key, dict) else {}, key)
        log.warning("cache stale: %s was built for another %s", path, ", ".join(changed))
        return None
    problem = _problem(stored, check)
    if problem is not None:
        log.warning("cache not used: %s %s", path, problem)
        return None
    log.info("cache hit: %s", path)
    return values


def readable(path: str | Path) -> bool:
    """Whether ``path`` is a cache file that loads (a truncated or overwritten file does not)."""
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
        return isinstance(stored, dict) and "key" in stored and "values" in stored
    except Exception:  # noqa: BLE001 - any failure means damaged
        return False


def damage(path: str | Path, check: Callable[[Any], str | None] | None = None) -> str | None:
    """What is wrong with the cache file ``path`` whatever its key, said of it (``"cannot be read
    (damaged)"``, its values' digest, ``check``'s problem); None when it is sound (or absent)."""
    path = Path(path)
    if not path.is_file():
        return None
    if not readable(path):
        return "cannot be read (damaged)"
    return _problem(torch.load(path, map_location="cpu", weights_only=True), check)


def store(path: str | Path, key: dict, values: Any) -> None:
    """Write ``values`` with their key and their digest (:func:`values_digest`), atomically."""
    torch_save({"key": key, "values": values, "digest": values_digest(values)}, path)


def weights_fingerprint(model_id: str) -> list | None:
    """For a local folder: names, sizes and times of its weight files (a rebuilt model there differs)."""
    folder = Path(model_id)
    if not folder.is_dir():
        return None  # a hub id: the id and config identify it
    return sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in folder.iterdir()
                  if f.suffix in (".safetensors", ".bin"))


def load_or_build(cache_dir: Path, name: str, keys: dict[str, dict],
                  build: Callable[[str], Any] | None,
                  check: Callable[[str, Any], str | None] | None = None) -> dict[str, Any]:
    """Per split: reuse ``<name>_<split>.pt`` when its key matches and its values are sound (their
    digest, and ``check(split, values)`` when given: see :func:`load_cached`), else
    ``build(split)`` and store it (rank 0 under a launcher; every rank must call this), one missing
    split after the other; ``build`` None returns only the hits, None for a miss.

    Splits that share one model load pass the method of an object that loads the model on first
    use, so a run whose splits are all cached never loads it."""
    result = {split: load_cached(cache_dir / f"{name}_{split}.pt", key,
                                 None if check is None else partial(check, split)) for split, key in keys.items()}
    barrier()  # every rank has decided before rank 0 overwrites a file
    missing = [split for split, values in result.items() if values is None]
    if build is None:
        return result
    for split in missing:
        result[split] = build(split)
        if distributed_rank()[0] == 0:
            store(cache_dir / f"{name}_{split}.pt", keys[split], result[split])
    return result
