"""Stage 0: a multimodal LLM explains why each training image evokes its (known) emotion.

Two backends answer the same prompt: any OpenAI-compatible chat-completions API (requests run
concurrently in worker threads) or a local Hugging Face VLM (batched greedy generation). Both
yield :class:`Outcome` objects, and only the caller's thread writes files, one durable line per
record, so an interrupted run loses at most the requests in flight and a rerun resumes.
"""
from __future__ import annotations

import base64
import io
import json
import math
import queue
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import openai
from openai import OpenAI
from openai.types.chat import ChatCompletion
from PIL import Image

from data.annotations import (ANNOTATIONS_FILE, Annotation, append_annotation, append_record,
                              read_annotations)
from data.datasets import DatasetSplits, Sample, needs_normalising, open_image
from data.prompts import generation_prompt, mentions_word, split_sections
from models.chat import generate_texts
from models.vlm import load_processor, load_vlm
from utils.dist import merge_part_files, part_file
from utils.errors import UserError
from utils.io import repair_tail, write_text

REJECTED_FILE = "rejected.jsonl"
MIME_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "GIF": "image/gif"}
# A run whose every request fails (a model without image input, a proxy that answers 400)
# should stop rather than walk through the whole dataset.
MAX_CONSECUTIVE_FAILURES = 20


@dataclass(frozen=True)
class Request:
    sample: Sample
    path: Path      # absolute image path
    emotion: str    # the true class name, given to the model and forbidden in its answer
    prompt: str


@dataclass
class Outcome:
    request: Request
    status: str                                 # "done", "rejected" or "failed"
    sections: tuple[str, str] | None = None     # (key elements, reasoning) when done
    reason: str = ""                            # why rejected or failed
    answer: str = ""                            # the last answer text
    attempts: int = 0
    mentions_label: bool = False                # kept although it names the emotion (see keep_mention)
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class Tally:
    done: int = 0
    skipped: int = 0
    rejected: int = 0
    failed: int = 0
    mentions_label: int = 0    # of ``done``: kept although they name the emotion
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def counts(self) -> dict:
        return {"done": self.done, "skipped": self.skipped, "rejected": self.rejected, "failed": self.failed,
                "mentions_label": self.mentions_label}


# ---------------------------------------------------------------------------- images and answers

def prompt_image(path: str | Path, max_side: int) -> Image.Image:
    """The image as RGB, its longer side shrunk to ``max_side`` (never enlarged)."""
    image = open_image(path)
    image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return image


def image_data_url(path: str | Path, max_side: int) -> tuple[str, tuple[int, int]]:
    """``(data URL, (width, height) sent)``. A small PNG/JPEG/WebP/GIF goes as its own bytes;
    anything larger or in another format is downscaled and re-encoded (PNG stays PNG)."""
    raw = Path(path).read_bytes()
    try:
        with Image.open(io.BytesIO(raw)) as img:
            kind, size, animated = img.format, img.size, getattr(img, "is_animated", False)
            # Rotated (EXIF) or 16-bit images go as the pixels every stage sees, re-encoded.
            normalise = needs_normalising(img)
    except (OSError, ValueError, Image.DecompressionBombError):
        open_image(path)  # raises the dataset layer's UserError naming the file
        raise
    if max(size) <= max_side and kind in MIME_TYPES and not animated and not normalise:
        mime = MIME_TYPES[kind]
    else:
        image = prompt_image(path, max_side)
        kind, mime = ("PNG", "image/png") if kind == "PNG" else ("JPEG", "image/jpeg")
        buffer = io.BytesIO()
        image.save(buffer, format=kind, **({"quality": 90} if kind == "JPEG" else {}))
        raw, size = buffer.getvalue(), image.size
    return f"data:{mime};base64,{base64.b64encode(raw).decode('ascii')}", size


