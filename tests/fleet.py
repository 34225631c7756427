"""Test tools for running real fedmq processes and watching their topics."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

ROOT = Path(__file__).resolve().parent.parent


def spawn(module: str, *args: str, log: Path) -> subprocess.Popen:
    """Start `python -m module args...` with its output in `log`."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    fh = open(log, "ab")
    return subprocess.Popen([sys.executable, "-m", module, *map(str, args)], stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def stop(proc: subprocess.Popen, timeout: float = 10) -> int:
    """SIGTERM, wait bounded, SIGKILL if needed; returns the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait(timeout)


class TopicWatcher:
    """Subscribes to a filter and keeps the newest payload of every topic; waits on conditions."""

    def __init__(self, url_port: int, topic_filter: str, host: str = "127.0.0.1") -> None:
        self.latest: dict[str, bytes] = {}
        self.history: list[tuple[str, bytes]] = []
        self._cond = threading.Condition()
        self._subscribed = threading.Event()
        self.reconnected = threading.Event()  # set when it connected again after losing the broker
        self._connects = 0
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"watch-{os.getpid()}-{id(self)}")

        def on_connect(client, userdata, flags, reason_code, properties):
            self._connects += 1
            client.subscribe(topic_filter, qos=1)
            if self._connects > 1:
                self.reconnected.set()

        self.client.on_connect = on_connect
        self.client.reconnect_delay_set(0.1, 1)
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(host, url_port)
        self.client.loop_start()
        assert self._subscribed.wait(10), "watcher could not subscribe"

    def _on_message(self, client, userdata, msg) -> None:
        with self._cond:
            self.latest[msg.topic] = msg.payload
            self.history.append((msg.topic, msg.payload))
            self._cond.notify_all()

    def wait_for(self, predicate: Callable[[], object], timeout: float, what: str = "condition"):
        """Wait until predicate() is truthy (re-checked on every message); returns its value."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                value = predicate()
                if value:
                    return value
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out after {timeout} s waiting for {what}")
                self._cond.wait(min(left, 0.5))

    def json(self, topic: str) -> dict | None:
        payload = self.latest.get(topic)
        return json.loads(payload) if payload else None

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()
