"""The coordinator's MQTT session: updates in on paho's network thread, models out on a timer.

Hot path: `on_message` runs in paho's network thread and calls the core directly (no
queue, no per-message logging), because the MQTT client, not the math, bounds
throughput. The main thread wakes at least every publish interval, and when the model
changed it checkpoints first and then publishes, so a published version is never lost
on a crash and versions never go backwards.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

from coordinator.server import Coordinator
from coordinator.status import encode_status
from coordinator.store import CheckpointError
from protocol.errors import ProtocolError
from protocol.messages import decode_model
from protocol.transport import BrokerSettings, connect, make_client

log = logging.getLogger(__name__)

# Updates that arrive before the start-up check of the retained model are held, up to this.
EARLY_MAX_MESSAGES = 10_000
EARLY_MAX_BYTES = 64 * 1024 * 1024


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
        self.path = path
        self.file = open(path, "a", buffering=1 << 16)
        self._failed = False

    def __call__(self, topic, update, reason, staleness) -> None:
        record = {"t": round(time.time(), 3), "topic": topic, "outcome": reason or "accepted"}
        if update is not None:
            record.update(agent=update.agent_id, seq=update.seq, base=update.base_version, staleness=staleness)
        try:
            self.file.write(json.dumps(record) + "\n")
        except (OSError, ValueError) as exc:  # a full disk must not stop the coordinator
            self._fail(exc)

    def flush(self) -> None:
        try:
            self.file.flush()
        except (OSError, ValueError) as exc:
            self._fail(exc)

    def close(self) -> None:
        self.flush()
        self.file.close()

    def _fail(self, exc: Exception) -> None:
        if not self._failed:
            log.error("cannot write the audit log %s: %s", self.path, exc)
            self._failed = True


class CoordinatorSession:
    """Connects a `Coordinator` to the broker and runs until `stop` is set.

    On start it reads the broker's retained model and continues from it when it is a
    newer version of the same fleet and spec than the checkpoint (see `Coordinator.adopt`).
    """

    def __init__(
        self,
        core: Coordinator,
        settings: BrokerSettings,
        *,
        connect_timeout: float = 10.0,
        metrics_log: str | None = None,
        audit_log: str | None = None,
        on_publish=None,
        retained_grace: float = 0.5,
    ) -> None:
        self.core = core
        self.settings = settings
        self.connect_timeout = connect_timeout
        self.retained_grace = retained_grace
        self.metrics_log = Path(metrics_log) if metrics_log else None
        self.on_publish = on_publish  # callback(status) after each model publish, e.g. metrics
        self.lock = threading.Lock()  # guards `core` between the network and the main thread
        self.audit = AuditLog(audit_log) if audit_log else None
        core.audit = self.audit
        self.rejections = RejectionLog()
        self._status_handled = -1
        self._status_at = float("-inf")
        self._checkpointed: tuple[int, int] | None = None
        self._checkpoint_error_at = float("-inf")
        self._last_infos: list = []
        # start-up: the retained model, and the updates that arrive before it is looked at
        self._early: list[tuple[str, bytes]] | None = []
        self._early_bytes = 0
        self._retained: bytes | None = None
        self._retained_seen = threading.Event()
        self._first_suback = threading.Event()
        self._connected_once = False
        self._republish = threading.Event()
        self.client = make_client(settings, f"fedmq-coordinator-{core.topics.fleet}", persistent=True)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message

    # paho callbacks (network thread) -----------------------------------------------------

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            if self._connected_once:  # before that, start() reports it (one line)
                log.error("broker refused the connection: %s", reason_code)
            return
        topics = self.core.topics
        if self._connected_once:
            client.subscribe(topics.all_updates, qos=1)
            self._republish.set()  # a broker without persistence has lost the retained model
            log.info("reconnected to %s", self.settings.url)
        else:
            client.subscribe([(topics.all_updates, 1), (topics.model, 1)])
            log.info("connected to %s, subscribed to %s", self.settings.url, topics.all_updates)
        self._connected_once = True

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties):
        self._first_suback.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure and self._connected_once:
            log.warning("lost the broker (%s); reconnecting with backoff", reason_code)

    def _on_message(self, client, userdata, msg):
        if msg.topic == self.core.topics.model:
            if not self._retained_seen.is_set():
                self._retained = msg.payload
                self._retained_seen.set()
            return
        with self.lock:
            early = self._early
            if early is not None and len(early) < EARLY_MAX_MESSAGES and self._early_bytes < EARLY_MAX_BYTES:
                early.append((msg.topic, msg.payload))
                self._early_bytes += len(msg.payload)
                return
            reason = self.core.handle_update(msg.topic, msg.payload)
        if reason is not None:
            self.rejections(reason, msg.topic)

    # main thread --------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Connect, publish the current model, then publish (coalesced) until `stop` is set.

        On `stop`: a last checkpoint and publish, bounded wait for delivery, disconnect.
        """
        connect(self.client, self.settings, timeout=self.connect_timeout)
        try:
            self._catch_up()
            self._republish.clear()
            self.publish(force=True)
            tick = min(self.core.publish_interval / 4, 1.0)
            while not stop.wait(tick):
                force = self._republish.is_set()
                if force:
                    self._republish.clear()
                self.publish(force=force)
            self.publish(force=True)
            self._wait_delivered(timeout=5.0)
        finally:
            self.client.disconnect()
            self.client.loop_stop()
            if self.audit:
                self.audit.close()

    def _catch_up(self) -> None:
        """Adopt a newer retained model of this fleet, then handle the updates held meanwhile."""
        topics = self.core.topics
        if self._first_suback.wait(self.connect_timeout):
            self._retained_seen.wait(self.retained_grace)
        else:
            log.warning("no subscription acknowledgement from the broker within %g s", self.connect_timeout)
        self.client.unsubscribe(topics.model)
        with self.lock:
            if self._retained is not None:
                try:
                    self.core.adopt(decode_model(self._retained, fleet=topics.fleet))
                except ProtocolError as exc:
                    log.warning("ignoring the retained model on %s: %s", topics.model, exc)
            early, self._early = self._early or [], None
            reasons = [self.core.handle_update(topic, payload) for topic, payload in early]
        for (topic, _), reason in zip(early, reasons):
            if reason is not None:
                self.rejections(reason, topic)

    def publish(self, force: bool = False) -> bool:
        """Checkpoint and publish the model if it is due (or `force`), then the status.

        The status alone is republished (at most once per interval) when only rejections
        happened since the last one. While the broker is away the model is checkpointed
        but not queued; it goes out again on reconnect.
        """
        topics = self.core.topics
        connected = self.client.is_connected()
        with self.lock:
            if not (force or self.core.publish_due()):
                now = time.monotonic()
                if connected and self.core.handled_ != self._status_handled \
                        and now - self._status_at >= self.core.publish_interval:
                    self._status_handled, self._status_at = self.core.handled_, now
                    self.client.publish(topics.coordinator_status, encode_status(self.core.status()), qos=1, retain=True)
                return False
            if not self._checkpoint() or not connected:
                return False
            payload = self.core.model_payload()
            status = self.core.status()
            self._status_handled, self._status_at = self.core.handled_, time.monotonic()
        self._last_infos = [
            self.client.publish(topics.model, payload, qos=1, retain=True),
            self.client.publish(topics.coordinator_status, encode_status(status), qos=1, retain=True),
        ]
        if self.metrics_log:
            try:
                with self.metrics_log.open("a") as fh:
                    fh.write(json.dumps(status) + "\n")
            except OSError as exc:
                log.error("cannot append to the metrics log %s: %s", self.metrics_log, exc.strerror or exc)
        if self.on_publish:
            self.on_publish(status)
        log.info(
            "published version %d (%d bytes): accepted %d, rejected %d%s",
            status["version"], len(payload), status["accepted"], sum(status["rejected"].values()),
            "".join(f", {k} {v:.3f}" for k in ("accuracy", "r2") if (v := status.get(k)) is not None),
        )
        return True

    def _checkpoint(self) -> bool:
        """Checkpoint unless nothing changed since the last one; False (logged) on failure."""
        key = (self.core.version_, self.core.handled_)
        if key == self._checkpointed:
            return True
        try:
            self.core.checkpoint()
        except CheckpointError as exc:
            now = time.monotonic()
            if now - self._checkpoint_error_at >= 10.0:
                log.error("%s; holding back version %d until a checkpoint succeeds", exc, self.core.version_)
                self._checkpoint_error_at = now
            return False
        self._checkpointed = key
        if self.audit:
            self.audit.flush()
        return True

    def _wait_delivered(self, timeout: float) -> None:
        """Bounded wait until the broker acknowledged the last model and status."""
        deadline = time.monotonic() + timeout
        for info in self._last_infos:
            try:
                info.wait_for_publish(max(0.0, deadline - time.monotonic()))
            except (RuntimeError, ValueError):  # not connected: the checkpoint has it
                return