def approx_image_tokens(width: int, height: int) -> int:
    """Input tokens of one image on GPT-4o-class models at high detail (for cost estimates):
    fit in 2048 px, shortest side to 768 px, then 85 + 170 per 512-px tile."""
    scale = min(1.0, 2048 / max(width, height))
    width, height = width * scale, height * scale
    scale = min(1.0, 768 / min(width, height))
    width, height = width * scale, height * scale
    return 85 + 170 * math.ceil(width / 512) * math.ceil(height / 512)


NAMES_EMOTION = "names the emotion"


def check_answer(text: str | None, emotion: str, accept_unstructured: bool = False,
                 allow_mention: bool = False) -> tuple[tuple[str, str] | None, str]:
    """``((key_elements, reasoning), "")`` for a usable answer, else ``(None, reason)``.

    ``accept_unstructured`` keeps an answer without the two sections as both fields: meant for
    weak local models (and the random toy model), whose text never follows the headings.
    ``allow_mention`` lets an answer naming the emotion through (the whole-word check also
    catches innocent uses: "an amusement park", "negative space").
    """
    text = (text or "").strip()
    if not text:
        return None, "empty answer"
    if not allow_mention and mentions_word(text, emotion):
        return None, f"{NAMES_EMOTION} {emotion!r}"
    sections = split_sections(text)
    if sections is None:
        if not accept_unstructured:
            return None, "missing the '1. Key elements' or '2. Reasoning' section"
        sections = (text, text)
    return sections, ""


def mentioned_sections(outcome: Outcome, emotion: str, accept_unstructured: bool) -> tuple | None:
    """``(sections, answer)`` when the outcome's answer was refused only for naming the emotion."""
    if not outcome.reason.startswith(NAMES_EMOTION):
        return None
    sections, _ = check_answer(outcome.answer, emotion, accept_unstructured, allow_mention=True)
    return (sections, outcome.answer) if sections is not None else None


def keep_mention(outcome: Outcome, mentioned: tuple | None, reject_label_mentions: bool) -> Outcome:
    """After the last attempt: keep an answer that only named the emotion, marked
    ``mentions_label`` (a dropped image would silently shrink the training set), unless
    ``reject_label_mentions``."""
    if outcome.status == "done" or mentioned is None or reject_label_mentions:
        return outcome
    outcome.sections, outcome.answer = mentioned
    outcome.status, outcome.reason, outcome.mentions_label = "done", "", True
    return outcome


# ---------------------------------------------------------------------------- resuming

def _jsonl_records(path: Path) -> list[dict]:
    """Complete lines of a JSONL file (an unfinished last line, from a killed run, is skipped)."""
    if not path.exists():
        return []
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").split("\n")[:-1], start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            raise UserError(f"{path}:{number}: not a JSON record; fix or delete that line") from None
    return records


def annotated_images(folder: Path, class_names: Sequence[str]) -> set[str]:
    """Images already in the annotation file (its unfinished last line, if any, is cut first)."""
    path = folder / ANNOTATIONS_FILE
    repair_tail(path)
    if not path.exists():
        return set()
    records = read_annotations(path)
    foreign = sorted({a.label for a in records} - set(class_names))
    if foreign:
        raise UserError(f"{path}: holds labels {foreign} that are not classes of this dataset "
                        f"{list(class_names)}; use another --output_dir or delete the file")
    return {a.image for a in records}


def rejected_images(folder: Path) -> set[str]:
    return {record["image"] for record in _jsonl_records(folder / REJECTED_FILE)}


def compact_rejected(folder: Path, annotated: set[str]) -> int:
    """Keep one record per image (the latest) and drop images annotated since; returns the count."""
    path = folder / REJECTED_FILE
    if not path.exists():
        return 0
    latest = {record["image"]: record for record in _jsonl_records(path)
              if record["image"] not in annotated}
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in latest.values()))
    return len(latest)


