"""The explorer tab of demo.py, without Gradio: a run's per-image records, their categories,
filters, sorting, paging, confusion matrices, and the safe resolution of image paths.

A run is either a finished stage 3 (``<output_dir>/<dataname>/gate/metrics.json``, its
``test_predictions`` and ``test_outputs``; every seed's run under ``gate/runs/``) or a file
predict.py wrote (JSON Lines or CSV, no labels). Nothing here loads a model: the tab opens from those
files and the images alone. Image paths are only ever resolved inside the run's image folder
(--data_root for stage 3, --images for predict.py's file): an absolute path or one with ``..`` is
refused.
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Sequence

from PIL import Image, ImageOps

from utils.errors import UserError
from utils.io import read_json

PUBLISHED = "published"
MODULES = ("vlm", "head", "final")  # final: EmoVLM-KD, the gate's prediction
MODULE_LABELS = {"vlm": "VLM", "head": "head", "final": "EmoVLM-KD", "teacher": "teacher"}

# Agreement categories; each is a predicate over one record (labelled or not).
LABELLED_CATEGORIES = {
    "all": "all images",
    "both_right": "both right",
    "vlm_only": "VLM only right",
    "head_only": "head only right",
    "both_wrong": "both wrong",
    "gate_overruled": "gate overruled a right module (EmoVLM-KD wrong, the VLM or the head right)",
    "gate_rescued": "gate rescued a wrong one (EmoVLM-KD right, the VLM or the head wrong)",
}
UNLABELLED_CATEGORIES = {
    "all": "all images",
    "disagree": "VLM and head disagree",
    "followed_vlm": "gate followed the VLM (where they disagree)",
    "followed_head": "gate followed the head (where they disagree)",
}
# The complementarity table's cells (utils.stats.complementarity's keys), A = the VLM, B = the other.
CELLS = ("both_right", "a_only", "b_only", "both_wrong")
SORTS = ("index", "confidence (high first)", "confidence (low first)", "gate weight (high first)",
         "gate weight (low first)")


@dataclass
class Record:
    """One image: its path relative to the run's image folder, the true class (None without labels)
    and each module's predicted class index (-1: the VLM's answer named no class)."""
    image: str
    label: int | None
    vlm: int
    head: int
    final: int
    teacher: int | None = None
    probs: dict = field(default_factory=dict)    # {"vlm"|"head"|"final": [C floats]} where known
    weights: dict | None = None                  # {source name: weight} for gates that expose them

    def right(self, module: str) -> bool:
        return getattr(self, module) == self.label

    @property
    def confidence(self) -> float | None:
        """EmoVLM-KD's probability for its own prediction."""
        probs = self.probs.get("final")
        return max(probs) if probs else None


@dataclass
class Run:
    name: str
    class_names: list[str]
    records: list[Record]
    image_root: Path
    labelled: bool = True
    gate: str | None = None
    complementarity: dict | None = None
    source: Path | None = None

    @property
    def categories(self) -> dict[str, str]:
        return LABELLED_CATEGORIES if self.labelled else UNLABELLED_CATEGORIES

    @property
    def weight_names(self) -> list[str]:
        return next((list(r.weights) for r in self.records if r.weights), [])

    def index_of(self, image: str) -> int | None:
        if not hasattr(self, "_by_image"):
            self._by_image = {record.image: i for i, record in enumerate(self.records)}
        return self._by_image.get(image)


# ----------------------------------------------------------------------------- finding and reading runs

def gate_command(dataname: str) -> str:
    return f"python train_gate.py --dataname {dataname}"


def stage3_runs(output_dir: str | Path, dataname: str) -> dict[str, Path]:
    """``{run name: metrics.json}``: the published run first (``gate/``), then every seed's run
    under ``gate/runs/<head run>/seed=<seed>/``, by name."""
    gate_dir = Path(output_dir) / dataname / "gate"
    runs = {}
    if (gate_dir / "metrics.json").is_file():
        runs[PUBLISHED] = gate_dir / "metrics.json"
    for path in sorted((gate_dir / "runs").glob("*/*/metrics.json")):
        runs[f"{path.parent.parent.name}/{path.parent.name}"] = path
    return runs


