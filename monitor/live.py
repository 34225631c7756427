"""The monitor's MQTT side and its output loops: feed a `FleetView`, draw or print it.

paho's network thread receives and feeds the view under a lock; the main thread renders
snapshots. The client is read-only and keeps no session on the broker.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import threading
import time
from typing import Callable, TextIO

from rich.console import Console
from rich.live import Live

from monitor.fleet_view import DEFAULT_MAX_CLASSES, DEFAULT_MAX_MODEL_BYTES, FleetView
from monitor.render import render
from protocol.topics import Topics
from protocol.transport import BrokerSettings, connect, make_client

log = logging.getLogger(__name__)


class MonitorSession:
    """Subscribes to ``<prefix>/<fleet>/#`` and feeds every message into a `FleetView`."""

    def __init__(self, topics: Topics, settings: BrokerSettings, *, clock: Callable[[], float] = time.time,
                 max_model_bytes: int = DEFAULT_MAX_MODEL_BYTES, max_classes: int = DEFAULT_MAX_CLASSES) -> None:
        self.view = FleetView(topics, max_model_bytes, max_classes)
        self.settings = settings
        self.clock = clock
        self.subscribed = threading.Event()
        self._lock = threading.Lock()
        client_id = f"fedmq-monitor-{topics.fleet}-{os.getpid()}-{secrets.token_hex(3)}"
        self.client = make_client(settings, client_id, persistent=False)
        self.connected = False
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = lambda *_: self.subscribed.set()
        self.client.on_message = self._on_message

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if not reason_code.is_failure:  # also on every reconnection: the session is not kept
            self.connected = True
            client.subscribe(self.view.topics.everything, qos=1)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        was_connected, self.connected = self.connected, False
        if reason_code.is_failure and was_connected:  # before the first connection start() reports it (one line)
            log.warning("lost the broker (%s); reconnecting with backoff", reason_code)

    def _on_message(self, client, userdata, msg) -> None:
        with self._lock:
            self.view.feed(msg.topic, msg.payload, self.clock())

    def start(self, timeout: float) -> None:
        """Connect (BrokerError with one line if that fails) and wait boundedly for the subscription."""
        connect(self.client, self.settings, timeout=timeout)
        if not self.subscribed.wait(timeout):
            log.warning("no subscription acknowledgement from %s within %g s", self.settings.url, timeout)

    def snapshot(self) -> dict:
        """The view's snapshot plus the broker connection, so a stale screen says why."""
        with self._lock:
            snapshot = self.view.snapshot(self.clock())
        snapshot["broker"] = {"url": self.settings.url, "connected": self.connected}
        return snapshot

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def print_once(session: MonitorSession, wait: float, stop: threading.Event, *, as_json: bool, out: TextIO) -> None:
    """Collect for `wait` seconds (retained messages come at once, updates as they happen), print one snapshot."""
    stop.wait(wait)
    snapshot = session.snapshot()
    if as_json:
        out.write(json.dumps(snapshot) + "\n")
    else:
        console = Console(file=out, width=None if out.isatty() else 140)
        console.print(render(snapshot))
    out.flush()


def stream_json(session: MonitorSession, refresh: float, stop: threading.Event, out: TextIO) -> None:
    """One snapshot per line every `refresh` seconds until `stop`: for scripts and logs."""
    while not stop.wait(refresh):
        out.write(json.dumps(session.snapshot()) + "\n")
        out.flush()


def show_live(session: MonitorSession, refresh: float, stop: threading.Event) -> None:
    """Redraw the tables in place every `refresh` seconds until `stop`."""
    with Live(render(session.snapshot()), auto_refresh=False) as live:
        while not stop.wait(refresh):
            live.update(render(session.snapshot()), refresh=True)
