"""predict.py's library: the trained EmoVLM-KD on every image of a folder, one record per image.

Records go to a JSON Lines file (one object per image) or a CSV file (one row per image, a
column per class probability). Runs resume: images already in the output are skipped, and an
unfinished last line left by a killed run is cut; every line resumed from is checked first (a
record of this run's classes, each probability a finite number in [0, 1], each distribution summing
to 1), and a damaged one is refused, naming the file and line: delete it and the rerun predicts
that image again. A prediction with a non-finite number is never written: it stops the run, naming
the image. Under torchrun the images still to predict
are sharded (utils.dist): each rank appends to its own part file, which rank 0 merges in rank
order, so the file is the one a single process writes; a killed run's part files are merged
at the start of the next one.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
from pathlib import Path
from typing import Sequence

from tqdm.auto import tqdm

from data.datasets import is_image_file, open_image
from utils.dist import barrier, distributed_rank, is_main_process, merge_part_files, part_file, shard_map
from utils.errors import UserError
from utils.io import read_utf8, repair_tail

FORMATS = ("jsonl", "csv")
PROBABILITY_FIELDS = ("final_probs", "vlm_probs", "head_probs")  # one distribution over the classes each
log = logging.getLogger(__name__)


def list_images(folder: str | Path, out: str | Path | None = None) -> list[str]:
    """Image paths under ``folder`` (recursively, the dataset layer's rules), relative, sorted;
    never the output file ``out`` or its part files (an ``--out`` named like an image, in the folder)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"--images {folder}: no such folder")
    images = sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*")
                    if is_image_file(path) and not (out is not None and is_output_file(path, out)))
    if not images:
        raise UserError(f"--images {folder}: no images (.jpg .jpeg .png .webp .bmp .gif) in it or below it")
    return images


def is_output_file(path: Path, out: str | Path) -> bool:
    """Whether ``path`` is the output file ``out`` or one of its part files (``<out>.part<rank>``)."""
    out = Path(out)
    if not path.name.startswith(out.name):
        return False
    rest = path.name[len(out.name):]
    if rest and not (rest.startswith(".part") and rest[len(".part"):].isdigit()):
        return False
    return path.parent.resolve() == out.parent.resolve()


def output_format(out: str | Path, fmt: str | None) -> str:
    """``--format``, by default ``csv`` for a ``.csv`` file and ``jsonl`` otherwise."""
    if fmt is not None:
        return fmt
    return "csv" if Path(out).suffix.lower() == ".csv" else "jsonl"


def prediction_record(image: str, result: dict, explain: bool) -> dict:
    """One image's record from ``EmoVLMKD.predict_batch``'s result (probabilities by class name)."""
    record = {"image": image, "final_label": result["final_label"], "final_probs": result["final_probs"],
              "vlm_label": result["vlm_label"], "vlm_answer": result["vlm_answer"],
              "vlm_probs": result["vlm_probs"], "head_label": result["head_label"],
              "head_probs": result["head_probs"], "gate": result["gate"], "gate_weights": result["gate_weights"]}
    if explain:
        record["key_elements"], record["reasoning"] = result["observation"], result["reasoning"]
    return record


def non_finite(record: dict) -> list[str]:
    """The fields of a prediction record holding a NaN or an infinity (probabilities, gate weights)."""
    return [field for field in (*PROBABILITY_FIELDS, "gate_weights") if isinstance(record.get(field), dict)
            and not all(isinstance(v, (int, float)) and math.isfinite(v) for v in record[field].values())]


