"""`fedmq-monitor --web PORT`: serve the web fleet view, a static page that talks to the broker itself.

The page (monitor/web/) connects to the broker over MQTT over WebSockets with the monitor's
read-only login and decodes everything in the browser; this server only hands out the
files and `/config.json` (the fleet's topics, the agent states, the broker's WebSocket URL).
It keeps no state of the fleet and never connects to the broker. The login's password is in
the config only with `share_login` (`--web-share-login`); otherwise the page asks for it.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import asdict
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from protocol.agent_states import REASON_FIELDS, STATES
from protocol.messages import MAX_CLASSES, MAX_MESSAGE_BYTES, UPDATE_LIMITS, model_limits
from protocol.model_spec import MAX_FEATURES
from protocol.topics import Topics

log = logging.getLogger(__name__)

WEB_DIR = Path(__file__).resolve().parent / "web"
# URL path -> (file under WEB_DIR, content type); nothing else is served.
FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/style.css": ("style.css", "text/css; charset=utf-8"),
    "/fleet.js": ("fleet.js", "text/javascript; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/vendor/mqtt.min.js": ("vendor/mqtt.min.js", "text/javascript; charset=utf-8"),
    "/vendor/msgpack.min.js": ("vendor/msgpack.min.js", "text/javascript; charset=utf-8"),
    "/vendor/mqtt.LICENSE.md": ("vendor/mqtt.LICENSE.md", "text/plain; charset=utf-8"),
    "/vendor/msgpack.LICENSE": ("vendor/msgpack.LICENSE", "text/plain; charset=utf-8"),
    "/vendor/VERSIONS": ("vendor/VERSIONS", "text/plain; charset=utf-8"),
}
# The page runs only its own scripts and talks only to this server and a WebSocket broker.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self' ws: wss:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
DEFAULT_WS_PORT = 9001  # broker/mosquitto.conf's WebSocket listener


def page_config(topics: Topics, *, ws_url: str | None, username: str | None,
                password: str | None = None) -> dict:
    """What the page needs to find the fleet: topic patterns, the agent states and which status field says why, where the broker is.

    `ws_url` None: the page uses ws://<the host it was loaded from>:9001/. The patterns have
    one `+` for the agent id, the tier's a `+` for the partition too (protocol/topics.py is the one place the layout is written).
    """
    base = topics.base
    return {
        "fleet": topics.fleet,
        "subscribe": topics.everything,
        "topics": {
            "model": topics.model,
            "model_chunk": topics.all_model_chunks,
            "coordinator": topics.coordinator_status,
            "update": topics.all_updates,
            "update_chunk": topics.all_update_chunks,
            "status": topics.all_agent_statuses,
            "stats": topics.all_stats,
            "schema": topics.all_schemas,
            "secagg": f"{base}/secagg/#",
            **topics.tier_patterns,  # the scale-out tier's own topics (tier/cluster.py)
        },
        "limits": wire_limits(),
        "states": list(STATES),
        "reason_fields": REASON_FIELDS,
        "ws_url": ws_url,
        "ws_port": DEFAULT_WS_PORT,
        "username": username or "web",  # broker/acl's read-only login for the page
        **({"password": password} if password is not None else {}),
    }


def wire_limits() -> dict:
    """The Python decoders' bounds (protocol/messages.py), which the page checks before it decodes any msgpack:
    a hostile retained model (8 MB of nested arrays) froze its tab for 6 s and took ~640 MB of its heap."""
    return {"max_bytes": MAX_MESSAGE_BYTES, "max_classes": MAX_CLASSES, "max_features": MAX_FEATURES,
            "model": asdict(model_limits()), "update": asdict(UPDATE_LIMITS)}


def load_files() -> dict[str, tuple[bytes, str]]:
    """Every served file, read once (about 400 KB); OSError names a file a broken install lacks."""
    return {path: ((WEB_DIR / name).read_bytes(), ctype) for path, (name, ctype) in FILES.items()}


def make_server(host: str, port: int, config: dict) -> ThreadingHTTPServer:
    """A bound HTTP server for the page and `config`; OSError if the address is taken. Call serve_forever()."""
    files = load_files()
    files["/config.json"] = (json.dumps(config).encode(), "application/json")

    class Handler(BaseHTTPRequestHandler):
        server_version = "fedmq-monitor"
        sys_version = ""

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            self._send(include_body=True)

        def do_HEAD(self) -> None:  # noqa: N802
            self._send(include_body=False)

        def _send(self, include_body: bool) -> None:
            path = self.path.split("?", 1)[0].split("#", 1)[0]
            body, ctype = files.get(path, (b"not found\n", "text/plain; charset=utf-8"))
            self.send_response(HTTPStatus.OK if path in files else HTTPStatus.NOT_FOUND)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store" if path == "/config.json" else "no-cache")
            for name, value in SECURITY_HEADERS.items():
                self.send_header(name, value)
            self.end_headers()
            if include_body:
                self.wfile.write(body)

        def log_message(self, fmt: str, *args) -> None:
            log.debug("%s %s", self.address_string(), fmt % args)

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    return server


def serve_until(server: ThreadingHTTPServer, stop: threading.Event) -> None:
    """Serve in a thread until `stop` is set, then close the socket."""
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)
    thread.start()
    try:
        stop.wait()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
