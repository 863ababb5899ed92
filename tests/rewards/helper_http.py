"""A JSON-over-HTTP endpoint on loopback, for tests of scorers that call a service (the rubric judge)."""
from __future__ import annotations

import json
import threading
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable


def serve_json(respond: Callable[[str, Message, dict], dict]) -> tuple[str, ThreadingHTTPServer]:
    """Start a server whose POST replies are `respond(path, headers, body)` as JSON, one thread per request;
    return its base URL and the server (call `.shutdown()` when done)."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            data = json.dumps(respond(self.path, self.headers, body)).encode()  # headers: case-insensitive get
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}", server
