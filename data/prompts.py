"""Every prompt of the method, in our own words, and the parser of categorical answers.

The categorical question is built from the dataset's own class list, so binary and Ekman
datasets get their own choices; the expected answer is ``{'emotion': '<class>'}``.
"""
from __future__ import annotations

import ast
import re
from typing import Sequence

SYSTEM_MESSAGE = (
    "You are an expert in visual emotion analysis. You look closely at what an image shows "
    "(people, faces, gestures, objects, scenery, colour and light) and explain which emotion "
    "it evokes in a viewer."
)

OBSERVATION_QUESTION = (
    "Look at this image and list the key visual elements that shape the emotion it evokes: "
    "the subjects and what they do, facial expressions, objects, setting, colours and lighting."
)

REASONING_QUESTION = (
    "Explain step by step how the emotion this image evokes can be inferred from its key "
    "visual elements."
)


def format_classes(class_names: Sequence[str]) -> str:
    return ", ".join(class_names)


def categorical_question(class_names: Sequence[str]) -> str:
    """The classification question for one dataset's classes."""
    return (
        "Which emotion does this image evoke? Choose exactly one category from "
        f"[{format_classes(class_names)}] and answer only in the form "
        "{'emotion': '<category>'}."
    )


def categorical_answer(class_name: str) -> str:
    """The target string of the categorical task, e.g. ``{'emotion': 'awe'}``."""
    return "{'emotion': '%s'}" % class_name


def generation_prompt(class_names: Sequence[str], emotion: str) -> str:
    """Stage 0: ask a strong multimodal LLM for key elements and reasoning behind a known label."""
    return (
        "You are helping to build training data for visual emotion analysis. The emotion "
        f"categories of this dataset are: {format_classes(class_names)}. People who viewed this "
        f"image reported that it evokes '{emotion}'.\n\n"
        "Write two numbered sections, and never write the name of the emotion itself anywhere "
        "in your answer:\n"
        "1. Key elements: the visual elements of the image that evoke this emotion (subjects, "
        "actions, faces, objects, setting, colours, lighting, composition).\n"
        "2. Reasoning: how a viewer gets from those elements to the emotion, step by step.\n\n"
        "Use exactly the headings '1. Key elements:' and '2. Reasoning:'."
    )


_SECTIONS = re.compile(
    r"(?:^|\n)\s*[#*\s]*1[.):]?\s*[*]*\s*key\s+elements?\s*[*]*\s*[:\-]?\s*[*]*(?P<key>.*?)"
    r"\n\s*[#*\s]*2[.):]?\s*[*]*\s*reasoning\s*[*]*\s*[:\-]?\s*[*]*(?P<reason>.*)\Z",
    re.IGNORECASE | re.DOTALL,
)


def split_sections(text: str) -> tuple[str, str] | None:
    """``(key_elements, reasoning)`` from a stage-0 answer, or None when a section is missing."""
    match = _SECTIONS.search(text.strip())
    if not match:
        return None
    key, reason = match.group("key").strip(), match.group("reason").strip()
    return (key, reason) if key and reason else None


def mentions_word(text: str, word: str) -> bool:
    """Whether ``word`` appears as a whole word (any case) in ``text``."""
    return re.search(rf"\b{re.escape(word)}\b", text, re.IGNORECASE) is not None


_EMOTION_FIELD = re.compile(r"""["']?emotion["']?\s*[:=]\s*["']?\s*([A-Za-z][A-Za-z \-]*?)\s*["'}\],.]""",
                            re.IGNORECASE)


PARSERS = ("strict", "lenient")
# The reference code's reading of a decoded answer: the first piece of one line that starts with
# {'emotion': (single quotes, this case, no space after the brace) and ends at the next '} is read
# as a Python literal (ast.literal_eval), and its 'emotion' value must be a class name exactly as
# written. Text around that piece is ignored; where it is not a literal, the answer is unparseable.
_REFERENCE_DICT = re.compile(r"\{'emotion':\s*'.*?'\}")
# Errors ast.literal_eval raises on text that is not a literal (its documented ones).
_NOT_A_LITERAL = (ValueError, TypeError, SyntaxError, MemoryError, RecursionError)
# Bumped when a parser's reading changes, so stage 3's cached answers parsed the old way are not
# reused (engine.vlm_answers.vlm_cache_key): strict became the reference's literal_eval in 2.
PARSER_REVISIONS = {"strict": 2, "lenient": 1}


def reference_emotion(text: str, class_names: Sequence[str]) -> int | None:
    """The class the reference code reads from a decoded answer (``--parser strict``), or None."""
    match = _REFERENCE_DICT.search(text)
    if match is None:
        return None
    try:
        answer = ast.literal_eval(match.group(0))
    except _NOT_A_LITERAL:
        return None
    # A later 'emotion' key overrides the first, as in any dict literal; its value may not be a string.
    value = answer.get("emotion") if isinstance(answer, dict) else None
    names = list(class_names)
    return names.index(value) if isinstance(value, str) and value in names else None


def parse_emotion(text: str, class_names: Sequence[str], parser: str = "lenient") -> int | None:
    """Class index named by an answer such as ``{'emotion': 'awe'}``; None when no class is found.

    ``strict`` is the reference code's reading (:func:`reference_emotion`): only that dictionary
    form, single-quoted, the class with its case as written. ``lenient`` also takes either quote
    style, any letter case and spacing, a missing brace, other separators and surrounding text,
    and without an ``emotion`` field a lone class word; an ambiguous answer (several classes) is None.
    """
    if parser == "strict":
        return reference_emotion(text, class_names)
    if parser != "lenient":
        raise ValueError(f"parser {parser!r}: choose one of {', '.join(PARSERS)}")
    lookup = {name.lower(): index for index, name in enumerate(class_names)}
    match = _EMOTION_FIELD.search(text + "}")
    if match:
        value = match.group(1).strip().lower()
        if value in lookup:
            return lookup[value]
    found = {index for name, index in lookup.items() if mentions_word(text, name)}
    return found.pop() if len(found) == 1 else None
