"""The paper's main table: a row per method, a column per dataset, the paper's numbers beside ours.

    python -m utils.report --table main [--output_dir outputs] [--datasets FI emotion6] [--out main.md]
    python -m utils.report --table main --runs base=outputs qwen25=outputs/qwen25   # a row per run and method

Rows, in the paper's order: the conventional classifiers (VGG-16, ResNet-50, ViT-B/16: teachers
trained as plain classifiers; the default teacher is the paper's ViT-B/16 baseline), the zero-shot
VLMs, the instruction-tuned VLM, the distilled head and EmoVLM-KD (the paper's gate,
``concat_linear``). Each kind of row has one source function in ``ROW_SOURCES``: it reads one
dataset's output folder and returns ``{row label: Result}`` for the rows it found there. A row the
paper has but no run gave says "not run", never a number. A cell is the test accuracy, mean ±
standard deviation over the runs found where there are several (seeds of the head, seeds of the
gate), and its 95% percentile bootstrap interval over the test images (utils.stats, of the
accuracy averaged over those runs: each image counts the share of runs right on it).

The table is printed and written to ``<output_dir>/tables/main.md`` with ``main.csv`` beside it
(``main_runs.md``/``.csv`` with ``--runs``).
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from utils.ablation import PAPER_GATE, _cell, gate_runs
from utils.errors import UserError
from utils.io import read_json, write_text
from utils.report import PAPER  # the one place the paper's numbers are kept
from utils.stats import bootstrap_ci, correctness, mean_std
from utils.sweeps import PAPER_SETTING, list_runs, setting_of

TABLES = ("main",)
TABLES_DIR = "tables"
NOT_RUN = "not run"

# The timm teachers of the paper's conventional baselines, by the model name without its pretrained
# tag (``vit_base_patch16_384.orig_in21k_ft_in1k`` -> ``vit_base_patch16_384``), as the paper names them.
BASELINES = {"vgg16": "VGG-16", "resnet50": "ResNet-50", "vit_base_patch16_384": "ViT-B/16"}
TUNED_VLM = "instruction-tuned VLM"
HEAD = f"distilled head (depth {PAPER_SETTING['depth']}, alpha {PAPER_SETTING['alpha']:g})"
EMOVLM_KD = f"EmoVLM-KD ({PAPER_GATE})"
ZERO_SHOT = "zero-shot VLM"
# The row of utils.report.PAPER (the paper's reported accuracies) each main-table row stands beside.
PAPER_ROW = {"ViT-B/16": "teacher", TUNED_VLM: "VLM", EMOVLM_KD: "EmoVLM-KD"}


@dataclass
class Result:
    """One cell: the test accuracy of each run found (seeds), each run's per-image correctness where
    its predictions were stored (else None), and the interval stage 3 stored for a single run."""
    accuracies: list[float]
    correct: list[np.ndarray | None] = field(default_factory=list)
    ci95: tuple[float, float] | None = None

    @property
    def n(self) -> int:
        return len(self.accuracies)

    def stats(self) -> tuple[float, float]:
        return mean_std(self.accuracies)

    def interval(self) -> tuple[float, float] | None:
        """The 95% bootstrap interval of the accuracy averaged over the runs (the interval stage 3
        stored for a single run without its predictions); None without predictions."""
        arrays = self.correct if len(self.correct) == self.n else []
        if arrays and all(a is not None for a in arrays) and len({a.size for a in arrays}) == 1:
            return bootstrap_ci(np.mean(np.stack(arrays).astype(float), axis=0))
        return tuple(self.ci95) if self.ci95 and self.n == 1 else None


def _correct(predictions: dict | None, key: str) -> np.ndarray | None:
    """Per-image correctness of ``key`` (``head``, ``teacher``, ``vlm`` or ``gates.<name>``) in a stage-3
    metrics.json's ``test_predictions``; None where they were not stored."""
    if not predictions or predictions.get("labels") is None:
        return None
    preds = predictions.get("gates", {}).get(key[6:]) if key.startswith("gates.") else predictions.get(key)
    return None if preds is None else correctness(predictions["labels"], preds)


