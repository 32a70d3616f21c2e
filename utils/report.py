"""Collect the final ``metrics.json`` of several datasets into one markdown table.

    python -m utils.report --output_dir outputs [--datasets FI emotion6] [--out results.md]
    python -m utils.report --datasets FI --ablation depth    # the paper's ablations: depth, alpha, gate, all
    python -m utils.report --datasets FI --ablation teacher  # a row per teacher: baseline, its head, EmoVLM-KD
    python -m utils.report --runs base=outputs other=outputs/other   # runs side by side, paired tests

Numbers come from ``<output_dir>/<dataset>/gate/metrics.json`` (written by train_gate.py),
the paper's reported accuracies (arXiv 2505.07164) stand beside them, and the confusion-matrix and
curve pictures of each stage are linked.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from utils.ablation import ABLATIONS, build_ablation
from utils.errors import UserError, run_cli
from utils.io import read_json, write_text

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


def dataset_rows(name: str, metrics: dict) -> list[list[str]]:
    """Table rows ``[dataset, model, accuracy, macro-F1, paper accuracy, 95% CI, McNemar p vs VLM,
    vs head]`` of one dataset (the last three empty where metrics.json has no statistics)."""
    paper = PAPER.get(name.lower(), {})
    rows = []
    for label, key in ROWS:
        result = metrics.get(key)
        if result:
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
        datasets = sorted(p.parent.parent.name for p in output_dir.glob("*/gate/metrics.json"))
    if not datasets:
        raise UserError(f"{output_dir}: no */gate/metrics.json found; run train_gate.py first")
    rows, pictures, extras = [], [], []
    for name in datasets:
        path = output_dir / name / "gate" / "metrics.json"
        if not path.is_file():
            raise UserError(f"{path}: missing; run `python train_gate.py --dataname {name}` first")
        metrics = read_json(path)
        rows += dataset_rows(name, metrics)
        if complementarity_table(metrics):
            extras.append(f"{name}, complementarity on the test split:\n\n{complementarity_table(metrics)}")
        links = [f"[{pic}]({name}/{pic})" for pic in PICTURES if (output_dir / name / pic).is_file()]
        if links:
            pictures.append(f"- {name}: " + ", ".join(links))
    text = markdown_table(rows)
    text += "\n\nAccuracy and macro-F1 on each dataset's test split; paper numbers from arXiv 2505.07164."
    if any(len(read_json(output_dir / n / "gate" / "metrics.json").get("gates", {})) > 1
           for n in datasets):
        text += " `*` marks the gate saved for the demo."
    if any(len(row) > 5 and row[5] for row in rows):
        text += (" 95% CI: percentile bootstrap over the test images (1,000 resamples, seed 0). McNemar: paired "
                 "test of each EmoVLM-KD row against the VLM alone and the head alone, exact binomial when fewer "
                 "than 25 images differ, otherwise chi-square with continuity correction.")
    if extras:
        text += "\n\n" + "\n\n".join(extras)
    if pictures:
        text += "\n\nPictures (paths relative to the output folder):\n" + "\n".join(pictures)
    return text + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Markdown table of results across datasets.")
    parser.add_argument("--output_dir", default="outputs")
    parser.add_argument("--datasets", nargs="*", default=None,
                        help="dataset names (default: every dataset with a gate/metrics.json)")
    parser.add_argument("--out", default=None, help="also write the table to this file")
    parser.add_argument("--ablation", choices=(*ABLATIONS, "all"), default=None,
                        help="instead of the main table: the paper's ablation of the head depth, the distillation "
                             "weight alpha or the gate type, or the teacher ablation (a row per teacher of "
                             "train_distillation.py --teacher_model A B C), or all, from the kept runs; writes a PNG "
                             "per table")
    parser.add_argument("--runs", nargs="+", metavar="NAME=FOLDER", default=None,
                        help="instead of the main table: several output folders side by side, a row per run and "
                             "module, a column per dataset, 95%% intervals, McNemar of each run against the first")
    args = parser.parse_args(argv)
    chosen = [flag for flag, value in (("--ablation", args.ablation), ("--runs", args.runs)) if value]
    if len(chosen) > 1:
        raise UserError(f"{' and '.join(chosen)}: choose one table")
    if args.runs:
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


if __name__ == "__main__":
    sys.exit(run_cli(main))
