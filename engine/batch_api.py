"""Stage 0 through the OpenAI Batch API: the per-request path's requests at half the price, answered
within 24 hours, from a separate rate-limit pool.

A round's requests (one chat-completions body per image, exactly as :class:`OpenAIBackend` sends
it) are written as batch input files (JSONL, one ``{"custom_id", "method", "url", "body"}`` line
per image; a new file, and batch, whenever one would pass the API's 50,000 requests or
``max_bytes``), uploaded and submitted, then waited for. Every answer goes through the checks of a
synchronous one; images whose answer was refused go into a follow-up round until their
``max_attempts`` asks are spent, so the outputs equal the per-request path's on the same answers.

``batches.json`` in the output folder holds the batches in flight and what each image's earlier
asks left (attempts, tokens, an answer refused only for naming the emotion), rewritten atomically
after every upload, submission and collection: a killed or restarted run resumes waiting for what
it submitted instead of submitting again, and a batch created just before a kill (its id not yet
recorded) is found again by its input file, so nothing is paid for twice.
"""
from __future__ import annotations

import json
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Callable

import openai
from openai.types.chat import ChatCompletion
from tqdm.auto import tqdm

from engine.instructions import (OpenAIBackend, Outcome, Request, Tally, annotated_images, check_answer,
                                 keep_mention, write_outcomes)
from utils.errors import UserError
from utils.io import read_json, write_json

BATCHES_FILE = "batches.json"
INPUT_FILE = "batch_input.jsonl"  # a round's input file while it is uploaded; removed after
ENDPOINT = "/v1/chat/completions"
COMPLETION_WINDOW = "24h"
MAX_REQUESTS = 50_000             # per batch: the API's limit (and 200 MB per input file)
ENDED = ("completed", "expired", "failed", "cancelled")
MAX_POLL_FAILURES = 10            # status checks failing in a row (each after the client's retries)
FIND_WINDOW_S = 3600              # how far back the batch list is searched for one a kill left unrecorded


# ---------------------------------------------------------------------------- the state file

def read_state(folder: Path) -> dict | None:
    path = Path(folder) / BATCHES_FILE
    if not path.is_file():
        return None
    try:
        state = read_json(path)
        if not isinstance(state["history"], list) or not isinstance(state["pending"], (dict, type(None))):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{path}: not a batch state file of this code; delete it and rerun (a batch it "
                        "names that is still running is paid for even so)") from None
    return state


def save_state(folder: Path, state: dict) -> None:
    """Atomically (utils.io.write_json): a kill leaves the previous state or this one, never half."""
    write_json(Path(folder) / BATCHES_FILE, state)


def refuse_pending(folder: Path) -> None:
    """For the per-request path: asking again for images a submitted batch will answer pays twice."""
    state = read_state(folder)
    pending = state and state["pending"]
    parts = [part for part in (pending or {}).get("parts", []) if part["input_file_id"]]
    if parts:
        ids = ", ".join(part["batch_id"] or part["input_file_id"] for part in parts)
        raise UserError(f"{Path(folder) / BATCHES_FILE}: batch {ids} of an earlier --batch_api run is still "
                        f"pending for {len(pending['requests'])} images; rerun with --batch_api to collect it "
                        "(deleting that file asks for them again per request, paying twice)")


def _entry(image: str) -> dict:
    """What the earlier asks for one image left: attempts, tokens, an answer only naming the emotion."""
    return {"image": image, "attempts": 0, "prompt_tokens": 0, "completion_tokens": 0, "mentioned": None}


def _round(number: int, entries: dict) -> dict:
    return {"round": number, "requests": entries, "parts": []}


# ---------------------------------------------------------------------------- a run

