"""A stand-in provider API for the drills: OpenAI-compatible chat completions on loopback that
can be told to answer, refuse every call with 429, or stall past the worker's timeout."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MODES = ("ok", "429", "stall")


class FakeProvider:
    """Serves POST /v1/chat/completions on a free port until `stop()`; `mode` may change at any time."""

    def __init__(self, stall_s: float = 5.0):
        self.mode = "ok"
        self.stall_s = stall_s
        self.calls = {mode: 0 for mode in MODES}
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self._server.server_address[1]}/v1"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _count(self) -> str:
        with self._lock:
            mode = self.mode
            self.calls[mode] += 1
        return mode

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        provider = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # the drill's output is its table, not access logs
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                mode = provider._count()
                if mode == "429":
                    return self._send(429, {"error": {"message": "rate limited", "type": "rate_limit"}},
                                      {"Retry-After": "1"})
                if mode == "stall":
                    time.sleep(provider.stall_s)
                words = sum(len(str(m.get("content", "")).split()) for m in body.get("messages", []))
                completion = min(int(body.get("max_tokens") or 16), 4)
                self._send(200, {
                    "id": "chaos", "object": "chat.completion", "model": body.get("model", "chaos"),
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "a steady answer"},
                                 "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": words + 8, "completion_tokens": completion,
                              "total_tokens": words + 8 + completion},
                })

            def _send(self, code: int, payload: dict, headers: dict[str, str] | None = None) -> None:
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the worker gave up on a stalled call
                    pass

        return Handler