def _single(result: dict, correct: np.ndarray | None = None) -> Result:
    return Result([result["accuracy"]], [correct], result.get("ci95"))


def _read(path: Path) -> dict | None:
    return read_json(path) if path.is_file() else None


def _meta(folder: Path) -> dict:
    return _read(folder / "meta.json") or {}


def baseline_name(timm_model: str | None) -> str:
    """The paper's name of a timm teacher (``VGG-16``, ``ResNet-50``, ``ViT-B/16``), else its timm name."""
    if not timm_model:
        return "teacher"
    return BASELINES.get(timm_model.split(".")[0], timm_model)


# ---------------------------------------------------------------- row sources: one per kind of row
# Each takes one dataset's output folder (``<output_dir>/<dataset>``) and returns {row label: Result}.

def default_teacher(root: Path) -> dict[str, Result]:
    """The teacher stage 2 distilled the default head from, as a conventional classifier: its test
    accuracy from ``gate/metrics.json`` (``teacher``, with the interval and predictions stage 3
    stored), else from ``distill/metrics.json`` (``teacher``). Labelled by the timm model in
    ``teacher/meta.json`` (the default, ViT-B/16 at 384 px, is the paper's ViT-B/16 baseline)."""
    gate = _read(root / "gate" / "metrics.json") or {}
    if gate.get("teacher"):
        result = _single(gate["teacher"], _correct(gate.get("test_predictions"), "teacher"))
    else:
        teacher = (_read(root / "distill" / "metrics.json") or {}).get("teacher")
        if not teacher:
            return {}
        result = _single(teacher)
    return {baseline_name(_meta(root / "teacher").get("model")): result}


def other_teachers(root: Path) -> dict[str, Result]:
    """Further teachers trained side by side (``train_distillation.py --teacher_model A B ...``), one
    row per model: each finished ``teachers/<name>/`` folder's test ``metrics.json`` (its accuracy
    and interval), as :func:`utils.ablation.teacher_baselines` lists them; the stage's own teacher
    is :func:`default_teacher`'s row."""
    from utils.ablation import teacher_baselines

    return {baseline_name(row["model"]): Result([row["accuracy"]], [None], row["ci95"])
            for row in teacher_baselines(root.parent, root.name) if row["teacher"] is not None}


def _evaluation(path: Path) -> Result:
    """A VLM evaluation folder's result: ``metrics.json``'s accuracy and, for the interval, the
    per-image correctness from ``predictions.jsonl`` beside it (``label`` and ``pred`` per image)."""
    correct = None
    predictions = path.parent / "predictions.jsonl"
    if predictions.is_file():
        lines = [json.loads(line) for line in predictions.read_text(encoding="utf-8").splitlines() if line.strip()]
        correct = np.array([line.get("pred") == line["label"] for line in lines], dtype=bool)
    return _single(read_json(path), correct)


def zero_shot_vlms(root: Path) -> dict[str, Result]:
    """Base VLMs evaluated without an adapter (``train_vlm.py --eval_only --zero_shot``), one row per
    model and evaluation mode: ``vlm_zero_shot/<model name>/eval_<mode>/metrics.json`` (its
    ``accuracy``) and ``predictions.jsonl`` beside it (for the interval)."""
    return {f"zero-shot {path.parent.parent.name} ({path.parent.name.removeprefix('eval_')})": _evaluation(path)
            for path in sorted((root / "vlm_zero_shot").glob("*/eval_*/metrics.json"))}


def tuned_vlm(root: Path) -> dict[str, Result]:
    """The instruction-tuned VLM (stage 1's adapter) as stage 3 reads it: ``gate/metrics.json``'s
    ``vlm`` (its interval and predictions), else stage 1's own test evaluation,
    ``vlm/eval_score/metrics.json`` with ``predictions.jsonl`` (the same number, see docs/reproducing.md)."""
    gate = _read(root / "gate" / "metrics.json")
    if gate and gate.get("vlm"):
        return {TUNED_VLM: _single(gate["vlm"], _correct(gate.get("test_predictions"), "vlm"))}
    stage1 = root / "vlm" / "eval_score" / "metrics.json"
    return {TUNED_VLM: _evaluation(stage1)} if stage1.is_file() else {}