def plan_requests(splits: DatasetSplits, folder: Path, skip_rejected: bool = False,
                  limit: int | None = None) -> tuple[list[Request], Tally]:
    """What to ask in this run: training images (never validation ones) without an annotation;
    images rejected earlier are asked again unless ``skip_rejected``; at most ``limit``."""
    done = annotated_images(folder, splits.class_names)
    skip = done | (rejected_images(folder) if skip_rejected else set())
    todo = [sample for sample in splits.train if sample.path not in skip]
    tally = Tally(skipped=len(splits.train) - len(todo))
    if limit is not None:
        todo = todo[:limit]
    return [make_request(splits, sample) for sample in todo], tally


def make_request(splits: DatasetSplits, sample: Sample) -> Request:
    emotion = splits.class_names[sample.label]
    return Request(sample, splits.absolute(sample), emotion, generation_prompt(splits.class_names, emotion))


# ---------------------------------------------------------------------------- writing

def output_files(folder: Path, part: int | None = None) -> tuple[Path, Path]:
    """``(annotations, rejected)`` files a process appends to: the folder's own, or under a
    launcher rank ``part``'s part files, merged into them in rank order by :func:`merge_parts`."""
    files = folder / ANNOTATIONS_FILE, folder / REJECTED_FILE
    return files if part is None else tuple(part_file(path, part) for path in files)


def merge_parts(folder: Path) -> int:
    """Move the ranks' part files (of this run, or left by a killed one) into the folder's files."""
    return sum(merge_part_files(path) for path in output_files(folder))


def write_outcomes(outcomes: Iterable[Outcome], folder: Path, generator: str, tally: Tally,
                   progress=None, part: int | None = None) -> Tally:
    """Append each outcome as it arrives: annotations to ``annotations_train.jsonl``, rejections
    (with the reason and the last answer) to ``rejected.jsonl`` (or, with ``part``, to that
    rank's part files); failures are only counted and shown, so the next run asks again."""
    folder.mkdir(parents=True, exist_ok=True)
    annotations_path, rejected_path = output_files(folder, part)
    repair_tail(annotations_path)
    repair_tail(rejected_path)
    failures_in_a_row = 0
    with open(annotations_path, "a", encoding="utf-8") as annotations, \
            open(rejected_path, "a", encoding="utf-8") as rejected:
        for outcome in outcomes:
            request = outcome.request
            tally.prompt_tokens += outcome.prompt_tokens
            tally.completion_tokens += outcome.completion_tokens
            if outcome.status == "done":
                key_elements, reasoning = outcome.sections
                append_annotation(annotations, Annotation(request.sample.path, request.emotion,
                                                          key_elements, reasoning, generator,
                                                          outcome.mentions_label))
                tally.done += 1
                tally.mentions_label += outcome.mentions_label
            elif outcome.status == "rejected":
                append_record(rejected, {"image": request.sample.path, "label": request.emotion,
                                         "reason": outcome.reason, "attempts": outcome.attempts,
                                         "answer": outcome.answer, "generator": generator})
                tally.rejected += 1
            else:
                tally.failed += 1
                _say(progress, f"failed: {request.sample.path}: {outcome.reason}")
            failures_in_a_row = failures_in_a_row + 1 if outcome.status == "failed" else 0
            if failures_in_a_row >= MAX_CONSECUTIVE_FAILURES:
                raise UserError(f"stopping: the last {failures_in_a_row} requests all failed "
                                f"(last: {outcome.reason}); fix the cause and rerun to resume")
            if progress is not None:
                progress.set_postfix(tally.counts(), refresh=False)
                progress.update(1)
    return tally


def _say(progress, line: str) -> None:
    if progress is not None:
        progress.write(line)
    else:
        print(line)


# ---------------------------------------------------------------------------- OpenAI-compatible API

class NotACompletion(ValueError):
    """A 200 answer that is no chat completion: the openai client hands a body that is not JSON
    (e.g. a misconfigured proxy's HTML page) back as text. A failed request, like a 5xx."""

    def __init__(self, body):
        text = " ".join(str(body).split())
        super().__init__(f"the server answered with no chat completion but {text[:60]!r}"
                         f"{'...' if len(text) > 60 else ''}; check --base_url and any HTTP proxy")


