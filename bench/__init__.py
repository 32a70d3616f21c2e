"""Benchmarks: each module's ``run()`` measures one stage and returns ratios from one run.

Every claim a benchmark checks is a *target row* (``target_row``): what was measured, the target
written before measuring, and whether this run met it. A miss is printed as a miss."""
from __future__ import annotations

import operator
import os
import time
from typing import Callable

# Benchmarks run offline on local tiny models. Set here, in the package, because the hub
# libraries read these when first imported, and every ``python -m bench.<name>`` imports this first.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

TARGETS_KEY = "targets"
_COMPARE = {"<=": operator.le, ">=": operator.ge}


def target_row(what: str, measured: float, op: str, target: float, unit: str = "x") -> dict:
    """One checked claim: ``measured <op> target``, e.g. ``target_row("score / prompt", 1.2, "<=", 1.5)``."""
    return {"what": what, "measured": round(float(measured), 3), "unit": unit,
            "target": f"{op} {target:g}{unit}", "met": bool(_COMPARE[op](measured, target))}


def format_targets(rows: list[dict]) -> str:
    """The target rows as a markdown table: what | measured | target | met."""
    lines = ["| what | measured | target | met |", "|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['what']} | {row['measured']:.3g}{row['unit']} | {row['target']} | "
                     f"{'yes' if row['met'] else 'NO (missed)'} |")
    return "\n".join(lines)


def print_results(results: dict) -> None:
    """A benchmark's results, one ``key value`` line each, then its target rows as a table."""
    width = max(len(key) for key in results)
    for key, value in results.items():
        if key != TARGETS_KEY:
            print(f"{key:{width}s} {value:.3g}" if isinstance(value, float) else f"{key:{width}s} {value}")
    print(format_targets(results[TARGETS_KEY]))


def seconds(fn: Callable[[], object]) -> float:
    """Wall time of one call of ``fn``."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def best_of(fn: Callable[[], object], repeats: int = 2) -> float:
    """The fastest of ``repeats`` calls: the machine is shared, the minimum is the least disturbed."""
    return min(seconds(fn) for _ in range(repeats))