def _paper_heads(root: Path) -> list[tuple[str, object]]:
    """``(run name, DistillRecord)`` of stage 2's kept head runs at the paper's setting (depth 1, alpha
    0.5), every seed, distilled from the same teacher as the default head (``distill/meta.json``)."""
    default = _meta(root / "distill")
    if not (root / "distill" / "runs").is_dir():
        return []
    return [(name, record) for name, record in list_runs(root / "distill").items()
            if {k: setting_of(record)[k] for k in PAPER_SETTING} == PAPER_SETTING
            and record.teacher_id == default.get("teacher_id")]


def _published(root: Path) -> dict | None:
    """``gate/metrics.json`` when the head it fused is at the paper's setting (its ``head_run``, e.g.
    ``depth=1,alpha=0.5,seed=42``; a file too old to name it is taken as it is), else None."""
    gate = _read(root / "gate" / "metrics.json")
    if gate is None or not gate.get("head_run"):
        return gate
    setting = dict(part.partition("=")[::2] for part in gate["head_run"].split(","))
    return gate if all(setting.get(key) == f"{value:g}" for key, value in PAPER_SETTING.items()) else None


def distilled_head(root: Path) -> dict[str, Result]:
    """The distilled head at the paper's setting over its seeds: each kept run's
    ``distill/runs/depth=1,alpha=0.5,seed=S/metrics.json`` (``accuracy``; runs distilled from another
    teacher than the default head's are left out), its per-image predictions from a gate run on it
    (``gate/runs/<run>/seed=*/metrics.json``, ``test_predictions.head``). Without kept runs:
    ``gate/metrics.json``'s ``head`` if that head is at the paper's setting."""
    heads = _paper_heads(root)
    if not heads:
        gate = _published(root)
        if gate and gate.get("head"):
            return {HEAD: _single(gate["head"], _correct(gate.get("test_predictions"), "head"))}
        return {}
    result = Result([])
    for name, record in heads:
        result.accuracies.append(read_json(root / "distill" / "runs" / name / "metrics.json")["accuracy"])
        fused = gate_runs(root, name, record.head_id)
        result.correct.append(_correct(fused[0].get("test_predictions"), "head") if fused else None)
    return {HEAD: result}


def emovlm_kd(root: Path) -> dict[str, Result]:
    """EmoVLM-KD with the paper's gate (``concat_linear``), whichever gate a run selected: every gate
    seed on every head seed at the paper's setting, ``gate/runs/<head run>/seed=S/metrics.json``
    (``gates.concat_linear``: accuracy and ``test_predictions``; gate runs on a head since retrained
    are left out). Without kept runs: ``gate/metrics.json``'s ``gates.concat_linear`` if the head it
    fused is at the paper's setting. A run without a ``concat_linear`` gate is not counted."""
    runs = [metrics for name, record in _paper_heads(root) for metrics in gate_runs(root, name, record.head_id)]
    if not runs and _published(root):
        runs = [_published(root)]
    runs = [metrics for metrics in runs if PAPER_GATE in metrics.get("gates", {})]
    if not runs:
        return {}
    if len(runs) == 1:
        gate = runs[0]["gates"][PAPER_GATE]
        return {EMOVLM_KD: _single(gate, _correct(runs[0].get("test_predictions"), f"gates.{PAPER_GATE}"))}
    return {EMOVLM_KD: Result([m["gates"][PAPER_GATE]["accuracy"] for m in runs],
                              [_correct(m.get("test_predictions"), f"gates.{PAPER_GATE}") for m in runs])}


@dataclass(frozen=True)
class RowSource:
    """One kind of row: its source function and the rows the paper has, listed (as "not run") even
    where no run gave them (``placeholder`` stands for the kind when none of its rows was found)."""
    kind: str
    read: Callable[[Path], dict[str, Result]]
    rows: tuple[str, ...] = ()
    placeholder: str | None = None


