"""A loopback OpenAI-compatible server for tests: the real ``openai`` client talks to it over HTTP.

``POST /v1/chat/completions`` is answered from a script of replies (first in, first out), then by
a default responder; every request is recorded (path, headers, JSON body). Successful replies
carry ``usage`` fields like the real API; errors use the API's ``{"error": {...}}`` body.
"""
from __future__ import annotations

import json
import re
import threading
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
        self.requests: list[dict] = []  # {"path", "headers", "body"}
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
        return [r["body"] for r in self.requests if r["path"].endswith("/chat/completions")]

    def __enter__(self) -> "FakeOpenAIServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def _next_reply(self, path: str, body: dict, headers: dict) -> Reply:
        with self._lock:
            self.requests.append({"path": path, "headers": headers, "body": body})
            scripted = self.script.popleft() if self.script else self.default
        return scripted if isinstance(scripted, Reply) else scripted(body, headers)

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                length = int(self.headers.get("content-length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                headers = {k.lower(): v for k, v in self.headers.items()}
                reply = server._next_reply(self.path, body, headers)
                if reply.raw is not None:
                    payload = reply.raw
                elif reply.status >= 400:
                    payload = json.dumps({"error": {"message": reply.error, "type": "fake_error",
                                                    "code": reply.status}}).encode()
                else:
                    payload = json.dumps(_completion(body, reply.content)).encode()
                self.send_response(reply.status)
                self.send_header("content-type", reply.content_type)
                self.send_header("content-length", str(len(payload)))
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):  # keep test output quiet
                pass

        return Handler


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
