"""Key-checked caches of frozen-model outputs (visual features, teacher logits, VLM answers).

A cache file holds ``{"key": dict, "values": ...}``. It is reused only when its key equals the
key of the current run (model, weights, image list, preprocessing, ...); otherwise, or when it
cannot be read, it is rebuilt. Each decision is logged with the key fields that changed.
"""
from __future__ import annotations

import hashlib
import json
import logging
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


def _changed(old: dict, new: dict) -> list[str]:
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def load_cached(path: str | Path, key: dict) -> Any | None:
    """The values cached in ``path`` when it was built for ``key``; otherwise None, logging why."""
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
    log.info("cache hit: %s", path)
    return values


def readable(path: str | Path) -> bool:
    """Whether ``path`` is a cache file that loads (a truncated or overwritten file does not)."""
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
        return isinstance(stored, dict) and "key" in stored and "values" in stored
    except Exception:  # noqa: BLE001 - any failure means damaged
        return False


def store(path: str | Path, key: dict, values: Any) -> None:
    """Write ``values`` with their key, atomically."""
    torch_save({"key": key, "values": values}, path)


def weights_fingerprint(model_id: str) -> list | None:
    """For a local folder: names, sizes and times of its weight files (a rebuilt model there differs)."""
    folder = Path(model_id)
    if not folder.is_dir():
        return None  # a hub id: the id and config identify it
    return sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in folder.iterdir()
                  if f.suffix in (".safetensors", ".bin"))


def load_or_build(cache_dir: Path, name: str, keys: dict[str, dict],
                  build: Callable[[str], Any] | None) -> dict[str, Any]:
    """Per split: reuse ``<name>_<split>.pt`` when its key matches, else ``build(split)`` and store
    it (rank 0 under a launcher; every rank must call this), one missing split after the other;
    ``build`` None returns only the hits, None for a miss.

    Splits that share one model load pass the method of an object that loads the model on first
    use, so a run whose splits are all cached never loads it."""
    result = {split: load_cached(cache_dir / f"{name}_{split}.pt", key) for split, key in keys.items()}
    barrier()  # every rank has decided before rank 0 overwrites a file
    missing = [split for split, values in result.items() if values is None]
    if build is None:
        return result
    for split in missing:
        result[split] = build(split)
        if distributed_rank()[0] == 0:
            store(cache_dir / f"{name}_{split}.pt", keys[split], result[split])
    return result