class OpenAIBackend:
    """Chat completions with the image as a data URL; the openai client retries rate limits,
    timeouts and 5xx itself (``max_retries``, exponential backoff, honours ``retry-after``)."""

    def __init__(self, model: str, api_key: str | None, base_url: str | None = None, max_retries: int = 5,
                 timeout: float = 120.0, max_new_tokens: int = 512, max_side: int = 1024,
                 max_attempts: int = 3, workers: int = 4, accept_unstructured: bool = False,
                 reject_label_mentions: bool = False):
        # Self-hosted servers (vLLM, Ollama) usually need no key, but the client wants one.
        self.client = OpenAI(api_key=api_key or "EMPTY", base_url=base_url, max_retries=max_retries,
                             timeout=timeout)
        self.model, self.max_new_tokens, self.max_side = model, max_new_tokens, max_side
        self.max_attempts, self.workers = max_attempts, workers
        self.accept_unstructured = accept_unstructured
        self.reject_label_mentions = reject_label_mentions
        self._secret = api_key

    def answer(self, request: Request) -> Outcome:
        """Ask until the answer is usable or ``max_attempts`` answers were refused; then, unless
        ``reject_label_mentions``, keep the last usable answer that only named the emotion."""
        body = self.request_body(request)
        outcome = Outcome(request, "rejected")
        mentioned = None  # (sections, answer) of an answer whose only fault was naming the emotion
        while outcome.attempts < self.max_attempts:
            try:
                response = self.client.chat.completions.create(**body)
            except (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError) as err:
                raise self._fatal(err) from None
            except openai.APITimeoutError as err:
                return self._failed(outcome, err)
            except openai.APIConnectionError as err:
                raise self._fatal(err) from None
            except (openai.APIError, ValueError) as err:  # 429/5xx after retries, 400, not JSON
                return self._failed(outcome, err)
            if not isinstance(response, ChatCompletion):  # a 200 page that is not JSON (a proxy's)
                return self._failed(outcome, NotACompletion(response))
            mentioned = self.take_answer(outcome, response, mentioned)
            if outcome.status == "done":
                return outcome
        return keep_mention(outcome, mentioned, self.reject_label_mentions)

    def request_body(self, request: Request) -> dict:
        """The chat-completions request for one image: sent as is, or as a line of a batch input file."""
        url, _ = image_data_url(request.path, self.max_side)
        messages = [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}},
            {"type": "text", "text": request.prompt},
        ]}]
        return {"model": self.model, "messages": messages, "max_tokens": self.max_new_tokens}

    def take_answer(self, outcome: Outcome, response, mentioned: tuple | None) -> tuple | None:
        """One more answer (a chat completion) counted on ``outcome`` and checked: ``status`` becomes
        "done" when usable. Returns ``mentioned``, replaced by this answer's ``(sections, answer)``
        when its only fault is naming the emotion."""
        request = outcome.request
        outcome.attempts += 1
        if response.usage is not None:
            outcome.prompt_tokens += response.usage.prompt_tokens or 0
            outcome.completion_tokens += response.usage.completion_tokens or 0
        choices = response.choices or []
        outcome.answer = (choices[0].message.content or "") if choices else ""
        outcome.sections, outcome.reason = check_answer(outcome.answer, request.emotion,
                                                        self.accept_unstructured)
        if outcome.sections is not None:
            outcome.status = "done"
            return mentioned
        return mentioned_sections(outcome, request.emotion, self.accept_unstructured) or mentioned

    def outcomes(self, requests: Sequence[Request]) -> Iterator[Outcome]:
        """Outcomes in completion order from ``workers`` threads; a fatal error is re-raised here.

        Daemon threads, not a ThreadPoolExecutor: after Ctrl-C or a fatal error the process must
        exit at once instead of waiting for answers it would discard (threads never write files).
        """
        jobs: queue.SimpleQueue[Request] = queue.SimpleQueue()
        results: queue.SimpleQueue[tuple[Outcome | None, BaseException | None]] = queue.SimpleQueue()
        for request in requests:
            jobs.put(request)
        stop = threading.Event()
        # One slot per worker, freed when the caller has taken an outcome: workers never run ahead
        # of the writer, so a run stopped after N failures has sent at most N + workers - 1 requests.
        slots = threading.Semaphore(self.workers)

        def work() -> None:
            while True:
                slots.acquire()
                if stop.is_set():
                    return
                try:
                    request = jobs.get_nowait()
                except queue.Empty:
                    return
                try:
                    results.put((self.answer(request), None))
                except BaseException as err:  # noqa: BLE001 - handed to the writing thread
                    results.put((None, err))

        for _ in range(min(self.workers, len(requests))):
            threading.Thread(target=work, name="instructions", daemon=True).start()
        try:
            for _ in range(len(requests)):
                outcome, err = results.get()
                if err is not None:
                    raise err
                yield outcome
                slots.release()
        finally:
            stop.set()
            for _ in range(self.workers):  # wake workers waiting for a slot so they see ``stop``
                slots.release()

    def _message(self, err) -> str:
        body = getattr(err, "body", None)
        text = body.get("message") if isinstance(body, dict) and body.get("message") else str(err)
        text = " ".join(str(text).split())
        return text.replace(self._secret, "***") if self._secret else text

    def _failed(self, outcome: Outcome, err) -> Outcome:
        status = getattr(err, "status_code", None)
        outcome.status = "failed"
        outcome.reason = f"{err.__class__.__name__}{f' {status}' if status else ''}: {self._message(err)}"
        return outcome

    def _fatal(self, err) -> UserError:
        where = str(self.client.base_url).rstrip("/")
        detail = f"{err.__class__.__name__}: {self._message(err)}"
        if isinstance(err, openai.AuthenticationError):
            return UserError(f"{where} refused the API key ({detail}); export a valid OPENAI_API_KEY")
        if isinstance(err, openai.PermissionDeniedError):
            return UserError(f"{where}: this key may not use --model {self.model} ({detail})")
        if isinstance(err, openai.NotFoundError):
            return UserError(f"{where}: --model {self.model} not found ({detail}); check --model "
                             "and --base_url")
        return UserError(f"cannot reach {where} ({detail}); check --base_url and that the server is up")


