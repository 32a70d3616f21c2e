"""Instruction annotations (JSON Lines, one record per training image) and their conversations.

Stage 0 appends records; stage 1 reads them and turns each into three conversations
(observation, reasoning, categorical) that share the system message and the image. Stage 1 also
reads the authors' own instruction data as they released it (:func:`read_reference_annotations`):
one JSON array of ``{"gpt_response", "img", "img_path", "label"}`` records, told apart from
stage 0's JSON Lines by its first character (:func:`load_annotations`).
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import IO, Iterator, Sequence

from data.datasets import DatasetSplits
from data.prompts import (OBSERVATION_QUESTION, REASONING_QUESTION, SYSTEM_MESSAGE,
                          categorical_answer, categorical_question, mentions_word, split_sections)
from utils.errors import UserError
from utils.io import read_utf8
from utils.records import TASKS as RECORDED_TASKS

log = logging.getLogger(__name__)

ANNOTATIONS_FILE = "annotations_train.jsonl"
TASKS = RECORDED_TASKS  # ("observation", "reasoning", "categorical"), the order they are recorded in
# The tasks whose answers are stage 0's text; the categorical one needs none.
TEXT_TASKS = ("observation", "reasoning")


@dataclass(frozen=True)
class Annotation:
    image: str          # path relative to data_root, e.g. "toy/train/awe/0001.png"
    label: str          # class name
    key_elements: str   # section 1 of the generator's answer
    reasoning: str      # section 2
    generator: str      # model that wrote it
    mentions_label: bool = False  # kept although it names the emotion (stage 0 --max_attempts ran out)

    @classmethod
    def from_dict(cls, record: dict) -> "Annotation":
        names = [f.name for f in fields(cls) if f.name != "mentions_label"]
        missing = [n for n in names if not isinstance(record.get(n), str)]
        if missing:
            raise ValueError(f"missing or non-string fields {missing}")
        mentions = record.get("mentions_label", False)  # absent in files written before the flag
        if not isinstance(mentions, bool):
            raise ValueError(f"mentions_label must be true or false, got {mentions!r}")
        return cls(**{n: record[n] for n in names}, mentions_label=mentions)


def iter_annotations(path: str | Path) -> Iterator[Annotation]:
    """Records of a JSONL file. A broken *last* line (an interrupted write) is ignored with a
    warning; a broken line elsewhere is a UserError naming the line."""
    path = Path(path)
    lines = read_utf8(path).split("\n")  # bytes that are not UTF-8: one line naming file:line
    complete = lines[:-1]  # text after the final newline is an unfinished write
    if lines[-1].strip():
        log.warning("%s: ignoring an unfinished last line (interrupted write)", path)
    for number, line in enumerate(complete, start=1):
        if not line.strip():
            continue
        try:
            yield Annotation.from_dict(json.loads(line))
        except (json.JSONDecodeError, ValueError, TypeError) as err:
            raise UserError(f"{path}:{number}: not a valid annotation record ({err}); "
                            "fix or delete that line") from None


def read_annotations(path: str | Path) -> list[Annotation]:
    return list(iter_annotations(path))


# ---------------------------------------------------------------------------- the authors' instruction data

REFERENCE_KEYS = ("gpt_response", "img", "img_path", "label")
EXAMPLES_SHOWN = 3  # examples per line of the summary; the report file lists every one


def is_reference_file(path: str | Path) -> bool:
    """Whether ``path`` holds the authors' instruction data (one JSON array: its first non-space
    character is ``[``) rather than stage 0's JSON Lines (one ``{...}`` record a line)."""
    with open(path, encoding="utf-8-sig", errors="replace") as fh:
        while chunk := fh.read(4096):
            stripped = chunk.lstrip()
            if stripped:
                return stripped[0] == "["
    return False


