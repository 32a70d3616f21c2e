"""Several runs side by side: a row per run and module, a column per dataset, paired tests between runs.

    python -m utils.report --runs base=outputs other=outputs/other [--datasets FI emotion6] [--out runs.md]

Each run is an output folder (``--output_dir`` of its stages); its numbers come from
``<folder>/<dataset>/gate/metrics.json``. A cell is the test accuracy with its 95% percentile
bootstrap interval (utils.stats, the one stage 3 stored, else computed from the stored
predictions). Below the table, every later run is compared with the first on the same test images
by McNemar's paired test, per dataset and module. Runs whose test images differ (another split,
another order, other labels) cannot be paired and are refused, naming the difference.
"""
from __future__ import annotations

from pathlib import Path

from utils.errors import UserError
from utils.io import read_json
from utils.report import vlm_tasks
from utils.stats import bootstrap_ci, correctness, mcnemar

MODULES = (("VLM", "vlm"), ("distill module", "head"), ("teacher", "teacher"))


def parse_runs(specs: list[str]) -> dict[str, Path]:
    """``["name=folder", ...]`` -> ``{name: folder}``, in the order given."""
    runs = {}
    for spec in specs:
        name, sep, folder = spec.partition("=")
        if not sep or not name or not folder:
            raise UserError(f"--runs {spec}: expected NAME=FOLDER, e.g. --runs base=outputs other=outputs/other")
        if name in runs:
            raise UserError(f"--runs: the name {name!r} is given twice; name each run once")
        runs[name] = Path(folder)
    return runs


def load_runs(runs: dict[str, Path], datasets: list[str] | None) -> tuple[list[str], dict]:
    """``(datasets, {run: {dataset: metrics}})``; a run folder without any results is refused."""
    found = {}
    for name, folder in runs.items():
        paths = {p.parent.parent.name: p for p in sorted(folder.glob("*/gate/metrics.json"))}
        if datasets is not None:
            paths = {d: paths[d] for d in datasets if d in paths}
        if not paths:
            which = f" for {', '.join(datasets)}" if datasets else ""
            raise UserError(f"--runs {name}={folder}: no <dataset>/gate/metrics.json{which}; run train_gate.py "
                            f"with --output_dir {folder} first")
        found[name] = {dataset: read_json(path) for dataset, path in paths.items()}
    names = datasets or sorted({d for per_run in found.values() for d in per_run})
    return names, found


def modules(metrics: dict) -> dict[str, list[int]]:
    """``{row label: test predictions}`` of one metrics.json (VLM, head, teacher, every gate)."""
    preds = metrics.get("test_predictions") or {}
    rows = {label: preds.get(key) for label, key in MODULES if metrics.get(key)}
    rows.update({f"EmoVLM-KD ({gate})": (preds.get("gates") or {}).get(gate) for gate in metrics.get("gates", {})})
    return rows


def _result(metrics: dict, label: str) -> dict:
    key = dict(MODULES).get(label)
    return metrics[key] if key else metrics["gates"][label.removeprefix("EmoVLM-KD (").removesuffix(")")]


def cell(metrics: dict, label: str) -> str:
    """``accuracy [low, high]`` in percent (the interval from metrics.json, else from the predictions)."""
    result = _result(metrics, label)
    interval = result.get("ci95")
    preds = modules(metrics).get(label)
    if not interval and preds is not None:
        interval = bootstrap_ci(correctness(metrics["test_predictions"]["labels"], preds))
    text = f"{100 * result['accuracy']:.2f}"
    return text + (f" [{100 * interval[0]:.2f}, {100 * interval[1]:.2f}]" if interval else "")