def load_stage3_run(path: str | Path, data_root: str | Path, dataname: str, name: str = PUBLISHED) -> Run:
    """A finished stage 3's test images from its metrics.json; a missing or stale file (one an older
    train_gate.py wrote, without the per-image outputs) names the command to rerun."""
    path = Path(path)
    rerun = gate_command(dataname)
    if not path.is_file():
        raise UserError(f"{path}: missing (stage 3 did not finish); run `{rerun}`")
    metrics = read_json(path)
    preds, outputs = metrics.get("test_predictions"), metrics.get("test_outputs")
    if not preds or not outputs or not outputs.get("images"):
        raise UserError(f"{path}: written by an older train_gate.py (no per-image test outputs); rerun `{rerun}`")
    n = len(preds["labels"])
    gate = metrics.get("gate")
    final = preds["gates"].get(gate) if gate else None
    if final is None or any(len(values) != n for values in (preds["vlm"], preds["head"], final, outputs["images"])):
        raise UserError(f"{path}: its test predictions do not fit together (a damaged or stale file); rerun `{rerun}`")
    teacher = preds.get("teacher")
    weights = outputs.get("gate_weights")
    records = []
    for i in range(n):
        probs = {module: outputs[f"{module}_probs"][i] for module in MODULES if outputs.get(f"{module}_probs")}
        records.append(Record(image=outputs["images"][i], label=preds["labels"][i], vlm=preds["vlm"][i],
                              head=preds["head"][i], final=final[i],
                              teacher=None if teacher is None else teacher[i], probs=probs,
                              weights=None if not weights else {k: v[i] for k, v in weights.items()}))
    return Run(name=name, class_names=list(metrics["class_names"]), records=records, image_root=Path(data_root),
               gate=gate, complementarity=metrics.get("complementarity"), source=path)


def load_predictions(path: str | Path, images: str | Path) -> Run:
    """predict.py's output file, JSON Lines or CSV (told by its first line, as ``--format`` may have
    written either under any name), as an unlabelled run over the folder ``images``."""
    path, images = Path(path), Path(images)
    if not path.is_file():
        raise UserError(f"--predictions {path}: no such file; write it with `python predict.py --images {images} "
                        f"--out {path}`")
    if not images.is_dir():
        raise UserError(f"--images {images}: no such folder")
    with open(path, encoding="utf-8", errors="replace") as fh:
        lines = fh.read().split("\n")  # line breaks only (a text may hold other Unicode separators)
    start = next((i for i, line in enumerate(lines) if line.strip()), 0)
    rows = _csv_rows(lines, start) if lines[start].startswith("image,") else _jsonl_rows(lines)
    records, class_names, gate = [], None, None
    for number, row in rows:
        try:
            if isinstance(row, Exception):
                raise row
            if not row.get("image"):
                raise ValueError("no image")
            names = list(row["final_probs"])
            class_names = class_names or names
            if names != class_names:
                raise ValueError("another run's classes")
            index = {name: i for i, name in enumerate(class_names)}
            probs = {module: [float(row[f"{module}_probs"][c]) for c in class_names] for module in MODULES}
            weights = row.get("gate_weights") or None
            records.append(Record(image=str(row["image"]), label=None, vlm=index.get(row.get("vlm_label"), -1),
                                  head=index[row["head_label"]], final=index[row["final_label"]], probs=probs,
                                  weights=None if weights is None else {k: float(v) for k, v in weights.items()}))
            gate = gate or row.get("gate")
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise UserError(f"--predictions {path}: line {number} is not a predict.py record ({err}); "
                            "write a JSON Lines or CSV file with predict.py") from None
    if not records:
        raise UserError(f"--predictions {path}: holds no predictions")
    return Run(name=path.name, class_names=class_names, records=records, image_root=images, labelled=False,
               gate=gate, source=path)


