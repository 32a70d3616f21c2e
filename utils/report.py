"""Collect the final ``metrics.json`` of several datasets into one markdown table.

    python -m utils.report --output_dir outputs [--datasets FI emotion6] [--out results.md]
    python -m utils.report --datasets FI --ablation depth    # the paper's ablations: depth, alpha, gate, all
    python -m utils.report --datasets FI --ablation teacher  # a row per teacher: baseline, its head, EmoVLM-KD
    python -m utils.report --runs base=outputs other=outputs/other   # runs side by side, paired tests
    python -m utils.report --table main    # the paper's main table: a row per method, <output_dir>/tables/main.md, .csv

Numbers come from ``<output_dir>/<dataset>/gate/metrics.json`` (written by train_gate.py) and the
zero-shot evaluations of base VLMs, ``<output_dir>/<dataset>/vlm_zero_shot/<model name>/eval_<mode>/
metrics.json`` (``train_vlm.py --eval_only --zero_shot``; :func:`zero_shot_results`); the VLM row
names the tasks stage 1 trained on when they are not all three (:func:`vlm_tasks`). The paper's
reported accuracies (arXiv 2505.07164) stand beside them, and the confusion-matrix and curve
pictures of each stage are linked.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from utils.ablation import ABLATIONS, build_ablation
from utils.errors import UserError, run_cli
from utils.io import read_json, write_text
from utils.records import TASKS, ZeroShotRecord

# Reported accuracy (%) in the paper, by dataset (lower-case) and row.
PAPER = {
    "fi": {"VLM": 71.19, "teacher": 68.86, "EmoVLM-KD": 79.51},
    "emotion6": {"EmoVLM-KD": 73.91},
    "flickr": {"EmoVLM-KD": 88.90},
    "instagram": {"EmoVLM-KD": 89.59},
}

ROWS = (("VLM", "vlm"), ("distill module", "head"), ("teacher", "teacher"))
PICTURES = ("vlm/curves.png", "vlm/eval_score/confusion_matrix.png",
            "vlm/eval_generate/confusion_matrix.png", "teacher/curves.png",
            "teacher/confusion_matrix.png", "distill/curves.png", "distill/confusion_matrix.png",
            "gate/curves.png", "gate/confusion_matrix.png")


def _pct(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.2f}"


def _ci(result: dict) -> str:
    interval = result.get("ci95")
    return "" if not interval else f"[{100 * interval[0]:.2f}, {100 * interval[1]:.2f}]"


def _p(test: dict | None) -> str:
    return "" if not test else f"{test['p_value']:.3g}"


@dataclass(frozen=True)
class ZeroShotResult:
    """One zero-shot evaluation of a base VLM on a dataset's test split."""
    name: str         # the folder name, the base's last path part (e.g. Qwen2-VL-7B-Instruct)
    base_model: str   # the hub id or local folder evaluated
    mode: str         # score or generate
    metrics: dict     # its metrics.json (accuracy, macro_f1, ci95, ...)
    path: Path        # that metrics.json

    @property
    def label(self) -> str:
        return f"zero-shot {self.name} ({self.mode})"


def zero_shot_results(output_dir: str | Path, dataset: str) -> list[ZeroShotResult]:
    """Every zero-shot evaluation kept for ``dataset`` under ``output_dir``
    (``<dataset>/vlm_zero_shot/<model name>/eval_<mode>/metrics.json`` marked ``zero_shot``), by
    name then mode; none: an empty list."""
    folder = Path(output_dir) / dataset / ZeroShotRecord.STAGE
    results = []
    for path in sorted(folder.glob("*/eval_*/metrics.json")):
        metrics = read_json(path)
        if metrics.get("zero_shot"):
            results.append(ZeroShotResult(path.parent.parent.name, metrics.get("base_model") or path.parent.parent.name,
                                          metrics.get("mode") or path.parent.name.removeprefix("eval_"), metrics, path))
    return results


def stage1_metrics(output_dir: str | Path, dataset: str) -> dict | None:
    """Stage 1's own test evaluation of the tuned VLM (``vlm/eval_score/metrics.json``, else
    ``eval_generate``): the VLM row of a dataset stage 3 has not run on yet; None without one."""
    for mode in ("score", "generate"):
        path = Path(output_dir) / dataset / "vlm" / f"eval_{mode}" / "metrics.json"
        if path.is_file():
            return read_json(path)
    return None