class BatchRun:
    """Submit, wait for and collect rounds of batches until every image has its final outcome.

    ``request_of(image)`` rebuilds the request of a training image recorded in the state file (None
    when it is no longer one); ``say`` prints a line."""

    def __init__(self, backend: OpenAIBackend, folder: Path, generator: str,
                 request_of: Callable[[str], Request | None], class_names, max_bytes: int,
                 poll_seconds: float, say: Callable[[str], None] = print):
        self.backend, self.client = backend, backend.client
        self.folder, self.generator, self.request_of = Path(folder), generator, request_of
        self.class_names, self.max_bytes, self.poll_seconds, self.say = class_names, max_bytes, poll_seconds, say
        self.where = str(self.client.base_url).rstrip("/")
        self.path = self.folder / BATCHES_FILE
        self.state = read_state(self.folder) or {"model": backend.model, "base_url": self.where,
                                                 "pending": None, "history": []}

    def run(self, requests: list[Request]) -> Tally:
        """First the round a killed run left pending (and its follow-ups), then ``requests``
        (those images it holds left out)."""
        tally = Tally()
        pending = self.state["pending"]
        if pending is not None:
            self._check_resumable()
            images = {entry["image"] for entry in pending["requests"].values()}
            requests = [request for request in requests if request.sample.path not in images]
            ids = [part["batch_id"] or part["input_file_id"] for part in pending["parts"]]
            self.say(f"resuming the Batch API run recorded in {self.path}: round {pending['round']}, "
                     f"{len(images)} images" + (f", batch {', '.join(ids)}" if ids else ""))
        while True:
            if self.state["pending"] is None:
                if not requests:
                    return tally
                self.state.update(model=self.backend.model, base_url=self.where)
                self.state["pending"] = _round(1, {f"r{i}": _entry(request.sample.path)
                                                   for i, request in enumerate(requests)})
                requests = []
            self._submit()
            if self.state["pending"] is not None:
                self._collect(self._wait(), tally)

    # ------------------------------------------------------------------ submitting

    def _check_resumable(self) -> None:
        model, where = self.state["model"], self.state["base_url"]
        if (model, where) != (self.backend.model, self.where):
            raise UserError(f"{self.path}: the pending batch was submitted to {where} with --model {model}; "
                            "rerun with those flags to collect it (or delete that file to forget it: a batch "
                            "still running is paid for even so)")

    def _submit(self) -> None:
        """Upload and submit what of the pending round is not submitted yet."""
        pending = self.state["pending"]
        for part in pending["parts"]:
            if part["batch_id"] is None:  # uploaded by a run killed before it recorded its batch
                part["batch_id"] = self._find(part)
                if part["batch_id"] is not None:
                    save_state(self.folder, self.state)
                    self.say(f"found batch {part['batch_id']}, submitted before the interruption")
                else:
                    self._create(part)
        placed = {cid for part in pending["parts"] for cid in part["custom_ids"]}
        todo = [cid for cid in pending["requests"] if cid not in placed]
        if todo:  # a follow-up round recorded but not submitted: its images may be annotated since
            annotated = annotated_images(self.folder, self.class_names)
            for cid in todo:
                if pending["requests"][cid]["image"] in annotated:
                    del pending["requests"][cid]
            todo = [cid for cid in todo if cid in pending["requests"]]
        while todo:
            part, todo = self._upload(todo)
            if part is None:
                continue
            pending["parts"].append(part)
            save_state(self.folder, self.state)
            self._create(part)
        if not pending["parts"]:  # nothing of it left to ask (annotated since, or no longer training images)
            self.state["pending"] = None
            save_state(self.folder, self.state)

    def _upload(self, todo: list[str]) -> tuple[dict | None, list[str]]:
        """The next batch input file from ``todo``, uploaded: ``(part, rest of todo)``."""
        pending = self.state["pending"]
        path, ids, used, size = self.folder / INPUT_FILE, [], 0, 0  # used: of todo, in the file or dropped
        try:
            with open(path, "w", encoding="ascii") as fh:
                for cid in todo:
                    request = self.request_of(pending["requests"][cid]["image"])
                    if request is None:  # no longer a training image (the dataset changed)
                        del pending["requests"][cid]
                        used += 1
                        continue
                    line = json.dumps({"custom_id": cid, "method": "POST", "url": ENDPOINT,
                                       "body": self.backend.request_body(request)}) + "\n"
                    if ids and (len(ids) >= MAX_REQUESTS or size + len(line) > self.max_bytes):
                        break
                    fh.write(line)
                    ids.append(cid)
                    used += 1
                    size += len(line)
            if not ids:
                return None, todo[used:]
            name = f"instructions-round{pending['round']}-{len(pending['parts']) + 1}.jsonl"
            try:
                with open(path, "rb") as fh:
                    file = self.client.files.create(file=(name, fh, "application/jsonl"), purpose="batch")
            except openai.APIError as err:
                self._drop_unsubmitted()
                raise self._api_error(err, refused=f"the batch input file {name} ({len(ids)} requests, "
                                                   f"{size / 2 ** 20:.1f} MB)") from None
        finally:
            path.unlink(missing_ok=True)
        return ({"custom_ids": ids, "input_file_id": file.id, "batch_id": None,
                 "uploaded_at": int(time.time())}, todo[used:])

    def _create(self, part: dict) -> None:
        pending = self.state["pending"]
        try:  # not retried by the client: a retry after a lost answer could submit (and bill) it twice
            batch = self.client.with_options(max_retries=0).batches.create(
                input_file_id=part["input_file_id"], endpoint=ENDPOINT, completion_window=COMPLETION_WINDOW,
                metadata={"stage": "instructions", "round": str(pending["round"])})
        except (openai.APIConnectionError, openai.InternalServerError, openai.RateLimitError) as err:
            raise UserError(f"no answer from {self.where} when submitting the batch of {part['input_file_id']} "
                            f"({self._detail(err)}); rerun the same command: it first looks for a batch made "
                            "from that file, so nothing is submitted twice") from None
        except openai.APIError as err:
            self._drop_unsubmitted()
            raise self._api_error(err, refused=f"the batch of {part['input_file_id']}") from None
        part["batch_id"] = batch.id
        save_state(self.folder, self.state)
        self.say(f"submitted batch {batch.id}: {len(part['custom_ids'])} requests, round {pending['round']} "
                 f"of up to {self.backend.max_attempts}; recorded in {self.path}, so a rerun resumes waiting "
                 f"for it (the API answers within {COMPLETION_WINDOW})")

    def _find(self, part: dict) -> str | None:
        """The batch made from ``part``'s input file, if a killed run created it unrecorded."""
        since = part["uploaded_at"] - FIND_WINDOW_S
        try:
            for batch in self.client.batches.list(limit=100):
                if batch.input_file_id == part["input_file_id"]:
                    return batch.id
                if batch.created_at < since:
                    break
        except openai.APIError as err:
            raise self._api_error(err) from None
        return None

    def _drop_unsubmitted(self) -> None:
        """Forget what of the pending round is not submitted (a rerun asks for it again)."""
        pending = self.state["pending"]
        pending["parts"] = [part for part in pending["parts"] if part["batch_id"] is not None]
        kept = {cid for part in pending["parts"] for cid in part["custom_ids"]}
        pending["requests"] = {cid: e for cid, e in pending["requests"].items() if cid in kept}
        if not pending["parts"]:
            self.state["pending"] = None
        save_state(self.folder, self.state)

    # ------------------------------------------------------------------ waiting

    def _wait(self) -> list:
        """Poll every ``poll_seconds`` until each batch of the round has ended; a progress line."""
        pending = self.state["pending"]
        parts = pending["parts"]
        total = sum(len(part["custom_ids"]) for part in parts)
        batches: dict = {}
        failures = 0
        with tqdm(total=total, desc=f"batch round {pending['round']}", unit="req") as progress:
            while True:
                try:
                    for part in parts:
                        seen = batches.get(part["batch_id"])
                        if seen is None or seen.status not in ENDED:
                            batches[part["batch_id"]] = self.client.batches.retrieve(part["batch_id"])
                    failures = 0
                except (openai.APIConnectionError, openai.InternalServerError, openai.RateLimitError) as err:
                    failures += 1
                    if failures >= MAX_POLL_FAILURES:
                        raise UserError(f"lost contact with {self.where} while waiting for the batches in "
                                        f"{self.path} ({self._detail(err)}); they keep running: rerun the "
                                        "same command to resume waiting") from None
                except openai.NotFoundError as err:
                    raise UserError(f"{self.where} knows no batch {part['batch_id']} (recorded in {self.path}; "
                                    f"{self._detail(err)}); check --base_url and the key, or delete that file "
                                    "to submit again") from None
                except openai.APIError as err:
                    raise self._api_error(err) from None
                counts = [b.request_counts for b in batches.values() if b.request_counts is not None]
                progress.n = min(total, sum(c.completed + c.failed for c in counts))
                states = Counter(b.status for b in batches.values())
                progress.set_postfix_str(", ".join(f"{n} {status}" for status, n in sorted(states.items())),
                                         refresh=False)
                progress.refresh()
                if len(batches) == len(parts) and all(b.status in ENDED for b in batches.values()):
                    return [batches[part["batch_id"]] for part in parts]
                time.sleep(self.poll_seconds)

    # ------------------------------------------------------------------ collecting

    def _collect(self, batches: list, tally: Tally) -> None:
        """Check every answer, write the final outcomes, record the follow-up round (or none)."""
        pending = self.state["pending"]
        results, batch_of = {}, {}
        for part, batch in zip(pending["parts"], batches):
            batch_of.update((cid, batch) for cid in part["custom_ids"])
            for file_id in (batch.output_file_id, batch.error_file_id):
                if file_id:
                    results.update(self._results(file_id))
        complete = all(batch.status == "completed" for batch in batches)
        annotated = annotated_images(self.folder, self.class_names)  # those written before a kill stay
        final, failed, retry, written = [], [], {}, Counter()
        for cid, entry in pending["requests"].items():
            request = self.request_of(entry["image"])
            if request is None or entry["image"] in annotated:
                continue
            outcome = Outcome(request, "rejected", attempts=entry["attempts"], prompt_tokens=entry["prompt_tokens"],
                              completion_tokens=entry["completion_tokens"])
            mentioned = self._mentioned(entry, request)
            batch = batch_of[cid]
            body, reason = results.get(cid, (None, f"no answer in batch {batch.id} ({batch.status})"))
            if body is not None:
                try:
                    mentioned = self.backend.take_answer(outcome, ChatCompletion.construct(**body), mentioned)
                except (TypeError, AttributeError, ValueError) as err:
                    body, reason = None, f"not a chat completion ({err.__class__.__name__}: {err})"
            if body is None:
                outcome.status, outcome.reason = "failed", reason
                failed.append(outcome)
            elif outcome.status != "done" and outcome.attempts < self.backend.max_attempts:
                if complete:
                    retry[cid] = {**entry, "attempts": outcome.attempts, "prompt_tokens": outcome.prompt_tokens,
                                  "completion_tokens": outcome.completion_tokens,
                                  "mentioned": mentioned[1] if mentioned else None}
                else:  # the round ends here: asked again by a rerun
                    outcome.status = "failed"
                    outcome.reason = f"{outcome.reason}; not asked again: batch {batch.id} {batch.status}"
                    failed.append(outcome)
            else:
                final.append(keep_mention(outcome, mentioned, self.backend.reject_label_mentions))
                written[batch.id] += 1
        write_outcomes(final, self.folder, self.generator, tally)
        for outcome in failed:
            tally.failed += 1
            tally.prompt_tokens += outcome.prompt_tokens
            tally.completion_tokens += outcome.completion_tokens
        self._report(failed)
        self.state["history"].extend(
            {"batch_id": batch.id, "round": pending["round"], "status": batch.status,
             "requests": len(part["custom_ids"]), "input_file_id": part["input_file_id"],
             "output_file_id": batch.output_file_id, "error_file_id": batch.error_file_id}
            for part, batch in zip(pending["parts"], batches))
        self.state["pending"] = _round(pending["round"] + 1, retry) if retry else None
        save_state(self.folder, self.state)
        if retry:
            self.say(f"round {pending['round']}: {len(retry)} answers refused; asking for them again")
        if not complete:
            raise self._unfinished(pending, batches, written)

    def _mentioned(self, entry: dict, request: Request) -> tuple | None:
        if entry["mentioned"] is None:
            return None
        sections, _ = check_answer(entry["mentioned"], request.emotion, self.backend.accept_unstructured,
                                   allow_mention=True)
        return (sections, entry["mentioned"]) if sections is not None else None

    def _results(self, file_id: str) -> dict[str, tuple[dict | None, str]]:
        """``custom_id -> (completion body, "")``, or ``(None, why)`` for a request that failed."""
        try:
            data = self.client.files.content(file_id).content
        except openai.APIError as err:
            raise self._api_error(err) from None
        results = {}
        for line in data.decode("utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if not isinstance(record, dict) or not isinstance(record.get("custom_id"), str):
                continue
            response, error = record.get("response") or {}, record.get("error")
            status, body = response.get("status_code"), response.get("body")
            if status == 200 and not error:
                results[record["custom_id"]] = (body, "")
                continue
            if isinstance(error, dict):
                reason = f"{error.get('code')}: {error.get('message')}"
            else:
                message = body.get("error", {}).get("message") if isinstance(body, dict) else body
                reason = f"HTTP {status}: {message}"
            results[record["custom_id"]] = (None, self._redact(reason))
        return results

    def _report(self, failed: list[Outcome]) -> None:
        """One line per reason: a batch often fails many requests alike."""
        groups = defaultdict(list)
        for outcome in failed:
            groups[outcome.reason].append(outcome.request.sample.path)
        for reason, images in groups.items():
            more = f" and {len(images) - 1} more" if len(images) > 1 else ""
            self.say(f"failed: {images[0]}{more}: {reason}")

    def _unfinished(self, pending: dict, batches: list, written: Counter) -> UserError:
        ended = [(part, batch) for part, batch in zip(pending["parts"], batches) if batch.status != "completed"]
        part, batch = ended[0]
        count = len(part["custom_ids"])
        if batch.status == "failed":
            errors = (batch.errors.data if batch.errors is not None else None) or []
            why = self._redact(f"{errors[0].code}: {errors[0].message}") if errors else "no reason given"
            text = (f"batch {batch.id} failed ({why}); none of its {count} requests was answered; rerun the "
                    "same command to submit them again")
        else:
            how = (f"expired (not finished within {COMPLETION_WINDOW})" if batch.status == "expired"
                   else "was cancelled")
            text = (f"batch {batch.id} {how}; {written[batch.id]} of its {count} images have their answer "
                    "written; rerun the same command to ask for the rest")
        if len(ended) > 1:
            text += f" ({len(ended) - 1} more batch(es) of this round did not complete either)"
        return UserError(text)

    # ------------------------------------------------------------------ errors

    def _redact(self, text: str) -> str:
        text = " ".join(str(text).split())
        secret = self.backend._secret
        return text.replace(secret, "***") if secret else text

    def _detail(self, err) -> str:
        return f"{err.__class__.__name__}: {self.backend._message(err)}"

    def _api_error(self, err, refused: str | None = None) -> UserError:
        """One line for an error of the files or batches endpoints."""
        if isinstance(err, (openai.AuthenticationError, openai.APIConnectionError)):
            return self.backend._fatal(err)
        if isinstance(err, openai.PermissionDeniedError):
            return UserError(f"{self.where}: this key may not use the Batch API ({self._detail(err)})")
        if isinstance(err, openai.NotFoundError):
            return UserError(f"{self.where} has no Batch API ({self._detail(err)}); ask per request, "
                             "without --batch_api")
        if refused is not None:
            return UserError(f"{self.where} refused {refused} ({self._detail(err)}); nothing of it was submitted: "
                             "rerun the same command to try again (a smaller --batch_max_mb or --limit sends "
                             "less at once)")
        return UserError(f"{self.where}: {self._detail(err)}; rerun the same command to resume (the batches "
                         f"in {self.path} keep running)")
