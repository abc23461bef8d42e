"""The monitor's HTTP endpoints (stdlib server, one thread per request; bind to 127.0.0.1 unless you mean it).

    GET /health     200 {"status": "ok"} or 503 {"status": "unhealthy", "reason": ...}
    GET /metrics    Prometheus text format
    GET /api/state  the snapshot the dashboard draws (JSON)
    GET /           the dashboard: one self-contained HTML page (no CDN), refreshes itself every 2 s
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources

from atlas_swarm.errors import ConfigError
from atlas_swarm.monitor.metrics import render
from atlas_swarm.monitor.state import Monitor

DASHBOARD = resources.files("atlas_swarm.monitor").joinpath("dashboard.html")


def parse_listen(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"--http {text!r} is not HOST:PORT (e.g. 127.0.0.1:8080).")
    return host.strip("[]"), int(port)


def serve(monitor: Monitor, host: str, port: int) -> ThreadingHTTPServer:
    """Start serving on a daemon thread; ``server.server_address`` has the real port (when ``port`` is 0)."""
    page = DASHBOARD.read_bytes()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's naming)
            path = self.path.split("?")[0]
            if path == "/health":
                ok, reason = monitor.health()
                body = {"status": "ok" if ok else "unhealthy", "reason": reason, "peer_id": monitor.swarm.peer_id}
                self._send(200 if ok else 503, "application/json", json.dumps(body).encode())
            elif path == "/metrics":
                ok, _ = monitor.health()
                self._send(200, "text/plain; version=0.0.4; charset=utf-8", render(monitor.snapshot(), ok))
            elif path == "/api/state":
                ok, reason = monitor.health()
                state = dict(monitor.snapshot(), healthy=ok, health_reason=reason)
                self._send(200, "application/json", json.dumps(state).encode())
            elif path in ("/", "/index.html"):
                self._send(200, "text/html; charset=utf-8", page)
            else:
                self._send(404, "text/plain", b"not found\n")

        def _send(self, code: int, ctype: str, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # quiet: a scrape every 15 s is not news
            pass

    try:
        server = ThreadingHTTPServer((host, port), Handler)
    except OSError as e:
        raise ConfigError(f"Cannot listen on {host}:{port} for --http: {e.strerror}. Pick another port.") from None
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="atlas-http", daemon=True).start()
    return server
