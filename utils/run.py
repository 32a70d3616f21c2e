"""Seeding and run records: every run folder says how it was made."""
from __future__ import annotations

import argparse
import platform
import random
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from utils.io import write_json

_PACKAGES = ("torch", "torchvision", "transformers", "peft", "accelerate", "timm", "openai",
             "gradio", "scikit-learn", "pillow")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def library_versions() -> dict:
    versions = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _redact(words: list[str]) -> list[str]:
    """Mask the value of any ``--*key*`` flag so secrets never reach a run record."""
    out = []
    for word in words:
        if out and out[-1].startswith("--") and "key" in out[-1].lower() and "=" not in out[-1]:
            word = "***"
        elif word.startswith("--") and "key" in word.lower() and "=" in word:
            word = word.split("=", 1)[0] + "=***"
        out.append(word)
    return out


def record_run(folder: str | Path, args: argparse.Namespace, **extra) -> Path:
    """Write ``run.json`` (resolved arguments, versions, git commit, command) into ``folder``."""
    record = {
        "command": " ".join(_redact([Path(sys.argv[0]).name, *sys.argv[1:]])),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "args": {key: value for key, value in vars(args).items()
                 if "key" not in key.lower()},  # never record secrets such as --api_key
        "versions": library_versions(),
        "git_commit": git_commit(),
        **extra,
    }
    return write_json(Path(folder) / "run.json", record)