def vlm_tasks(output_dir: str | Path, dataset: str) -> list[str] | None:
    """The tasks stage 1 trained ``dataset``'s VLM on (``vlm/meta.json``'s ``tasks``) when they are
    not all three; None when they are, or when no record says (an older folder trained all three)."""
    path = Path(output_dir) / dataset / "vlm" / "meta.json"
    tasks = read_json(path).get("tasks") if path.is_file() else None
    return None if not tasks or set(tasks) == set(TASKS) else list(tasks)


def vlm_label(tasks: list[str] | None) -> str:
    """The VLM row's name: ``VLM``, or with fewer tasks e.g. ``VLM (categorical only)``."""
    return "VLM" if not tasks else f"VLM ({', '.join(tasks)} only)"


def dataset_rows(name: str, metrics: dict, zero_shot: list[ZeroShotResult] = (),
                 tasks: list[str] | None = None) -> list[list[str]]:
    """Table rows ``[dataset, model, accuracy, macro-F1, paper accuracy, 95% CI, McNemar p vs VLM,
    vs head]`` of one dataset (the last three empty where metrics.json has no statistics): the
    ``zero_shot`` results first, then the modules of stage 3's ``metrics`` (the VLM row named after
    its ``tasks`` when not all three)."""
    paper = PAPER.get(name.lower(), {})
    rows = [[name, result.label, _pct(result.metrics["accuracy"]), _pct(result.metrics["macro_f1"]), "",
             _ci(result.metrics), "", ""] for result in zero_shot]
    for label, key in ROWS:
        result = metrics.get(key)
        if result:
            if key == "vlm":
                label = vlm_label(tasks)
            rows.append([name, label, _pct(result["accuracy"]), _pct(result["macro_f1"]),
                         str(paper.get(label, "")), _ci(result), "", ""])
    for gate, result in metrics.get("gates", {}).items():
        chosen = gate == metrics.get("gate")
        label = f"EmoVLM-KD ({gate})" + (" *" if chosen and len(metrics["gates"]) > 1 else "")
        rows.append([name, label, _pct(result["accuracy"]), _pct(result["macro_f1"]),
                     str(paper.get("EmoVLM-KD", "")) if gate == "concat_linear" else "", _ci(result),
                     _p(result.get("mcnemar_vs_vlm")), _p(result.get("mcnemar_vs_head"))])
    return rows


def complementarity_table(metrics: dict) -> str:
    """The VLM against the teacher and against the head on the test split: the 2x2 counts and the
    oracle accuracy (right when either is right), beside the selected gate's accuracy."""
    pairs = metrics.get("complementarity") or {}
    rows = [[f"VLM vs {key.removeprefix('vlm_vs_')}", str(c["both_right"]), str(c["a_only"]), str(c["b_only"]),
             str(c["both_wrong"]), _pct(c["oracle_accuracy"]), _pct(pairs["gate_accuracy"])]
            for key, c in pairs.items() if key.startswith("vlm_vs_")]
    if not rows:
        return ""
    header = ["test images", "both right", "VLM only right", "other only right", "both wrong",
              "oracle accuracy %", f"EmoVLM-KD ({metrics.get('gate')}) accuracy %"]
    return (markdown_table(rows, header) + "\n\nOracle: right when either model is right, the ceiling of any "
            "gate choosing between the two per image.")


HEADER = ["dataset", "model", "accuracy %", "macro-F1 %", "paper accuracy %", "95% CI %",
          "McNemar p vs VLM", "McNemar p vs head"]