@dataclass
class ReferenceReport:
    """What became of each record of the authors' file: every record lands in exactly one of
    ``matched``, ``unparseable``, ``held_out``, ``unmatched`` or ``duplicates`` (record indices
    count from 0, in the file's order)."""
    file: str
    records: int
    matched: list[str] = field(default_factory=list)        # training images given text
    mentions_label: int = 0                                   # of those, responses naming their emotion
    unparseable: list[dict] = field(default_factory=list)   # {"record", "image", "answer"}
    held_out: list[dict] = field(default_factory=list)      # {"record", "image", "split"}: val/test images
    unmatched: list[dict] = field(default_factory=list)     # {"record", "label", "img", "reason"}
    duplicates: list[dict] = field(default_factory=list)    # {"record", "image"}: already matched
    without_record: list[str] = field(default_factory=list)  # training images without usable text

    def counts(self) -> dict:
        """The numbers recorded in run.json and meta.json."""
        return {"file": self.file, "records": self.records, "matched": len(self.matched),
                "mentions_label": self.mentions_label, "unparseable": len(self.unparseable),
                "held_out": len(self.held_out), "unmatched": len(self.unmatched),
                "duplicates": len(self.duplicates), "without_record": len(self.without_record)}

    def summary(self, num_train: int) -> str:
        """The lines stage 1 prints: each kind of record counted, with its first few examples."""
        def examples(items, show) -> str:
            shown = "; ".join(show(item) for item in items[:EXAMPLES_SHOWN])
            return f" (e.g. {shown}{'; ...' if len(items) > EXAMPLES_SHOWN else ''})" if items else ""

        return "\n".join([
            f"{self.file}: the authors' instruction data, {self.records} records: {len(self.matched)} matched "
            f"to training images by class and file name ({self.mentions_label} of them naming its emotion, "
            "kept as the authors wrote it)",
            f"  {len(self.unparseable)} unparseable, without the '1. key elements' and '2. reasoning' sections"
            + examples(self.unparseable, lambda u: f"record {u['record']} {u['image']}: {u['answer'][:60]!r}"),
            f"  {len(self.held_out)} name validation or test images: never trained on"
            + examples(self.held_out, lambda h: f"record {h['record']} {h['image']} ({h['split']})"),
            f"  {len(self.unmatched)} unmatched"
            + examples(self.unmatched, lambda u: f"record {u['record']} {u['img']!r} "
                                                 f"(label {u['label']!r}): {u['reason']}"),
            f"  {len(self.duplicates)} duplicates of an image already matched, ignored"
            + examples(self.duplicates, lambda d: f"record {d['record']} {d['image']}"),
            f"  {len(self.without_record)} of {num_train} training images have no usable record: they get "
            "the categorical conversation only" + examples(self.without_record, str),
        ])


def _json_type(value) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number",
            type(None): "null"}.get(type(value), type(value).__name__)


def _reference_records(path: Path) -> list[dict]:
    """The records of the authors' file, each checked for the four keys (a UserError otherwise)."""
    what = ('the authors\' instruction data is one JSON array of {"gpt_response", "img", "img_path", '
            '"label"} records')
    try:
        with open(path, encoding="utf-8-sig") as fh:
            records = json.load(fh)
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); {what}") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err.msg} at line {err.lineno} column {err.colno}); "
                        f"a file starting with '[' is read as {what}: fix it, or pass stage 0's "
                        f"{ANNOTATIONS_FILE}") from None
    if not isinstance(records, list):
        raise UserError(f"{path}: holds a JSON {_json_type(records)}, not an array; {what}")
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise UserError(f"{path}: record {index} (counting from 0) is a JSON {_json_type(record)}, "
                            f"not an object; {what}: fix or delete that record")
        bad = [key for key in REFERENCE_KEYS if not isinstance(record.get(key), str)
               and not (key == "gpt_response" and key in record and record[key] is None)]
        if bad:
            raise UserError(f"{path}: record {index} (counting from 0) has no string {', '.join(bad)}; "
                            f"{what}: fix or delete that record")
    return records


def _class_of(label: str, class_names: Sequence[str]) -> str | None:
    """The dataset's class a record's label names: as written, else the one class equal to it in
    any case (none where two are)."""
    label = label.strip()
    if label in class_names:
        return label
    folded = [name for name in class_names if name.casefold() == label.casefold()]
    return folded[0] if len(folded) == 1 else None


def _common_tail(path: str, other: str) -> int:
    """How many trailing path components two paths share (either slash)."""
    parts, other_parts = path.replace("\\", "/").split("/"), other.replace("\\", "/").split("/")
    shared = 0
    while shared < min(len(parts), len(other_parts)) and parts[-1 - shared] == other_parts[-1 - shared]:
        shared += 1
    return shared