# The paper's row order. To add a kind of row, add its source here.
ROW_SOURCES = (
    RowSource("conventional classifiers", default_teacher, tuple(BASELINES.values())),
    RowSource("conventional classifiers", other_teachers),
    RowSource("zero-shot VLMs", zero_shot_vlms, placeholder=ZERO_SHOT),
    RowSource("instruction-tuned VLM", tuned_vlm, (TUNED_VLM,)),
    RowSource("distilled head", distilled_head, (HEAD,)),
    RowSource("EmoVLM-KD", emovlm_kd, (EMOVLM_KD,)),
)


# ---------------------------------------------------------------- the table

def collect(output_dir: Path, datasets: list[str]) -> dict[str, dict[str, Result | None]]:
    """``{row label: {dataset: Result or None}}`` in the order of ROW_SOURCES (a label two sources
    give, e.g. a ViT-B/16 teacher trained twice, keeps the first source's result)."""
    table: dict[str, dict[str, Result | None]] = {}
    for source in ROW_SOURCES:
        found = {dataset: source.read(output_dir / dataset) for dataset in datasets}
        labels = list(source.rows) + [label for per in found.values() for label in per]
        if not labels and source.placeholder:
            labels = [source.placeholder]
        for label in dict.fromkeys(labels):
            row = table.setdefault(label, {dataset: None for dataset in datasets})
            for dataset in datasets:
                if row[dataset] is None:
                    row[dataset] = found[dataset].get(label)
    return table


def find_datasets(output_dir: Path, datasets: list[str] | None, where: str | None = None) -> list[str]:
    """The datasets named (each must be a folder of ``output_dir``), else every folder with a result
    (``where`` names the folder in the error, default ``output_dir``)."""
    if datasets:
        for dataset in datasets:
            if not (output_dir / dataset).is_dir():
                raise UserError(f"--datasets {dataset}: no folder {output_dir / dataset}; run its stages with "
                                f"--output_dir {output_dir} first")
        return list(datasets)
    found = sorted(p.name for p in output_dir.glob("*") if p.is_dir() and p.name != TABLES_DIR
                   and any(source.read(p) for source in ROW_SOURCES))
    if not found:
        raise UserError(f"{where or output_dir}: no results of any stage (e.g. <dataset>/gate/metrics.json); run "
                        f"the stages with --output_dir {output_dir} first")
    return found


def _paper(dataset: str, label: str) -> float | None:
    key = PAPER_ROW.get(label)
    return PAPER.get(dataset.lower(), {}).get(key) if key else None


def _has_paper(dataset: str) -> bool:
    return dataset.lower() in PAPER


def _pct(value: float) -> str:
    return f"{100 * value:.2f}"


def markdown_cells(result: Result | None) -> tuple[str, str]:
    """``(accuracy, interval)``: ``72.00`` or ``72.00 ± 2.83 (n=2)``, and ``[low, high]``; "not run"."""
    if result is None:
        return NOT_RUN, ""
    interval = result.interval()
    return _cell(result.accuracies), "" if interval is None else f"[{_pct(interval[0])}, {_pct(interval[1])}]"


def header(datasets: list[str]) -> list[str]:
    columns = ["method"]
    for dataset in datasets:
        columns += [f"{dataset} %", f"{dataset} 95% CI %"] + ([f"{dataset} paper %"] if _has_paper(dataset) else [])
    return columns


def markdown_rows(table: dict, datasets: list[str], prefix: list[str] = ()) -> list[list[str]]:
    rows = []
    for label, cells in table.items():
        row = [*prefix, label]
        for dataset in datasets:
            row += markdown_cells(cells[dataset])
            if _has_paper(dataset):
                paper = _paper(dataset, label)
                row.append("" if paper is None else f"{paper:.2f}")
        rows.append(row)
    return rows


CSV_HEADER = ["method", "dataset", "status", "runs", "accuracy_pct", "std_pct", "ci95_low_pct", "ci95_high_pct",
              "paper_pct"]


