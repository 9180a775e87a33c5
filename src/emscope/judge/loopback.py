"""A minimal OpenAI-compatible chat-completions server on loopback (127.0.0.1).

For tests, benchmarks and offline trials of :class:`~emscope.judge.openai_judge.OpenAIJudge`:
it answers ``POST /v1/chat/completions`` with whatever a ``responder`` function returns
(status, headers, body: a JSON object, or ``bytes`` sent as they are, e.g. to fake a
broken endpoint), optionally after a delay, counts requests and the largest
number in flight, and stops by itself after ``lifetime`` seconds or ``max_requests``
requests (further requests get HTTP 503). Standard library only (``http.server``).
It keeps request bodies and the time they arrived, never request headers.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Reply = tuple[int, dict[str, str], dict[str, Any] | bytes]
Responder = Callable[[dict[str, Any]], Reply]

_ANSWER_RE = re.compile(r"\[ANSWER START\]\n(.*)\n\[ANSWER END\]", re.S)


def completion(top: Sequence[tuple[str, float]], model: str = "loopback") -> dict[str, Any]:
    """A chat-completion body whose first token has these ``(token, probability)`` top
    alternatives (probabilities are turned into logprobs)."""
    alternatives = [
        {"token": t, "logprob": math.log(p) if p > 0 else -9999.0, "bytes": list(t.encode())}
        for t, p in top
    ]
    first = alternatives[0] if alternatives else {"token": "", "logprob": 0.0, "bytes": []}
    return {
        "id": "chatcmpl-loopback",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": first["token"]},
                "finish_reason": "length",
                "logprobs": {"content": [{**first, "top_logprobs": alternatives}]},
            }
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }


def answer_of(body: dict[str, Any]) -> str:
    """The answer text between the built-in prompts' ANSWER markers ('' if none)."""
    content = body.get("messages", [{}])[-1].get("content", "")
    match = _ANSWER_RE.search(str(content))
    return match.group(1) if match else ""


def fixed_responder(top: Sequence[tuple[str, float]]) -> Responder:
    """Answer every request with the same top logprobs."""
    return lambda body: (200, {}, completion(top))


class LoopbackServer:
    """Context manager: ``with LoopbackServer(responder) as server: server.base_url``."""

    def __init__(
        self,
        responder: Responder,
        *,
        delay: float = 0.0,
        max_requests: int = 100_000,
        lifetime: float = 300.0,
    ) -> None:
        self.responder = responder
        self.delay = delay
        self.max_requests = max_requests
        self.lifetime = lifetime
        self.bodies: list[dict[str, Any]] = []
        self.times: list[float] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._timer: threading.Timer | None = None

    @property
    def requests(self) -> int:
        return len(self.bodies)

    @property
    def base_url(self) -> str:
        assert self._server is not None, "server not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def __enter__(self) -> LoopbackServer:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # no 40 ms delayed-ACK stalls on keep-alive

            def log_message(self, format: str, *args: Any) -> None:  # silence
                return

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                with owner._lock:
                    owner.in_flight += 1
                    owner.max_in_flight = max(owner.max_in_flight, owner.in_flight)
                    over = len(owner.bodies) >= owner.max_requests
                try:
                    body = json.loads(raw or b"{}")
                    with owner._lock:
                        owner.bodies.append(body)
                        owner.times.append(time.monotonic())
                    if owner.delay:
                        time.sleep(owner.delay)
                    answer: Reply
                    if over or not self.path.rstrip("/").endswith("/chat/completions"):
                        answer = (503 if over else 404, {}, {"error": "no"})
                    else:
                        answer = owner.responder(body)
                    status, headers, reply = answer
                finally:
                    with owner._lock:
                        owner.in_flight -= 1
                data = reply if isinstance(reply, bytes) else json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for key, value in headers.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 256

        self._server = Server(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self._timer = threading.Timer(self.lifetime, self.close)
        self._timer.daemon = True
        self._timer.start()
        return self

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._timer is not None:
            self._timer.cancel()

    def __exit__(self, *exc: object) -> None:
        self.close()