def read_reference_annotations(path: str | Path,
                               splits: DatasetSplits) -> tuple[list[Annotation], ReferenceReport]:
    """The authors' instruction data as annotations of this dataset's training images, and what
    became of each record (:class:`ReferenceReport`).

    A record is matched to an image of the train, validation or test split by its class
    (``label``) and file name (``img``); ``img_path``, a path on the authors' machine, is never
    opened and only breaks a tie between same-named images of one class (the one sharing the
    most trailing folders wins; a tie left is unmatched). ``gpt_response`` is split into key
    elements and reasoning by stage 0's own section parser. Records of validation or test images
    are never returned; an unparseable one gives its image no text (the categorical conversation
    still covers it). Invalid JSON, or a record without the four keys, is a UserError naming the
    file and record, as is a file none of whose records gives text for a training image.
    """
    path = Path(path)
    records = _reference_records(path)
    report = ReferenceReport(file=str(path), records=len(records))
    by_key: dict[tuple[str, str], list[tuple[str, str]]] = {}
    by_name: dict[str, list[tuple[str, str]]] = {}
    for split in ("train", "val", "test"):
        for sample in splits.split(split):
            name = Path(sample.path).name
            by_key.setdefault((splits.class_names[sample.label], name), []).append((split, sample.path))
            by_name.setdefault(name, []).append((split, sample.path))
    generator = f"reference JSON ({path.name})"
    annotations: dict[str, Annotation] = {}
    for index, record in enumerate(records):
        label, img = record["label"], Path(record["img"].replace("\\", "/")).name
        class_name = _class_of(label, splits.class_names)
        candidates = by_key.get((class_name, img), []) if class_name is not None else []
        if len(candidates) > 1:
            best = max(_common_tail(image, record["img_path"]) for _, image in candidates)
            candidates = [(split, image) for split, image in candidates
                          if _common_tail(image, record["img_path"]) == best]
        if len(candidates) != 1:
            report.unmatched.append({"record": index, "label": label, "img": record["img"],
                                     "reason": _unmatched_reason(class_name, img, candidates, by_name)})
            continue
        split, image = candidates[0]
        if split != "train":
            report.held_out.append({"record": index, "image": image, "split": split})
            continue
        if image in annotations:
            report.duplicates.append({"record": index, "image": image})
            continue
        answer = (record["gpt_response"] or "").strip()
        sections = split_sections(answer)
        if sections is None:
            report.unparseable.append({"record": index, "image": image, "answer": answer})
            continue
        mentions = mentions_word(answer, class_name)
        annotations[image] = Annotation(image, class_name, *sections, generator, mentions_label=mentions)
        report.matched.append(image)
        report.mentions_label += mentions
    report.without_record = [sample.path for sample in splits.train if sample.path not in annotations]
    if not annotations:
        raise UserError(f"{path}: none of its {len(records)} records gives text for a training image of "
                        f"{splits.name} ({len(report.held_out)} name validation or test images, "
                        f"{len(report.unmatched)} unmatched, {len(report.unparseable)} unparseable); check "
                        "--dataname and --data_root, and that the file was written for this dataset")
    return list(annotations.values()), report


def _unmatched_reason(class_name: str | None, img: str, candidates: list, by_name: dict) -> str:
    if candidates:
        return (f"{len(candidates)} images of that class and name ({', '.join(i for _, i in candidates)}); "
                "img_path does not tell which")
    if class_name is None:
        return "not a class of this dataset"
    elsewhere = by_name.get(img, [])
    if elsewhere:
        return f"no {class_name!r} image of that name (here it is {elsewhere[0][1]})"
    return "no image of that name in train, val or test"


def load_annotations(path: str | Path,
                     splits: DatasetSplits) -> tuple[list[Annotation], ReferenceReport | None]:
    """Stage 1's annotations from either format: the authors' JSON array (with its report) or
    stage 0's JSON Lines (report None)."""
    if is_reference_file(path):
        return read_reference_annotations(path, splits)
    return read_annotations(path), None


def append_record(fh: IO[str], record: dict) -> None:
    """Append one JSON line and make it durable before returning (one write per record)."""
    fh.write(json.dumps(record, ensure_ascii=False) + "\n")
    fh.flush()
    os.fsync(fh.fileno())


def append_annotation(fh: IO[str], annotation: Annotation) -> None:
    append_record(fh, asdict(annotation))


def _conversation(question: str, answer: str) -> list[dict]:
    return [
        {"role": "system", "content": [{"type": "text", "text": SYSTEM_MESSAGE}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
    ]


def prompt_messages(question: str) -> list[dict]:
    """System + user turn (image, question), ready for ``add_generation_prompt=True``."""
    return _conversation(question, "")[:2]


def categorical_conversation(label: str, class_names: Sequence[str]) -> list[dict]:
    """The categorical task of one image: the dataset's classes asked, ``{'emotion': label}`` answered."""
    return _conversation(categorical_question(class_names), categorical_answer(label))


def to_conversations(annotation: Annotation, class_names: Sequence[str]) -> dict[str, list[dict]]:
    """The three training conversations of one annotated image, keyed by task name."""
    if annotation.label not in class_names:
        raise UserError(f"annotation for {annotation.image}: label {annotation.label!r} "
                        f"is not one of the dataset's classes {list(class_names)}")
    return {
        "observation": _conversation(OBSERVATION_QUESTION, annotation.key_elements),
        "reasoning": _conversation(REASONING_QUESTION, annotation.reasoning),
        "categorical": categorical_conversation(annotation.label, class_names),
    }
