"""A loopback OpenAI-compatible server for tests: the real ``openai`` client talks to it over HTTP.

``POST /v1/chat/completions`` is answered from a script of replies (first in, first out), then by
a default responder; every request is recorded (path, headers, JSON body). Successful replies
carry ``usage`` fields like the real API; errors use the API's ``{"error": {...}}`` body.

The Batch API too: ``POST /v1/files`` (multipart upload), ``GET /v1/files/{id}/content``,
``POST /v1/batches``, ``GET /v1/batches/{id}`` and ``GET /v1/batches`` (newest first). A batch
answers ``batch_polls`` retrieves "in_progress", then ends as ``batch_end`` says: "completed"
(every line of its input file answered by the same script and default responder, in file order,
200 replies into the output file, the others into the error file), "expired" (only the first
``expire_after`` lines answered, the rest "batch_expired" in the error file), "failed" (nothing
answered; ``errors`` says why) or "cancelled" (like "expired"). ``upload_reply``, when set,
answers every upload instead (a refused upload, a bad key).
"""
from __future__ import annotations

import email.parser
import email.policy
import itertools
import json
import re
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Union


@dataclass
class Reply:
    content: str | None = None                   # assistant text of a 200 reply
    status: int = 200
    headers: dict = field(default_factory=dict)  # e.g. {"retry-after-ms": "10"}
    raw: bytes | None = None                     # a body sent as is (malformed responses)
    content_type: str = "application/json"       # e.g. "text/html" for a proxy's page
    error: str = "error"                         # message of a >= 400 reply


Responder = Callable[[dict, dict], Reply]  # (JSON body, lower-case headers) -> Reply
Scripted = Union[Reply, Responder]


def prompt_text(body: dict) -> str:
    return " ".join(part.get("text", "") for message in body["messages"]
                    for part in message["content"] if isinstance(part, dict))


def image_urls(body: dict) -> list[str]:
    return [part["image_url"]["url"] for message in body["messages"] for part in message["content"]
            if isinstance(part, dict) and part.get("type") == "image_url"]


def emotion_of(body: dict) -> str:
    """The true emotion named in a stage-0 prompt."""
    return re.search(r"evokes '([^']+)'", prompt_text(body)).group(1)


def good_answer(body: dict, headers: dict) -> Reply:
    return Reply("1. Key elements: a bright shape on a plain background, strong colours.\n"
                 "2. Reasoning: the contrast and the bold shape draw the eye and set the mood.")


def leaking_answer(body: dict, headers: dict) -> Reply:
    return Reply(f"1. Key elements: a shape.\n2. Reasoning: it clearly shows {emotion_of(body)}.")


def refusing_key(body: dict, headers: dict) -> Reply:
    # Like some real servers, echo (part of) the key: the client side must not print it.
    return Reply(status=401, error=f"Incorrect API key provided: {headers.get('authorization', '')}")