def _jsonl_rows(lines: list[str]):
    """``(line number, record or the error reading it)`` per non-empty line of a JSON Lines file."""
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                yield number, json.loads(line)
            except ValueError as err:
                yield number, err


def _csv_rows(lines: list[str], start: int):
    """``(line number, record or the error reading it)`` per row of predict.py's CSV file (its header
    on line ``start + 1``), its ``<field>.<name>`` columns nested back into the JSON Lines record's
    dicts (engine.predict_folder.csv_columns); an empty cell is None, an empty ``gate_weights`` (a
    gate without source weights) too."""
    header = next(csv.reader(lines[start:start + 1]))
    nested = {field: [column.split(".", 1)[1] for column in header if column.startswith(field + ".")]
              for field in (*(f"{module}_probs" for module in MODULES), "gate_weights")}
    for number, row in enumerate(csv.reader(lines[start + 1:]), start=start + 2):
        if not row:
            continue
        if len(row) != len(header):
            yield number, ValueError(f"{len(row)} columns, not the header's {len(header)}")
            continue
        flat = dict(zip(header, row))
        record = {key: value or None for key, value in flat.items() if "." not in key}
        for field, names in nested.items():
            values = {name: flat[f"{field}.{name}"] for name in names}
            record[field] = None if not any(values.values()) else values
        yield number, record


# ----------------------------------------------------------------------------- categories and filters

def in_category(record: Record, category: str) -> bool:
    if category == "all":
        return True
    if record.label is None:
        disagree = record.vlm != record.head
        return {"disagree": disagree, "followed_vlm": disagree and record.final == record.vlm,
                "followed_head": disagree and record.final == record.head}[category]
    vlm, head, final = record.right("vlm"), record.right("head"), record.right("final")
    return {"both_right": vlm and head, "vlm_only": vlm and not head, "head_only": head and not vlm,
            "both_wrong": not vlm and not head, "gate_overruled": not final and (vlm or head),
            "gate_rescued": final and not (vlm and head)}[category]


def in_cell(record: Record, pair: str, cell: str) -> bool:
    """Whether ``record`` falls in a complementarity cell: ``pair`` "vlm_vs_head" or "vlm_vs_teacher"."""
    other = pair.removeprefix("vlm_vs_")
    a, b = record.right("vlm"), record.right(other)
    return {"both_right": a and b, "a_only": a and not b, "b_only": b and not a, "both_wrong": not a and not b}[cell]


@dataclass
class Query:
    category: str = "all"
    cell: tuple[str, str] | None = None             # (pair, cell) of the complementarity table
    confusion: tuple[str, int, int] | None = None   # (module, true class, predicted class; -1: none)
    either_right: str | None = None                 # a pair's oracle cell: the VLM or the other right
    final_right: bool | None = None                 # the gate's accuracy cell: EmoVLM-KD right
    true_class: int | None = None
    pred_module: str = "final"
    pred_class: int | None = None
    min_confidence: float = 0.0
    max_confidence: float = 1.0
    sort: str = "index"


def select(run: Run, query: Query) -> list[int]:
    """The indices of the run's records matching every part of ``query``, in its order."""
    if query.category not in run.categories:
        raise UserError(f"unknown category {query.category!r}; one of {', '.join(run.categories)}")
    if query.sort not in SORTS:
        raise UserError(f"unknown sort {query.sort!r}; one of {', '.join(SORTS)}")
    chosen = []
    for i, record in enumerate(run.records):
        if not in_category(record, query.category):
            continue
        if query.cell and (record.label is None or not in_cell(record, *query.cell)):
            continue
        if query.either_right and (record.label is None or not (record.right("vlm") or record.right(
                query.either_right.removeprefix("vlm_vs_")))):
            continue
        if query.final_right is not None and (record.label is None or record.right("final") != query.final_right):
            continue
        if query.confusion:
            module, true, pred = query.confusion
            if record.label != true or getattr(record, module) != pred:
                continue
        if query.true_class is not None and record.label != query.true_class:
            continue
        if query.pred_class is not None and getattr(record, query.pred_module) != query.pred_class:
            continue
        confidence = record.confidence
        if confidence is not None and not query.min_confidence - 1e-9 <= confidence <= query.max_confidence + 1e-9:
            continue
        chosen.append(i)
    return sort_indices(run, chosen, query.sort)


