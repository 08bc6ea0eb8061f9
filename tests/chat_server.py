"""A real, scriptable OpenAI-compatible chat-completions server for tests.

It listens on 127.0.0.1 (a free port) in a background thread and records every
request. By default it answers like a well-behaved model: an LLM request (text
content) gets a numbered list of as many distinct descriptions as the system
message asks for ("exactly N"), a VQA request (content parts with an image) gets
one distinct description. Tests change that by queueing replies
(:meth:`ChatServer.queue`) or by setting :attr:`ChatServer.responder`, a function
``(body) -> Reply | None`` (``None`` falls back to the default answer)::

    with ChatServer() as server:
        server.queue(Reply.status(500), Reply.text("1. a crack on the rim"))
        ... ChatClient(server.url, "test-model") ...
        assert len(server.requests) == 2

Test modules get a fresh one per test by importing the :func:`server` fixture.
"""

from __future__ import annotations

import itertools
import json
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest


@dataclass(frozen=True)
class Reply:
    """One scripted answer."""

    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  #: seconds to sleep before answering

    @classmethod
    def text(cls, content: str) -> Reply:
        """A normal 200 answer whose message content is ``content`` (may be empty)."""
        payload = {
            "id": "chatcmpl-test",
            "object": "chat.completion",
            "model": "test-model",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        }
        return cls(body=json.dumps(payload).encode("utf-8"), headers={"Content-Type": "application/json"})

    @classmethod
    def error(cls, status: int, retry_after: str | None = None) -> Reply:
        """An error status, optionally with ``Retry-After``."""
        headers = {"Content-Type": "application/json"}
        if retry_after is not None:
            headers["Retry-After"] = retry_after
        return cls(status=status, body=b'{"error": {"message": "scripted failure"}}', headers=headers)

    @classmethod
    def malformed(cls) -> Reply:
        """A 200 answer whose body is not valid JSON."""
        return cls(body=b'{"choices": [ this is not json', headers={"Content-Type": "application/json"})

    @classmethod
    def slow(cls, seconds: float, then: Reply | None = None) -> Reply:
        """Sleep ``seconds`` before answering ``then`` (default: an empty 200)."""
        base = then or cls.text("1. too late to matter")
        return cls(status=base.status, body=base.body, headers=base.headers, delay=seconds)


@dataclass(frozen=True)
class Request:
    """One recorded request."""

    path: str
    body: dict[str, Any]
    headers: dict[str, str]
    time: float  #: time.monotonic() when it arrived

    @property
    def messages(self) -> list[dict[str, Any]]:
        return self.body.get("messages", [])

    @property
    def user_content(self) -> Any:
        """The content of the last user message (a string, or a list of parts)."""
        return [m for m in self.messages if m.get("role") == "user"][-1]["content"]

    @property
    def is_vqa(self) -> bool:
        return isinstance(self.user_content, list)

    @property
    def prompt(self) -> str:
        """The text of the last user message."""
        content = self.user_content
        if isinstance(content, str):
            return content
        return "".join(p.get("text", "") for p in content if p.get("type") == "text")

    @property
    def image_url(self) -> str | None:
        content = self.user_content
        if isinstance(content, str):
            return None
        urls = [p["image_url"]["url"] for p in content if p.get("type") == "image_url"]
        return urls[0] if urls else None

    @property
    def asked_n(self) -> int | None:
        """The number of descriptions the system message asks for, if any."""
        system = " ".join(m.get("content", "") for m in self.messages if m.get("role") == "system")
        match = re.search(r"exactly (\d+)", system)
        return int(match.group(1)) if match else None


class ChatServer:
    """A threaded chat-completions server on 127.0.0.1; use as a context manager."""

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.in_flight = 0
        self.max_in_flight = 0  #: the most requests handled at the same time
        self.responder: Callable[[Request], Reply | None] | None = None
        self._queue: deque[Reply] = deque()
        self._lock = threading.Lock()
        self._counter = itertools.count(1)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        """The base URL clients use (``.../v1``)."""
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    def queue(self, *replies: Reply) -> None:
        """Answer the next requests with ``replies``, in order, before any responder/default."""
        with self._lock:
            self._queue.extend(replies)

    def __enter__(self) -> ChatServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    # ------------------------------------------------------------------ internals
    def default_reply(self, request: Request) -> Reply:
        """A well-behaved model's answer: ``asked_n`` numbered descriptions, or one VQA description."""
        label = request.prompt.split("(")[-1].split(")")[0] if request.is_vqa else request.prompt
        if request.is_vqa:
            return Reply.text(
                f"The {label} shows anomaly number {next(self._counter)}: a small dark scratch near the centre."
            )
        n = request.asked_n or 5
        lines = [
            f"{i}. Generated description {next(self._counter)} of a defect seen in: {label}" for i in range(1, n + 1)
        ]
        return Reply.text("Here are the descriptions:\n" + "\n".join(lines))

    def _reply_for(self, request: Request) -> Reply:
        with self._lock:
            self.requests.append(request)
            if self._queue:
                return self._queue.popleft()
        if self.responder is not None:
            reply = self.responder(request)
            if reply is not None:
                return reply
        with self._lock:
            return self.default_reply(request)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence the log
                pass

            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                length = int(self.headers.get("Content-Length", "0"))
                raw = self.rfile.read(length)
                if not self.path.endswith("/chat/completions"):
                    self._send(Reply.error(404))
                    return
                try:
                    body = json.loads(raw)
                except ValueError:
                    self._send(Reply.error(400))
                    return
                request = Request(self.path, body, dict(self.headers.items()), time.monotonic())
                with server._lock:
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    self._send(server._reply_for(request))
                finally:
                    with server._lock:
                        server.in_flight -= 1

            def _send(self, reply: Reply) -> None:
                if reply.delay:
                    time.sleep(reply.delay)
                try:
                    self.send_response(reply.status)
                    for key, value in reply.headers.items():
                        self.send_header(key, value)
                    self.send_header("Content-Length", str(len(reply.body)))
                    self.end_headers()
                    self.wfile.write(reply.body)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
                    pass

        return Handler


@pytest.fixture
def server():
    """A fresh :class:`ChatServer`, running for the duration of one test."""
    with ChatServer() as running:
        yield running
