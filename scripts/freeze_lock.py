"""Write ``requirements.lock``: the exact versions installed here of our dependencies and theirs.

    python scripts/freeze_lock.py            # rewrites requirements.lock from this environment

The lock is a pip *constraints* file (``pip install -r requirements.txt -c requirements.lock``): it
pins the versions of whatever requirements.txt (and requirements-dev.txt, requirements-tracking.txt) pull in, nothing more;
packages of other platforms' markers (CUDA wheels on macOS) are simply not installed there.
"""
from __future__ import annotations

import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
ROOTS = ("requirements.txt", "requirements-dev.txt", "requirements-tracking.txt")


def root_names() -> list[str]:
    names = []
    for name in ROOTS:
        for line in (REPO / name).read_text(encoding="utf-8").splitlines():
            line = line.split("#")[0].strip()
            if line and not line.startswith("-"):
                names.append(Requirement(line).name)
    return names


def installed_closure(names: list[str]) -> dict[str, str]:
    """``{name: version}`` of ``names`` and everything they require (no extras), as installed."""
    versions: dict[str, str] = {}
    stack = list(names)
    while stack:
        name = canonicalize_name(stack.pop())
        if name in versions:
            continue
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            continue  # required only on another platform or Python
        versions[name] = dist.version
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                stack.append(req.name)
    return versions


def main() -> None:
    versions = installed_closure(root_names())
    lines = ["# Constraints: the versions the test suite last passed with (scripts/freeze_lock.py).",
             "# pip install -r requirements.txt -c requirements.lock",
             *(f"{name}=={version}" for name, version in sorted(versions.items()))]
    (REPO / "requirements.lock").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"requirements.lock: {len(versions)} packages (Python {sys.version.split()[0]})")


if __name__ == "__main__":
    main()