def sort_indices(run: Run, indices: list[int], sort: str) -> list[int]:
    if sort == "index":
        return indices
    high_first = "high first" in sort
    if sort.startswith("confidence"):
        def key(i):
            return run.records[i].confidence or 0.0
    else:  # the gate's weight on its first source (the VLM for dynamic_weight); 0 where none
        name = (run.weight_names or [None])[0]

        def key(i):
            weights = run.records[i].weights
            return weights.get(name, 0.0) if weights else 0.0
    return sorted(indices, key=lambda i: (-key(i) if high_first else key(i), i))


def parse_selection(text: str | None) -> dict:
    """The ``Query`` fields a clicked table cell stands for, from its text form: "" (none),
    ``cell:<pair>:<cell>``, ``oracle:<pair>``, ``gate:right``, ``confusion:<module>:<true>:<pred>``
    or ``category:<name>``."""
    parts = (text or "").strip().split(":")
    try:
        if parts == [""]:
            return {}
        if parts[0] == "cell" and len(parts) == 3 and parts[1] in ("vlm_vs_head", "vlm_vs_teacher") \
                and parts[2] in CELLS:
            return {"cell": (parts[1], parts[2])}
        if parts[0] == "oracle" and len(parts) == 2 and parts[1] in ("vlm_vs_head", "vlm_vs_teacher"):
            return {"either_right": parts[1]}
        if parts == ["gate", "right"]:
            return {"final_right": True}
        if parts[0] == "confusion" and len(parts) == 4 and parts[1] in MODULES:
            return {"confusion": (parts[1], int(parts[2]), int(parts[3]))}
        if parts[0] == "category" and len(parts) == 2:
            return {"category": parts[1]}
    except ValueError:
        pass
    raise UserError(f"selection {text!r} is not a table cell")


def describe_selection(run: Run, text: str | None) -> str:
    """A selection in words."""
    picked = parse_selection(text)
    if "cell" in picked:
        pair, cell = picked["cell"]
        other = MODULE_LABELS[pair.removeprefix("vlm_vs_")]
        return {"both_right": f"VLM and {other} both right", "a_only": f"VLM right, {other} wrong",
                "b_only": f"{other} right, VLM wrong", "both_wrong": f"VLM and {other} both wrong"}[cell]
    if "either_right" in picked:
        return f"VLM or {MODULE_LABELS[picked['either_right'].removeprefix('vlm_vs_')]} right (oracle)"
    if "final_right" in picked:
        return "EmoVLM-KD right"
    if "confusion" in picked:
        module, true, pred = picked["confusion"]
        return f"true {class_name(run, true)}, {MODULE_LABELS[module]} predicted {class_name(run, pred)}"
    if "category" in picked:
        return run.categories.get(picked["category"], picked["category"])
    return "no table cell"


def page(indices: Sequence[int], number: int, size: int) -> tuple[list[int], int, int]:
    """``(the indices on page number (1-based, clamped), that page's number, the number of pages)``."""
    pages = max(1, math.ceil(len(indices) / size))
    number = min(max(1, int(number)), pages)
    return list(indices[(number - 1) * size:number * size]), number, pages


# ----------------------------------------------------------------------------- tables