class FakeOpenAIServer:
    """``with FakeOpenAIServer() as server:`` then ``base_url=server.url``."""

    def __init__(self, default: Responder = good_answer):
        self.default = default
        self.script: deque[Scripted] = deque()
        self.requests: list[dict] = []  # {"path", "headers", "body"}; a batch's lines also have "batch"
        # the Batch API
        self.files: dict[str, dict] = {}    # id -> {"filename", "purpose", "data"}
        self.batches: dict[str, dict] = {}  # id -> the batch object as last sent
        self.batch_creations = 0            # POST /v1/batches answered with a new batch
        self.batch_polls = 0                # retrieves a batch answers "in_progress" before it ends
        self.batch_end = "completed"        # "completed", "expired", "failed" or "cancelled"
        self.expire_after = 0               # lines an expired or cancelled batch answered
        self.batch_error = ("token_limit_exceeded", "Enqueued token limit reached for gpt-4o.")
        self.upload_reply: Reply | None = None  # answers POST /v1/files instead of storing the file
        self._ids = itertools.count(1)
        self._polls: dict[str, int] = {}
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def queue(self, *replies: Scripted) -> None:
        self.script.extend(replies)

    def chat_bodies(self) -> list[dict]:
        """Bodies of the synchronous chat requests (not the lines of batches)."""
        return [r["body"] for r in self.requests if r["path"].endswith("/chat/completions") and "batch" not in r]

    def batch_bodies(self, batch_id: str | None = None) -> list[dict]:
        """Bodies of the requests batches answered (of one batch, given its id), in answering order."""
        return [r["body"] for r in self.requests if "batch" in r and batch_id in (None, r["batch"])]

    def batch_lines(self, batch_id: str) -> list[dict]:
        """The input file of a batch, line by line."""
        data = self.files[self.batches[batch_id]["input_file_id"]]["data"]
        return [json.loads(line) for line in data.decode().splitlines() if line.strip()]

    def __enter__(self) -> "FakeOpenAIServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                length = int(self.headers.get("content-length", 0))
                raw = self.rfile.read(length)
                headers = {k.lower(): v for k, v in self.headers.items()}
                path = self.path.split("?")[0]
                if path.endswith("/files"):
                    return self._send(*server._upload(raw, headers))
                body = json.loads(raw or b"{}")
                if path.endswith("/batches"):
                    return self._send(*server._create_batch(body, headers))
                reply = server._next_reply(self.path, body, headers)
                if reply.raw is not None:
                    payload = reply.raw
                elif reply.status >= 400:
                    payload = _error(reply).encode()
                else:
                    payload = json.dumps(_completion(body, reply.content)).encode()
                self._send(reply.status, payload, reply.headers, reply.content_type)

            def do_GET(self):  # noqa: N802
                path = self.path.split("?")[0]
                headers = {k.lower(): v for k, v in self.headers.items()}
                with server._lock:
                    server.requests.append({"path": path, "headers": headers, "body": None})
                found = re.fullmatch(r".*/files/([^/]+)/content", path)
                if found:
                    file = server.files.get(found.group(1))
                    if file is None:
                        return self._send(404, _error(Reply(status=404, error="No such File object")).encode())
                    return self._send(200, file["data"], {}, "application/octet-stream")
                found = re.fullmatch(r".*/batches/([^/]+)", path)
                if found:
                    return self._send(*server._retrieve_batch(found.group(1)))
                if path.endswith("/batches"):
                    with server._lock:
                        batches = sorted(server.batches.values(), key=lambda b: (b["created_at"], b["_n"]),
                                         reverse=True)
                    data = [_public(b) for b in batches]
                    return self._send(200, json.dumps({"object": "list", "data": data, "has_more": False,
                                                       "first_id": None, "last_id": None}).encode())
                self._send(404, _error(Reply(status=404, error=f"no route {path}")).encode())

            def _send(self, status: int, payload: bytes, extra: dict | None = None,
                      kind: str = "application/json") -> None:
                self.send_response(status)
                self.send_header("content-type", kind)
                self.send_header("content-length", str(len(payload)))
                for name, value in (extra or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):  # keep test output quiet
                pass

        return Handler

    # ------------------------------------------------------------------ the Batch API

    def _upload(self, raw: bytes, headers: dict) -> tuple[int, bytes]:
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            f"content-type: {headers.get('content-type', '')}\r\n\r\n".encode() + raw)
        fields = {}
        for part in message.iter_parts():
            fields[part.get_param("name", header="content-disposition")] = (
                part.get_filename(), part.get_payload(decode=True))
        with self._lock:
            self.requests.append({"path": "/v1/files", "headers": headers,
                                  "body": {"purpose": fields.get("purpose", (None, b""))[1].decode(),
                                           "filename": fields.get("file", (None, None))[0]}})
            reply = self.upload_reply
            if reply is not None:
                return reply.status, _error(reply).encode()
            filename, data = fields["file"]
            file_id = f"file-{next(self._ids)}"
            self.files[file_id] = {"filename": filename, "purpose": fields["purpose"][1].decode(), "data": data}
        return 200, json.dumps(_file_object(file_id, self.files[file_id])).encode()

    def _create_batch(self, body: dict, headers: dict) -> tuple[int, bytes]:
        with self._lock:
            self.requests.append({"path": "/v1/batches", "headers": headers, "body": body})
            if body.get("input_file_id") not in self.files:
                return 400, _error(Reply(status=400, error=f"no file {body.get('input_file_id')}")).encode()
            number = next(self._ids)
            batch = {"id": f"batch_{number}", "object": "batch", "endpoint": body["endpoint"],
                     "input_file_id": body["input_file_id"], "completion_window": body["completion_window"],
                     "status": "validating", "created_at": int(time.time()), "metadata": body.get("metadata"),
                     "output_file_id": None, "error_file_id": None, "errors": None,
                     "request_counts": {"total": 0, "completed": 0, "failed": 0}, "_n": number}
            self.batches[batch["id"]] = batch
            self.batch_creations += 1
            self._polls[batch["id"]] = 0
        return 200, json.dumps(_public(batch)).encode()

    def _retrieve_batch(self, batch_id: str) -> tuple[int, bytes]:
        with self._lock:
            batch = self.batches.get(batch_id)
            if batch is None:
                return 404, _error(Reply(status=404, error=f"No batch found with id '{batch_id}'.")).encode()
            if batch["status"] in ("validating", "in_progress"):
                self._polls[batch_id] += 1
                if self._polls[batch_id] <= self.batch_polls:
                    batch["status"] = "in_progress"
                    total = len(self.batch_lines(batch_id))
                    batch["request_counts"] = {"total": total, "completed": min(self._polls[batch_id] - 1, total),
                                               "failed": 0}
                    return 200, json.dumps(_public(batch)).encode()
                end, batch["status"] = self.batch_end, "finalizing"
            else:
                return 200, json.dumps(_public(batch)).encode()
        self._finish(batch, end)  # answers outside the lock: responders may take it
        return 200, json.dumps(_public(batch)).encode()

    def _finish(self, batch: dict, end: str) -> None:
        lines = self.batch_lines(batch["id"])
        if end == "failed":
            code, message = self.batch_error
            batch.update(status="failed", errors={"object": "list", "data": [
                {"code": code, "message": message, "param": None, "line": None}]},
                request_counts={"total": len(lines), "completed": 0, "failed": 0})
            return
        answered = len(lines) if end == "completed" else self.expire_after
        output, errors = [], []
        for number, line in enumerate(lines):
            record = {"id": f"batch_req_{number}", "custom_id": line["custom_id"]}
            if number >= answered:
                errors.append({**record, "response": None, "error": {
                    "code": "batch_expired",
                    "message": "This request could not be executed before the completion window expired."}})
                continue
            reply = self._next_reply(line["url"], line["body"], {}, batch=batch["id"])
            if reply.status >= 400:
                errors.append({**record, "error": None, "response": {
                    "status_code": reply.status, "request_id": f"req_{number}", "body": json.loads(_error(reply))}})
            else:
                body = reply.raw.decode() if reply.raw is not None else _completion(line["body"], reply.content)
                output.append({**record, "error": None, "response": {
                    "status_code": reply.status, "request_id": f"req_{number}", "body": body}})
        with self._lock:
            for key, records in (("output_file_id", output), ("error_file_id", errors)):
                if records:
                    file_id = f"file-{next(self._ids)}"
                    self.files[file_id] = {"filename": f"{batch['id']}_{key}.jsonl", "purpose": "batch_output",
                                           "data": "".join(json.dumps(r) + "\n" for r in records).encode()}
                    batch[key] = file_id
            batch["status"] = end
            batch["request_counts"] = {"total": len(lines), "completed": len(output), "failed": len(errors)}

    def _next_reply(self, path: str, body: dict, headers: dict, batch: str | None = None) -> Reply:
        with self._lock:
            self.requests.append({"path": path, "headers": headers, "body": body,
                                  **({"batch": batch} if batch else {})})
            scripted = self.script.popleft() if self.script else self.default
        return scripted if isinstance(scripted, Reply) else scripted(body, headers)


def _completion(body: dict, content: str | None) -> dict:
    completion_tokens = len((content or "").split())
    return {
        "id": "chatcmpl-fake", "object": "chat.completion", "created": 0,
        "model": body.get("model", "fake"),
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": content}}],
        "usage": {"prompt_tokens": 100, "completion_tokens": completion_tokens,
                  "total_tokens": 100 + completion_tokens},
    }


def _error(reply: Reply) -> str:
    return json.dumps({"error": {"message": reply.error, "type": "fake_error", "code": reply.status}})


def _public(batch: dict) -> dict:
    return {key: value for key, value in batch.items() if not key.startswith("_")}


def _file_object(file_id: str, file: dict) -> dict:
    return {"id": file_id, "object": "file", "bytes": len(file["data"]), "created_at": int(time.time()),
            "filename": file["filename"], "purpose": file["purpose"], "status": "processed"}