def markdown_table(rows: list[list[str]], header: list[str] | None = None) -> str:
    header = header or HEADER
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def build_report(output_dir: str | Path, datasets: list[str] | None = None) -> str:
    output_dir = Path(output_dir)
    if datasets is None:
        datasets = sorted({p.parent.parent.name for p in output_dir.glob("*/gate/metrics.json")}
                          | {p.parent.parent.parent.name for p in output_dir.glob("*/vlm/eval_*/metrics.json")}
                          | {p.parent.parent.parent.parent.name for p in
                             output_dir.glob(f"*/{ZeroShotRecord.STAGE}/*/eval_*/metrics.json")})
    if not datasets:
        raise UserError(f"{output_dir}: no */gate/metrics.json found; run train_gate.py first")
    rows, pictures, extras, gates = [], [], [], []
    for name in datasets:
        path = output_dir / name / "gate" / "metrics.json"
        zero_shot, stage1 = zero_shot_results(output_dir, name), stage1_metrics(output_dir, name)
        if not path.is_file() and not zero_shot and stage1 is None:
            raise UserError(f"{path}: missing; run `python train_gate.py --dataname {name}` first")
        # Before stage 3: the VLM row from stage 1's evaluation (the same number), and the zero-shot rows.
        metrics = read_json(path) if path.is_file() else {"vlm": stage1} if stage1 else {}
        gates.append(len(metrics.get("gates", {})))
        rows += dataset_rows(name, metrics, zero_shot, vlm_tasks(output_dir, name))
        if complementarity_table(metrics):
            extras.append(f"{name}, complementarity on the test split:\n\n{complementarity_table(metrics)}")
        links = [f"[{pic}]({name}/{pic})" for pic in PICTURES if (output_dir / name / pic).is_file()]
        links += [f"[{pic}]({name}/{pic})" for pic in (result.path.relative_to(output_dir / name).parent.as_posix()
                                                       + "/confusion_matrix.png" for result in zero_shot)
                  if (output_dir / name / pic).is_file()]
        if links:
            pictures.append(f"- {name}: " + ", ".join(links))
    text = markdown_table(rows)
    text += "\n\nAccuracy and macro-F1 on each dataset's test split; paper numbers from arXiv 2505.07164."
    if any(count > 1 for count in gates):
        text += " `*` marks the gate saved for the demo."
    if any(len(row) > 5 and row[5] for row in rows):
        text += (" 95% CI: percentile bootstrap over the test images (1,000 resamples, seed 0). McNemar: paired "
                 "test of each EmoVLM-KD row against the VLM alone and the head alone, exact binomial when fewer "
                 "than 25 images differ, otherwise chi-square with continuity correction.")
    if any(row[1].startswith("zero-shot ") for row in rows):
        text += (" Zero-shot: the base VLM without an adapter, asked the same categorical question and read by "
                 "the same scorer (score) or parser (generate) as the tuned VLM.")
    if extras:
        text += "\n\n" + "\n\n".join(extras)
    if pictures:
        text += "\n\nPictures (paths relative to the output folder):\n" + "\n".join(pictures)
    return text + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Markdown table of results across datasets.")
    parser.add_argument("--output_dir", default="outputs")
    parser.add_argument("--datasets", nargs="*", default=None,
                        help="dataset names (default: every dataset with a gate/metrics.json; with --table main, "
                             "every dataset with results of any stage)")
    parser.add_argument("--out", default=None, help="also write the table to this file")
    parser.add_argument("--ablation", choices=(*ABLATIONS, "all"), default=None,
                        help="instead of the results table: the paper's ablation of the head depth, the "
                             "distillation weight alpha or the gate type, or the teacher ablation (a row per teacher "
                             "of train_distillation.py --teacher_model A B C), or all, from the kept runs; writes a "
                             "PNG per table")
    parser.add_argument("--runs", nargs="+", metavar="NAME=FOLDER", default=None,
                        help="instead of the results table: several output folders side by side, a row per run and "
                             "module, a column per dataset, 95%% intervals, McNemar of each run against the first")
    parser.add_argument("--table", choices=("main",), default=None,
                        help="the paper's main table: a row per method (conventional classifiers, zero-shot VLMs, the "
                             "tuned VLM, the head, EmoVLM-KD), a column per dataset, the paper's numbers beside ours; "
                             "writes <output_dir>/tables/main.md and main.csv (with --runs: a row per run and method, "
                             "tables/main_runs.*)")
    args = parser.parse_args(argv)
    # --table main --runs: the main table of several output folders, a row per run and method
    chosen = [flag for flag, value in (("--ablation", args.ablation), ("--table", args.table),
                                       ("--runs", args.runs and not args.table)) if value]
    if len(chosen) > 1:
        raise UserError(f"{' and '.join(chosen)}: choose one table")
    if args.table:
        from utils.main_table import build_main_table, write_main_table

        text, table_csv = build_main_table(args.output_dir, args.datasets, args.runs)
        written = write_main_table(args.output_dir, text, table_csv, runs=bool(args.runs))
    elif args.runs:
        from utils.runs import build_runs

        text = build_runs(args.runs, args.datasets)
    elif args.ablation:
        datasets = args.datasets or sorted(p.name for p in Path(args.output_dir).glob("*") if (p / "distill").is_dir())
        if not datasets:
            raise UserError(f"--output_dir {args.output_dir}: no dataset with stage-2 outputs; pass --datasets")
        text = build_ablation(args.output_dir, datasets, args.ablation)
    else:
        text = build_report(args.output_dir, args.datasets)
    print(text)
    if args.out:
        write_text(args.out, text)
    if args.table:
        print(f"written: {written} and {written.with_suffix('.csv').name} beside it")


if __name__ == "__main__":
    sys.exit(run_cli(main))
