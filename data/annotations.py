"""Instruction annotations (JSON Lines, one record per training image) and their conversations.

Stage 0 appends records; stage 1 reads them and turns each into three conversations
(observation, reasoning, categorical) that share the system message and the image.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import IO, Iterator, Sequence

from data.prompts import (OBSERVATION_QUESTION, REASONING_QUESTION, SYSTEM_MESSAGE,
                          categorical_answer, categorical_question)
from utils.errors import UserError
from utils.io import read_utf8

log = logging.getLogger(__name__)

ANNOTATIONS_FILE = "annotations_train.jsonl"
TASKS = ("observation", "reasoning", "categorical")


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
