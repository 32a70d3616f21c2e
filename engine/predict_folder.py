"""predict.py's library: the trained EmoVLM-KD on every image of a folder, one record per image.

Records go to a JSON Lines file (one object per image) or a CSV file (one row per image, a
column per class probability). Runs resume: images already in the output are skipped, and an
unfinished last line left by a killed run is cut. Under torchrun the images still to predict
are sharded (utils.dist): each rank appends to its own part file, which rank 0 merges in rank
order, so the file is the one a single process writes; a killed run's part files are merged
at the start of the next one.
"""
from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path
from typing import Sequence

from tqdm.auto import tqdm

from data.datasets import is_image_file, open_image
from utils.dist import barrier, distributed_rank, is_main_process, merge_part_files, part_file, shard_map
from utils.errors import UserError
from utils.io import read_utf8, repair_tail

FORMATS = ("jsonl", "csv")
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
        return json.dumps(record, ensure_ascii=False) + "\n"
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
    """Images already in ``out``; a CSV file must have this run's header (classes, gate, --explain)."""
    if not out.is_file() or out.stat().st_size == 0:
        return set()
    repair_tail(out)
    lines = read_utf8(out).splitlines()
    if fmt == "csv":
        header = next(csv.reader(lines[:1]), [])
        if header != list(columns):
            raise UserError(f"--out {out}: its columns are not this run's (other classes, gate or --explain); "
                            "pass another --out or delete the file")
        return {row[0] for row in csv.reader(lines[1:]) if row}
    images = set()
    for number, line in enumerate(lines, start=1):
        try:
            images.add(json.loads(line)["image"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(f"--out {out}:{number}: not a prediction record; pass another --out (or "
                            "--format csv for a CSV file)") from None
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
                fh.write("".join(render(prediction_record(name, result, explain), fmt, columns)
                                 for name, result in zip(names, results)))
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
