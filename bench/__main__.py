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

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from utils.io import write_json  # noqa: E402

BENCHMARKS = ("vlm_predict", "distill_cost", "gate_cost", "sweep_cost", "memory")


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
            for key, value in values.items() if key != "wall_seconds"]
    width = max(len(f"{b}.{k}") for b, k, _ in rows) if rows else 10
    print("\n" + "benchmark".ljust(width) + "  value")
    for bench, key, value in rows:
        shown = f"{value:.3g}" if isinstance(value, float) else str(value)
        print(f"{bench}.{key}".ljust(width) + "  " + shown)
    write_json(args.out, {"machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
                          "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "results": results})
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    sys.exit(main())