def record_problem(record, class_names: Sequence[str]) -> str | None:
    """What is wrong with a record read back from a JSONL output (see :func:`prediction_record`):
    labels outside ``class_names``, probabilities that are not one finite number in [0, 1] per class
    summing to 1; None when it is sound."""
    for field in PROBABILITY_FIELDS:
        probs = record.get(field)
        if not isinstance(probs, dict) or list(probs) != list(class_names):
            return f"{field} does not hold this run's classes"
        values = list(probs.values())
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and 0 <= v <= 1
                   for v in values):
            return f"{field} holds a number that is not a probability"
        if abs(sum(values) - 1) > 1e-3:
            return f"{field} sums to {sum(values):.4g}, not 1"
    labels = {"final_label": record.get("final_label"), "head_label": record.get("head_label")}
    if any(label not in class_names for label in labels.values()) or \
            record.get("vlm_label") not in (None, *class_names):
        return "a label that is not one of this run's classes"
    if non_finite(record):
        return f"non-finite numbers in {', '.join(non_finite(record))}"
    return None


def _row_problem(row: list[str], columns: Sequence[str], class_names: Sequence[str]) -> str | None:
    """What is wrong with a CSV row read back (see :func:`record_problem`), or None."""
    if len(row) != len(columns) or not row[0]:
        return f"{len(row)} columns, not {len(columns)}"
    record = dict(zip(columns, row))
    try:
        for field in PROBABILITY_FIELDS:
            record[field] = {name: float(record[f"{field}.{name}"]) for name in class_names}
    except ValueError:
        return "a probability that is not a number"
    record["vlm_label"] = record["vlm_label"] or None
    return record_problem(record, class_names)


def _damaged(out: Path, number: int, problem: str) -> UserError:
    return UserError(f"--out {out}:{number}: a damaged prediction record ({problem}); delete that line to "
                     "predict its image again, or pass another --out")


def csv_columns(class_names: Sequence[str], weight_names: Sequence[str], explain: bool) -> list[str]:
    """The CSV header: nested values become ``<field>.<class>`` (or ``gate_weights.<source>``)."""
    columns = ["image", "final_label", *(f"final_probs.{c}" for c in class_names), "vlm_label", "vlm_answer",
               *(f"vlm_probs.{c}" for c in class_names), "head_label", *(f"head_probs.{c}" for c in class_names),
               "gate", *(f"gate_weights.{w}" for w in weight_names)]
    return columns + (["key_elements", "reasoning"] if explain else [])


def _csv_line(values: Sequence) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(values)
    return buffer.getvalue()


def render(record: dict, fmt: str, columns: Sequence[str]) -> str:
    """One output line. CSV keeps each record on one line (texts' line breaks become spaces),
    so a killed run's unfinished record is always its last line."""
    if fmt == "jsonl":
        return json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n"
    flat = {}
    for key, value in record.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{name}": v for name, v in value.items()})
        elif isinstance(value, str):
            flat[key] = " ".join(value.splitlines())
        else:
            flat[key] = value
    return _csv_line(["" if flat.get(column) is None else flat[column] for column in columns])


