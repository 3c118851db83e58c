"""Loopback stand-ins for the HTTP services a recipe may point at (judges, hosted endpoints): one
quiet request handler with reply helpers, and one way to run a server for the length of a test."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, HTTPServer


class QuietHandler(BaseHTTPRequestHandler):
    """A handler that keeps test output clean and answers with bytes or JSON."""

    def log_message(self, *_args) -> None:
        pass

    def read_json(self) -> dict:
        return json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))

    def reply(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in {"Content-Length": str(len(body)), **(headers or {})}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def reply_json(self, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
        self.reply(status, json.dumps(body).encode(), {**(headers or {}), "Content-Type": "application/json"})


@contextmanager
def serving(server: HTTPServer) -> Iterator[HTTPServer]:
    """The server answering on its own thread until the block ends, then closed."""
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def base_url(server: HTTPServer) -> str:
    """The OpenAI-style base URL of a loopback stand-in."""
    return f"http://127.0.0.1:{server.server_address[1]}/v1"