def csv_rows(table: dict, datasets: list[str], prefix: list[str] = ()) -> list[list]:
    """One line per method and dataset, numbers in percent to four decimals (empty where absent)."""
    rows = []
    for label, cells in table.items():
        for dataset in datasets:
            result, paper = cells[dataset], _paper(dataset, label)
            paper_text = "" if paper is None else f"{paper:.2f}"
            if result is None:
                rows.append([*prefix, label, dataset, NOT_RUN, 0, "", "", "", "", paper_text])
                continue
            mean, std = result.stats()
            interval = result.interval()
            low, high = ("", "") if interval is None else (f"{100 * interval[0]:.4f}", f"{100 * interval[1]:.4f}")
            rows.append([*prefix, label, dataset, "ok", result.n, f"{100 * mean:.4f}",
                         f"{100 * std:.4f}" if result.n > 1 else "", low, high, paper_text])
    return rows


NOTE = ("Test accuracy %: one run's, or mean ± sample standard deviation over the runs found (`n=`: seeds of "
        "the head; for EmoVLM-KD every gate seed on every head seed). 95% CI: percentile bootstrap over the test "
        "images (1,000 resamples, seed 0) of the accuracy averaged over those runs. Paper: arXiv 2505.07164, "
        "empty where the paper gives no number. `not run`: no results of that method in the output folder. "
        f"Conventional classifiers: teachers trained as plain classifiers (the default teacher, ViT-B/16 at 384 px, "
        f"is the paper's ViT-B/16 baseline); {EMOVLM_KD}: the paper's gate whichever gate a stage-3 run selected; "
        f"{HEAD}: distilled from the default teacher.")


def _markdown(columns: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _csv(columns: list[str], rows: list[list]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(rows)
    return buffer.getvalue()


def build_main_table(output_dir: str | Path, datasets: list[str] | None = None,
                     runs: list[str] | None = None) -> tuple[str, str]:
    """``(markdown, csv)`` of the main table of ``output_dir`` (or of every run of ``runs``,
    ``NAME=FOLDER`` each, a row per run and method); nothing is written here."""
    if runs:
        from utils.runs import parse_runs

        folders = parse_runs(runs)
        found = {name: find_datasets(folder, None, f"--runs {name}={folder}") for name, folder in folders.items()}
        names = datasets or sorted({d for per in found.values() for d in per})
        missing = [d for d in names if not any((folder / d).is_dir() for folder in folders.values())]
        if missing:
            raise UserError(f"--datasets {missing[0]}: in none of the --runs folders; runs there: "
                            + ", ".join(sorted({d for per in found.values() for d in per})))
        tables = {name: collect(folder, [d for d in names if (folder / d).is_dir()]) for name, folder in folders.items()}
        for table in tables.values():  # a dataset one run lacks: its cells "not run"
            for cells in table.values():
                for dataset in names:
                    cells.setdefault(dataset, None)
        md_rows = [row for name, table in tables.items() for row in markdown_rows(table, names, [name])]
        csv_lines = [row for name, table in tables.items() for row in csv_rows(table, names, [name])]
        text = (_markdown(["run", *header(names)], md_rows) + "\n\n" + NOTE + " Runs: "
                + ", ".join(f"`{name}` = `{folder}`" for name, folder in folders.items()) + ".")
        return text + "\n", _csv(["run", *CSV_HEADER], csv_lines)
    output_dir = Path(output_dir)
    datasets = find_datasets(output_dir, datasets)
    table = collect(output_dir, datasets)
    text = _markdown(header(datasets), markdown_rows(table, datasets)) + "\n\n" + NOTE
    return text + "\n", _csv(CSV_HEADER, csv_rows(table, datasets))


def write_main_table(output_dir: str | Path, markdown: str, table_csv: str, runs: bool = False) -> Path:
    """``<output_dir>/tables/main.md`` and ``main.csv`` (``main_runs.*`` for ``--runs``); the markdown's path."""
    stem = Path(output_dir) / TABLES_DIR / ("main_runs" if runs else "main")
    write_text(stem.with_suffix(".csv"), table_csv)
    return write_text(stem.with_suffix(".md"), markdown)
