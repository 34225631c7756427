"""The coordinator's MQTT session: updates in on paho's network thread, models out on a timer.

Hot path: `on_message` runs in paho's network thread and calls the core directly (no
queue, no per-message logging), because the MQTT client, not the math, bounds
throughput. The main thread wakes every publish interval, and when the model changed it
checkpoints first and then publishes, so a published version is never lost on a crash.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt

from coordinator.server import Coordinator
from protocol.transport import BrokerSettings, connect, make_client

log = logging.getLogger(__name__)


class RejectionLog:
    """Logs rejections at WARNING, at most once per reason per `every` seconds, with counts."""

    def __init__(self, every: float = 10.0) -> None:
        self.every = every
        self._last: dict[str, float] = {}
        self._since: dict[str, int] = {}

    def __call__(self, reason: str, topic: str) -> None:
        self._since[reason] = self._since.get(reason, 0) + 1
        now = time.monotonic()
        if now - self._last.get(reason, -self.every) >= self.every:
            log.warning("rejected %d update(s) as %s (latest on %s)", self._since[reason], reason, topic)
            self._last[reason] = now
            self._since[reason] = 0


class AuditLog:
    """One JSON line per payload: which (agent, seq) was accepted or why it was refused."""

    def __init__(self, path: str) -> None:
        self.file = open(path, "a", buffering=1 << 16)

    def __call__(self, topic, update, reason, staleness) -> None:
        record = {"t": round(time.time(), 3), "topic": topic, "outcome": reason or "accepted"}
        if update is not None:
            record.update(agent=update.agent_id, seq=update.seq, base=update.base_version, staleness=staleness)
        self.file.write(json.dumps(record) + "\n")

    def flush(self) -> None:
        self.file.flush()


class CoordinatorSession:
    """Connects a `Coordinator` to the broker and runs until `stop` is set."""

    def __init__(
        self,
        core: Coordinator,
        settings: BrokerSettings,
        *,
        connect_timeout: float = 10.0,
        metrics_log: str | None = None,
        audit_log: str | None = None,
        on_publish=None,
    ) -> None:
        self.core = core
        self.settings = settings
        self.connect_timeout = connect_timeout
        self.metrics_log = Path(metrics_log) if metrics_log else None
        self.on_publish = on_publish  # callback(status) after each model publish, e.g. metrics
        self.lock = threading.Lock()
        self.audit = AuditLog(audit_log) if audit_log else None
        core.audit = self.audit
        self.rejections = RejectionLog()
        self._status_handled = -1
        self.client = make_client(settings, f"fedmq-coordinator-{core.topics.fleet}", persistent=True)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message

    # paho callbacks (network thread) -----------------------------------------------------

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            log.error("broker refused the connection: %s", reason_code)
            return
        client.subscribe(self.core.topics.all_updates, qos=1)
        log.info("connected to %s, subscribed to %s", self.settings.url, self.core.topics.all_updates)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            log.warning("lost the broker (%s); reconnecting with backoff", reason_code)

    def _on_message(self, client, userdata, msg):
        with self.lock:
            reason = self.core.handle_update(msg.topic, msg.payload)
        if reason is not None:
            self.rejections(reason, msg.topic)

    # main thread --------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Connect, publish the current model, then publish (coalesced) until `stop` is set."""
        connect(self.client, self.settings, timeout=self.connect_timeout)
        try:
            self.publish(force=True)
            while not stop.wait(self.core.publish_interval / 4):
                self.publish()
            self.publish(force=True)
        finally:
            self.client.disconnect()
            self.client.loop_stop()

    def publish(self, force: bool = False) -> bool:
        """Checkpoint and publish the model if it is due (or `force`), then the status.

        The status alone is republished when only rejections happened since the last one.
        """
        topics = self.core.topics
        with self.lock:
            due = force or self.core.publish_due()
            if not due:
                if self.core.handled_ != self._status_handled and self.core.publish_due(ignore_version=True):
                    self._status_handled = self.core.handled_
                    self.client.publish(topics.coordinator_status, json.dumps(self.core.status()), qos=1, retain=True)
                return False
            payload = self.core.model_payload()
            self.core.checkpoint()
            if self.audit:
                self.audit.flush()
            status = self.core.status()
            self._status_handled = self.core.handled_
        self.client.publish(topics.model, payload, qos=1, retain=True)
        self.client.publish(topics.coordinator_status, json.dumps(status), qos=1, retain=True)
        if self.metrics_log:
            with self.metrics_log.open("a") as fh:
                fh.write(json.dumps(status) + "\n")
        if self.on_publish:
            self.on_publish(status)
        log.info(
            "published version %d (%d bytes): accepted %d, rejected %d%s",
            status["version"], len(payload), status["accepted"], sum(status["rejected"].values()),
            "".join(f", {k} {v:.3f}" for k in ("accuracy", "r2") if (v := status.get(k)) is not None),
        )
        return True