def done_images(out: Path, fmt: str, columns: Sequence[str]) -> set[str]:
    """Images already in ``out``; a CSV file must have this run's header (classes, gate, --explain),
    and every record must be sound (:func:`record_problem`): a damaged one is a UserError naming its line."""
    if not out.is_file() or out.stat().st_size == 0:
        return set()
    repair_tail(out)
    lines = read_utf8(out).splitlines()
    class_names = [column.split(".", 1)[1] for column in columns if column.startswith("final_probs.")]
    if fmt == "csv":
        header = next(csv.reader(lines[:1]), [])
        if header != list(columns):
            raise UserError(f"--out {out}: its columns are not this run's (other classes, gate or --explain); "
                            "pass another --out or delete the file")
        images = set()
        for number, row in enumerate(csv.reader(lines[1:]), start=2):
            if row and (problem := _row_problem(row, columns, class_names)):
                raise _damaged(out, number, problem)
            images.update(row[:1])
        return images
    images = set()
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
            images.add(record["image"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(f"--out {out}:{number}: not a prediction record; pass another --out (or "
                            "--format csv for a CSV file)") from None
        if problem := record_problem(record, class_names):
            raise _damaged(out, number, problem)
    return images


def prepare_output(out: Path, fmt: str, columns: Sequence[str]) -> set[str]:
    """Rank 0 merges what a killed sharded run left in part files and writes a new CSV's header;
    every rank then reads which images are done."""
    if is_main_process():
        out.parent.mkdir(parents=True, exist_ok=True)
        merge_part_files(out)
        if fmt == "csv" and (not out.is_file() or out.stat().st_size == 0):
            out.write_text(_csv_line(columns), encoding="utf-8")
    barrier()
    return done_images(out, fmt, columns)


def predict_block(block: range, predictor, folder: Path, todo: Sequence[str], target: Path, fmt: str,
                  columns: Sequence[str], batch_size: int, max_new_tokens: int, explain: bool,
                  skip_bad_images: bool) -> dict:
    """This rank's block of ``todo``, predicted batch by batch and appended to ``target`` (the
    output, or this rank's part file); returns ``{done, bad}``."""
    share = todo[block.start:block.stop]
    written = bad = 0
    with open(target, "a", encoding="utf-8") as fh, \
            tqdm(total=len(share), desc="predict", unit="img", disable=not is_main_process()) as progress:
        for start in range(0, len(share), batch_size):
            names, pictures = [], []
            for name in share[start:start + batch_size]:
                try:
                    pictures.append(open_image(folder / name))
                    names.append(name)
                except UserError as err:
                    if not skip_bad_images:
                        raise
                    log.warning("skipped: %s", err)
                    bad += 1
            if pictures:
                results = predictor.predict_batch(pictures, max_new_tokens, explain)
                records = [prediction_record(name, result, explain) for name, result in zip(names, results)]
                for record in records:  # never written as NaN: the batch stops here, unwritten
                    if fields := non_finite(record):
                        raise UserError(f"{folder / record['image']}: the prediction is not finite (NaN or "
                                        f"infinity in {', '.join(fields)}); a stage output may be damaged: "
                                        "nothing was written for this batch")
                fh.write("".join(render(record, fmt, columns) for record in records))
                fh.flush()
                written += len(pictures)
            progress.update(len(share[start:start + batch_size]))
    return {"done": written, "bad": bad}


def predict_folder(predictor, folder: str | Path, out: str | Path, fmt: str = "jsonl", batch_size: int = 8,
                   explain: bool = False, max_new_tokens: int = 128, skip_bad_images: bool = False) -> dict:
    """Predict every image under ``folder`` not yet in ``out``; returns counts ``{done, skipped, bad, total}``.

    ``predictor`` is an ``engine.predictor.EmoVLMKD``. Under torchrun every rank calls this with
    its own predictor; records are appended batch by batch (a killed run keeps what was written).
    """
    folder, out = Path(folder), Path(out)
    rank, _, world = distributed_rank()
    images = list_images(folder, out)
    exposes_weights = hasattr(predictor.gate, "forward_with_weights")  # as models.gates.gate_weights decides
    weight_names = predictor.gate.weight_names if exposes_weights else ()
    columns = csv_columns(predictor.class_names, weight_names, explain)
    done = prepare_output(out, fmt, columns)
    todo = [image for image in images if image not in done]
    if is_main_process():
        print(f"{len(images)} images under {folder}: {len(images) - len(todo)} already in {out}, "
              f"{len(todo)} to predict" + (f" on {world} processes" if world > 1 else ""))

    target = out if world == 1 else part_file(out, rank)  # each rank appends to its own part file
    try:
        counts = {"done": 0, "bad": 0}
        if todo:  # every rank's counts, summed
            counts = shard_map(len(todo), predict_block, predictor, folder, todo, target, fmt, columns, batch_size,
                               max_new_tokens, explain, skip_bad_images, unit=batch_size)
    finally:  # also after a failed rank: what the others wrote is kept
        if world > 1 and is_main_process():
            merge_part_files(out)
    return {"done": counts["done"], "skipped": len(images) - len(todo), "bad": counts["bad"], "total": len(images)}