# ---------------------------------------------------------------------------- local Hugging Face VLM

class LocalBackend:
    """The same prompt answered by a Hugging Face VLM, batched and greedy. Greedy decoding
    repeats itself, so a refused answer is not asked again (one attempt per image)."""

    def __init__(self, model_id: str, device, batch_size: int = 4, max_new_tokens: int = 512,
                 max_side: int = 1024, accept_unstructured: bool = False, reject_label_mentions: bool = False):
        self.model = load_vlm(model_id, device)
        self.processor = load_processor(model_id)
        self.batch_size, self.max_new_tokens, self.max_side = batch_size, max_new_tokens, max_side
        self.accept_unstructured = accept_unstructured
        self.reject_label_mentions = reject_label_mentions

    def outcomes(self, requests: Sequence[Request]) -> Iterator[Outcome]:
        for start in range(0, len(requests), self.batch_size):
            batch = requests[start:start + self.batch_size]
            messages = [[{"role": "user", "content": [{"type": "image"},
                                                      {"type": "text", "text": r.prompt}]}]
                        for r in batch]
            images = [prompt_image(r.path, self.max_side) for r in batch]
            texts = generate_texts(self.model, self.processor, messages, images,
                                   self.max_new_tokens, len(batch))
            for request, text in zip(batch, texts):
                sections, reason = check_answer(text, request.emotion, self.accept_unstructured)
                outcome = Outcome(request, "done" if sections else "rejected", sections, reason, text, attempts=1)
                yield keep_mention(outcome, mentioned_sections(outcome, request.emotion, self.accept_unstructured),
                                   self.reject_label_mentions)
