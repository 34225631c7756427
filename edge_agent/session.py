"""One agent process's MQTT session, after paho-mqtt's own client life-cycle examples.

paho's network thread receives models and reconnects with backoff; the main thread
trains and publishes. Training never waits on the broker: an update made while
disconnected is held (only the newest) and sent on reconnection.
"""

from __future__ import annotations

import json
import logging
import threading

from edge_agent.agent import Agent, offline_status
from protocol.transport import BrokerSettings, connect, make_client

log = logging.getLogger(__name__)


class AgentSession:
    """Runs an `Agent` against a broker until `stop` is set."""

    def __init__(self, agent: Agent, settings: BrokerSettings, *, connect_timeout: float = 10.0, poll_interval: float = 1.0) -> None:
        self.agent = agent
        self.settings = settings
        self.connect_timeout = connect_timeout
        self.poll_interval = poll_interval
        self.wake = threading.Event()
        self._pending: tuple[bytes, int] | None = None
        self._lock = threading.Lock()
        topics = agent.topics
        self.client = make_client(
            settings,
            f"fedmq-agent-{topics.fleet}-{agent.agent_id}",
            persistent=True,
            will=(topics.agent_status(agent.agent_id), json.dumps(offline_status(agent.agent_id)).encode()),
        )
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            log.error("broker refused the connection: %s", reason_code)
            return
        client.subscribe(self.agent.topics.model, qos=1)
        self.publish_status()
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is not None:
            self._send(*pending)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            log.warning("lost the broker (%s); reconnecting with backoff", reason_code)

    def _on_message(self, client, userdata, msg):
        if self.agent.on_model(msg.payload):
            self.wake.set()

    def publish_status(self, state: str | None = None):
        return self.client.publish(
            self.agent.topics.agent_status(self.agent.agent_id), json.dumps(self.agent.status(state)), qos=1, retain=True
        )

    def _send(self, payload: bytes, seq: int) -> None:
        if not self.client.is_connected():
            with self._lock:
                if self._pending is not None:
                    log.info("offline: update seq %d superseded by seq %d", self._pending[1], seq)
                self._pending = (payload, seq)  # only the newest is worth sending later
            log.info("offline: holding update seq %d until the broker is back", seq)
            return
        self.client.publish(self.agent.topics.update(self.agent.agent_id), payload, qos=1)
        log.info("sent update seq %d", seq)

    def run(self, stop: threading.Event) -> None:
        """Connect, then train whenever the agent is due, until `stop` is set."""
        connect(self.client, self.settings, timeout=self.connect_timeout)
        try:
            while not stop.is_set():
                self.wake.wait(self.poll_interval)
                self.wake.clear()
                if stop.is_set() or not self.agent.due():
                    continue
                payload = self.agent.make_update()
                if payload is None:
                    continue
                metrics = self.agent.last_metrics_
                log.info(
                    "trained update seq %d from version %d: %d bytes, eval accuracy %s loss %s",
                    self.agent.seq_, self.agent.trained_version_, len(payload),
                    _fmt(metrics.get("eval_accuracy", metrics.get("eval_r2"))), _fmt(metrics.get("eval_loss")),
                )
                self._send(payload, self.agent.seq_)
                self.publish_status()
        finally:
            info = self.publish_status("offline")
            if self.client.is_connected():
                info.wait_for_publish(timeout=5)
            self.client.disconnect()
            self.client.loop_stop()


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"
