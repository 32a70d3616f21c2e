"""Benchmarks: each module's ``run()`` measures one stage and returns ratios from one run.

Every claim a benchmark checks is a *target row* (``target_row``): what was measured, the target
written before measuring, and whether this run met it. A miss is printed as a miss."""
from __future__ import annotations

import operator

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
