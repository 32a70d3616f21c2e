"""Collect the final ``metrics.json`` of several datasets into one markdown table.

    python -m utils.report --output_dir outputs [--datasets FI emotion6] [--out results.md]

Numbers come from ``<output_dir>/<dataset>/gate/metrics.json`` (written by train_gate.py),
the paper's reported accuracies (METHOD.md) stand beside them, and the confusion-matrix and
curve pictures of each stage are linked.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

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


def dataset_rows(name: str, metrics: dict) -> list[list[str]]:
    """Table rows ``[dataset, model, accuracy, macro-F1, paper accuracy]`` of one dataset."""
    paper = PAPER.get(name.lower(), {})
    rows = []
    for label, key in ROWS:
        result = metrics.get(key)
        if result:
            rows.append([name, label, _pct(result["accuracy"]), _pct(result["macro_f1"]),
                         str(paper.get(label, ""))])
    for gate, result in metrics.get("gates", {}).items():
        chosen = gate == metrics.get("gate")
        label = f"EmoVLM-KD ({gate})" + (" *" if chosen and len(metrics["gates"]) > 1 else "")
        rows.append([name, label, _pct(result["accuracy"]), _pct(result["macro_f1"]),
                     str(paper.get("EmoVLM-KD", "")) if gate == "concat_linear" else ""])
    return rows


def markdown_table(rows: list[list[str]]) -> str:
    header = ["dataset", "model", "accuracy %", "macro-F1 %", "paper accuracy %"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def build_report(output_dir: str | Path, datasets: list[str] | None = None) -> str:
    output_dir = Path(output_dir)
    if datasets is None:
        datasets = sorted(p.parent.parent.name for p in output_dir.glob("*/gate/metrics.json"))
    if not datasets:
        raise UserError(f"{output_dir}: no */gate/metrics.json found; run train_gate.py first")
    rows, pictures = [], []
    for name in datasets:
        path = output_dir / name / "gate" / "metrics.json"
        if not path.is_file():
            raise UserError(f"{path}: missing; run `python train_gate.py --dataname {name}` first")
        rows += dataset_rows(name, read_json(path))
        links = [f"[{pic}]({name}/{pic})" for pic in PICTURES if (output_dir / name / pic).is_file()]
        if links:
            pictures.append(f"- {name}: " + ", ".join(links))
    text = markdown_table(rows)
    text += "\n\nAccuracy and macro-F1 on each dataset's test split; paper numbers from arXiv 2505.07164."
    if any(len(read_json(output_dir / n / "gate" / "metrics.json").get("gates", {})) > 1
           for n in datasets):
        text += " `*` marks the gate saved for the demo."
    if pictures:
        text += "\n\nPictures (paths relative to the output folder):\n" + "\n".join(pictures)
    return text + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Markdown table of results across datasets.")
    parser.add_argument("--output_dir", default="outputs")
    parser.add_argument("--datasets", nargs="*", default=None,
                        help="dataset names (default: every dataset with a gate/metrics.json)")
    parser.add_argument("--out", default=None, help="also write the table to this file")
    args = parser.parse_args(argv)
    text = build_report(args.output_dir, args.datasets)
    print(text)
    if args.out:
        write_text(args.out, text)


if __name__ == "__main__":
    sys.exit(run_cli(main))