def complementarity_counts(run: Run) -> dict[str, dict]:
    """``{pair: {cell: count, "n", "oracle_accuracy"}}`` recomputed from the records (VLM against the
    head, and against the teacher where its predictions exist), with the gate's accuracy."""
    if not run.labelled:
        return {}
    pairs = ["vlm_vs_teacher"] if all(r.teacher is not None for r in run.records) and run.records else []
    result = {}
    for pair in pairs + ["vlm_vs_head"]:
        counts = {cell: sum(in_cell(r, pair, cell) for r in run.records) for cell in CELLS}
        n = len(run.records)
        result[pair] = {"n": n, **counts, "oracle_accuracy": (n - counts["both_wrong"]) / n if n else 0.0}
    return result


def gate_accuracy(run: Run) -> float | None:
    if not run.labelled or not run.records:
        return None
    return sum(r.right("final") for r in run.records) / len(run.records)


def confusion_matrix(run: Run, module: str) -> list[list[int]]:
    """Rows: true classes; columns: predicted classes, then "none" (no class read from the answer)."""
    size = len(run.class_names)
    matrix = [[0] * (size + 1) for _ in range(size)]
    for record in run.records:
        if record.label is not None:
            matrix[record.label][getattr(record, module) if getattr(record, module) >= 0 else size] += 1
    return matrix


def class_name(run: Run, index: int | None) -> str:
    if index is None:
        return "?"
    return run.class_names[index] if 0 <= index < len(run.class_names) else "none"


def caption(run: Run, record: Record) -> str:
    """``true: x | VLM: y ✓ | head: z ✗ | EmoVLM-KD: y ✓`` (no marks without labels)."""
    def shown(module):
        pred = getattr(record, module)
        mark = "" if record.label is None else (" ✓" if pred == record.label else " ✗")
        return f"{MODULE_LABELS[module]}: {class_name(run, pred)}{mark}"
    head = f"true: {class_name(run, record.label)} | " if record.label is not None else ""
    return head + " | ".join(shown(module) for module in MODULES)


# ----------------------------------------------------------------------------- paths and thumbnails

def safe_image_path(root: str | Path, image: str) -> Path:
    """``root/image`` when ``image`` is a relative path that stays inside ``root`` (links resolved);
    an absolute path, a ``..`` or a path leading outside is refused."""
    text = str(image)
    parts = PurePosixPath(text.replace("\\", "/")).parts
    if not text or PurePosixPath(text).is_absolute() or PureWindowsPath(text).is_absolute() \
            or PureWindowsPath(text).drive or ".." in parts:
        raise UserError(f"{image}: refused (only paths inside the run's image folder are served)")
    root = Path(root).resolve()
    path = (root / text).resolve()
    if not path.is_relative_to(root):
        raise UserError(f"{image}: refused (only paths inside the run's image folder are served)")
    return path


def default_thumbnail_folder() -> Path:
    return Path(tempfile.gettempdir()) / "emovlm-kd-thumbnails"


class Thumbnails:
    """Thumbnails made on demand and cached on disk (``folder``), one file per image and size."""

    def __init__(self, folder: str | Path, side: int = 192):
        self.folder, self.side = Path(folder), side
        self.folder.mkdir(parents=True, exist_ok=True)

    def get(self, path: Path) -> Path:
        stat = path.stat()
        key = hashlib.sha1(f"{path}|{stat.st_mtime_ns}|{stat.st_size}|{self.side}".encode()).hexdigest()[:20]
        thumb = self.folder / f"{key}.jpg"
        if not thumb.is_file():
            with Image.open(path) as img:
                img = ImageOps.exif_transpose(img)
                img.draft("RGB", (self.side, self.side))
                img = img.convert("RGB")
                img.thumbnail((self.side, self.side))
                partial = thumb.with_suffix(".part.jpg")
                img.save(partial, "JPEG", quality=85)
                partial.replace(thumb)
        return thumb

    def placeholder(self) -> Path:
        """A grey square for an image that cannot be shown (gone, refused, undecodable)."""
        path = self.folder / f"placeholder-{self.side}.png"
        if not path.is_file():
            Image.new("RGB", (self.side, self.side), (200, 200, 200)).save(path)
        return path