def check_same_images(dataset: str, base: tuple[str, dict], other: tuple[str, dict]) -> None:
    """Refuse to pair two runs whose test images (their list, else their count and labels) differ."""
    (a, ma), (b, mb) = base, other
    images_a, images_b = ma.get("test_images"), mb.get("test_images")
    labels_a = (ma.get("test_predictions") or {}).get("labels")
    labels_b = (mb.get("test_predictions") or {}).get("labels")
    where = f"--runs: {dataset}'s test images differ between {a} and {b}"
    if images_a is not None and images_b is not None and images_a != images_b:
        if len(images_a) != len(images_b):
            raise UserError(f"{where}: {len(images_a)} vs {len(images_b)} images; pair runs of the same split")
        i = next(i for i, (x, y) in enumerate(zip(images_a, images_b)) if x != y)
        raise UserError(f"{where}: image {i} is {images_a[i]} vs {images_b[i]}; pair runs of the same split")
    if labels_a is None or labels_b is None:
        raise UserError(f"--runs: {dataset}: {a if labels_a is None else b} stored no test predictions; rerun its "
                        "train_gate.py to compare the runs")
    if len(labels_a) != len(labels_b):
        raise UserError(f"{where}: {len(labels_a)} vs {len(labels_b)} images; pair runs of the same split")
    if labels_a != labels_b:
        i = next(i for i, (x, y) in enumerate(zip(labels_a, labels_b)) if x != y)
        raise UserError(f"{where}: image {i} is labelled {labels_a[i]} vs {labels_b[i]}; pair runs of the same split")


def paired_rows(datasets: list[str], found: dict) -> list[list[str]]:
    """McNemar of every later run against the first, per dataset and module both have."""
    names = list(found)
    base = names[0]
    rows = []
    for dataset in datasets:
        if dataset not in found[base]:
            continue
        for other in names[1:]:
            if dataset not in found[other]:
                continue
            check_same_images(dataset, (base, found[base][dataset]), (other, found[other][dataset]))
            mine, theirs = modules(found[base][dataset]), modules(found[other][dataset])
            labels = found[base][dataset]["test_predictions"]["labels"]
            for label in mine:
                if mine[label] is None or theirs.get(label) is None:
                    continue
                right_a, right_b = correctness(labels, mine[label]), correctness(labels, theirs[label])
                test = mcnemar(right_a, right_b)
                rows.append([dataset, label, f"{base} vs {other}", f"{100 * (right_b.mean() - right_a.mean()):+.2f}",
                             str(test["a_only"]), str(test["b_only"]), f"{test['p_value']:.3g}", test["test"]])
    return rows


def tasks_note(folder: Path, per_dataset: dict) -> str:
    """`` (VLM tuned on categorical only)`` for a run whose stage 1 trained on fewer than the three
    tasks (per dataset where they differ), else nothing."""
    tasks = {dataset: vlm_tasks(folder, dataset) for dataset in per_dataset}
    if not any(tasks.values()):
        return ""
    shown = {dataset: f"{', '.join(value)} only" if value else "all three tasks" for dataset, value in tasks.items()}
    if len(set(shown.values())) == 1:
        return f" (VLM tuned on {next(iter(shown.values()))})"
    return " (VLM tuned on " + "; ".join(f"{dataset}: {text}" for dataset, text in shown.items()) + ")"


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def build_runs(specs: list[str], datasets: list[str] | None = None) -> str:
    """The markdown table of the runs in ``specs`` and their paired tests (nothing is written here)."""
    runs = parse_runs(specs)
    datasets, found = load_runs(runs, datasets)
    paired = paired_rows(datasets, found)  # refuses unpaired image lists before anything is printed
    rows = []
    for name in runs:
        labels = list(dict.fromkeys(label for metrics in found[name].values() for label in modules(metrics)))
        for label in labels:
            rows.append([name, label] + [cell(found[name][d], label)
                                         if d in found[name] and label in modules(found[name][d]) else ""
                                         for d in datasets])
    text = (_markdown(["run", "module", *datasets], rows)
            + "\n\nTest accuracy % [95% percentile bootstrap interval over the test images]. Runs: "
            + ", ".join(f"`{name}` = `{folder}`" + tasks_note(folder, found[name]) for name, folder in runs.items())
            + ".")
    if paired:
        text += ("\n\n" + _markdown(["dataset", "module", "runs", "accuracy difference (points)",
                                     "right only in the first", "right only in the second", "McNemar p", "test"], paired)
                 + "\n\nMcNemar's paired test on the same test images: exact binomial when fewer than 25 images "
                   "differ, otherwise chi-square with continuity correction.")
    return text + "\n"
