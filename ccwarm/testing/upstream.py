"""A tiny Anthropic-shaped upstream on loopback that records what reaches it (tests, benchmarks)."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class RecordingUpstream:
    """A tiny Anthropic-shaped upstream on loopback that records what reaches it.

    Streaming replies send `message_start`, then wait for `release` (or a timeout) before the
    rest: a client that sees the first event while the upstream is still waiting proves that
    nothing on the way buffers the stream.
    """

    requests: list[Recorded] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)
    hold_seconds: float = 5.0
    hold_always: bool = False  # benchmarks: hold every stream for hold_seconds, no release needed
    port: int = 0

    def sse_events(self) -> list[tuple[str, dict]]:
        msg = {
            "id": "msg_up",
            "type": "message",
            "role": "assistant",
            "model": "m",
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 3, "output_tokens": 0},
        }
        return [
            ("message_start", {"type": "message_start", "message": msg}),
            (
                "content_block_start",
                {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
            ),
            (
                "content_block_delta",
                {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hello"}},
            ),
            ("content_block_stop", {"type": "content_block_stop", "index": 0}),
            (
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                    "usage": {"output_tokens": 1},
                },
            ),
            ("message_stop", {"type": "message_stop"}),
        ]

    def _handler(self):
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # small SSE writes must leave at once

            def log_message(self, *args) -> None:
                pass

            def _record(self) -> bytes:
                body = self.rfile.read(int(self.headers.get("content-length", 0) or 0))
                upstream.requests.append(Recorded(self.command, self.path, dict(self.headers), body))
                return body

            def do_GET(self) -> None:
                self._record()
                self._json({"data": []})

            def do_POST(self) -> None:
                body = self._record()
                try:
                    stream = json.loads(body).get("stream", False)
                except (ValueError, AttributeError):
                    stream = False
                if "count_tokens" in self.path:
                    self._json({"input_tokens": 3})
                elif stream:
                    self._stream()
                else:
                    self._json(
                        {
                            "id": "msg_up",
                            "type": "message",
                            "role": "assistant",
                            "model": "m",
                            "content": [{"type": "text", "text": "Hello"}],
                            "stop_reason": "end_turn",
                            "stop_sequence": None,
                            "usage": {"input_tokens": 3, "output_tokens": 1},
                        }
                    )

            def _json(self, obj: dict) -> None:
                data = json.dumps(obj).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _stream(self) -> None:
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.send_header("transfer-encoding", "chunked")
                self.end_headers()
                for i, (name, data) in enumerate(upstream.sse_events()):
                    chunk = f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    self.wfile.flush()
                    if i == 0:
                        if upstream.hold_always:
                            time.sleep(upstream.hold_seconds)
                        else:
                            upstream.release.wait(upstream.hold_seconds)
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()

        return Handler

    @contextlib.contextmanager
    def serve(self) -> Iterator[RecordingUpstream]:
        server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        server.daemon_threads = True
        self.port = server.server_address[1]
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self.release.set()
            server.shutdown()
            server.server_close()
