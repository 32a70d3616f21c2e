"""Run every benchmark and print one table of measured ratios: ``python -m bench``.

Each benchmark builds its own tiny world in a temporary folder, so the numbers come from one
run of this command on this machine; the table is also written as JSON (``--out``).
"""
from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys
import time

from bench import TARGETS_KEY, format_targets  # sets the offline environment first
from utils.io import write_json

BENCHMARKS = ("vlm_predict", "vlm_train_cost", "distill_cost", "gate_cost", "batch_one", "sweep_cost",
              "memory", "prepare_check", "verify_cost", "explorer_cost")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=BENCHMARKS, default=list(BENCHMARKS))
    parser.add_argument("--out", default="outputs/bench/results.json")
    args = parser.parse_args(argv)
    results = {}
    for name in args.only:
        print(f"== bench.{name}", flush=True)
        start = time.perf_counter()
        results[name] = importlib.import_module(f"bench.{name}").run()
        results[name]["wall_seconds"] = round(time.perf_counter() - start, 1)
    rows = [(bench, key, value) for bench, values in results.items()
            for key, value in values.items() if key not in ("wall_seconds", TARGETS_KEY)]
    width = max(len(f"{b}.{k}") for b, k, _ in rows) if rows else 10
    print("\n" + "benchmark".ljust(width) + "  value")
    for bench, key, value in rows:
        shown = f"{value:.3g}" if isinstance(value, float) else str(value)
        print(f"{bench}.{key}".ljust(width) + "  " + shown)
    targets = [{**row, "what": f"{bench}: {row['what']}"} for bench, values in results.items()
               for row in values.get(TARGETS_KEY, [])]
    print("\nTargets (each written before measuring; a miss is reported, not tuned away):\n")
    print(format_targets(targets))
    missed = [row["what"] for row in targets if not row["met"]]
    print(f"\n{len(targets) - len(missed)} of {len(targets)} targets met"
          + (f"; missed: {'; '.join(missed)}" if missed else ""))
    write_json(args.out, {"machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
                          "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "results": results})
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    sys.exit(main())
