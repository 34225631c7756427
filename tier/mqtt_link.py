"""A paho client that knows every node of the NATS cluster and moves to the next one when its node dies.

paho reconnects to the host it last used; the tier's nodes are equals, so on a lost (or failed)
connection the next node's host and port are set before paho's own reconnect (with backoff).
Persistent sessions live in the cluster's R3 streams: the same client id on another node resumes
the same session (and NATS closes any older connection with that id).
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import threading

from protocol.transport import BrokerSettings, make_client
from tier.cluster import TIER_USER, tier_password

log = logging.getLogger(__name__)


def parse_urls(urls: str | list[str]) -> list[BrokerSettings]:
    """`mqtt://h:p,mqtt://h:p2` (or a list) -> one BrokerSettings per node, MQTT 3.1.1 (NATS refuses 5),
    as the tier user when FEDMQ_TIER_PASSWORD is set (else without credentials: a device's rights only)."""
    items = [u.strip() for u in (urls.split(",") if isinstance(urls, str) else urls) if u.strip()]
    if not items:
        raise ValueError("no MQTT URL given")
    nodes = [BrokerSettings.from_url(u, mqtt_version="3.1.1") for u in items]
    password = tier_password()
    if password is None:
        log.warning("FEDMQ_TIER_PASSWORD is not set: connecting to the tier's MQTT listeners with a device's rights only")
        return nodes
    return [dataclasses.replace(n, username=TIER_USER, password=password) for n in nodes]


class Link:
    """One MQTT connection with failover over `nodes`; `connection` counts (re)connections."""

    def __init__(self, nodes: list[BrokerSettings], client_id: str, *, persistent: bool, start: int = 0,
                 on_connect=None, on_message=None, on_subscribed=None, manual_ack: bool = False,
                 avoid=None) -> None:
        self.nodes = nodes
        self.index = start % len(nodes)
        self.avoid = avoid  # () -> the index of a node not to fail over to (another link's), if any
        self.connection = 0
        self.connected = threading.Event()
        self._user_connect = on_connect
        self._user_subscribed = on_subscribed
        self.client = make_client(nodes[self.index], client_id, persistent=persistent, own_client_id=True)
        self.client.reconnect_delay_set(min_delay=0.2, max_delay=0.5)  # at once to the next node: a failed
        # CONNECT during an election already took the listener's js_api_timeout
        self.client.max_inflight_messages_set(1000)
        if manual_ack:
            self.client.manual_ack_set(True)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_connect_fail = self._on_connect_fail
        self.client.on_subscribe = self._on_subscribe
        if on_message is not None:
            self.client.on_message = on_message

    def start(self) -> None:
        """Connect in the background (to the first node that answers) and keep connected."""
        node = self.nodes[self.index]
        self.client.connect_async(node.host, node.port, node.keepalive)
        self.client.loop_start()

    def wait(self, timeout: float) -> bool:
        return self.connected.wait(timeout)

    def _rotate(self) -> None:
        self.index = (self.index + 1) % len(self.nodes)
        if self.avoid is not None and len(self.nodes) > 2 and self.index == self.avoid():
            self.index = (self.index + 1) % len(self.nodes)
        node = self.nodes[self.index]
        # paho's public host/port setters refuse while its state is not "closed", which is never the case
        # inside its own reconnect loop; its reconnect() reads these two attributes
        self.client._host, self.client._port = node.host, node.port

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            log.warning("%s refused by %s: %s", client._client_id.decode(), self.nodes[self.index].url, reason_code)
            return
        self.connection += 1
        self.connected.set()
        log.info("%s connected to %s", client._client_id.decode(), self.nodes[self.index].url)
        if self._user_connect:
            self._user_connect(client, userdata, flags, reason_code, properties)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties):
        # a NATS node whose JetStream is electing leaders (a peer just died) answers SUBSCRIBE with 0x80
        # after a 5 s timeout and keeps the connection: it would carry nothing for good, so reconnect
        # (to the next node), and on_connect subscribes again
        if any(rc.is_failure for rc in reason_codes):
            log.warning("%s: subscription refused by %s (%s); reconnecting", client._client_id.decode(),
                        self.nodes[self.index].url, ", ".join(str(rc) for rc in reason_codes))
            self.bounce()
            return
        if self._user_subscribed:
            self._user_subscribed()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        """A lost connection moves to the next node; a requested one (close(), paho's "Normal disconnection")
        is no loss: a debug line, no failover."""
        self.connection += 1
        self.connected.clear()
        if not reason_code.is_failure:
            log.debug("%s disconnected from %s", client._client_id.decode(), self.nodes[self.index].url)
            return
        log.info("%s lost %s (%s)", client._client_id.decode(), self.nodes[self.index].url, reason_code)
        self._rotate()

    def _on_connect_fail(self, client, userdata):
        log.info("%s cannot connect to %s", client._client_id.decode(), self.nodes[self.index].url)
        self._rotate()

    def publish(self, topic: str, payload: bytes, *, retain: bool = False, timeout: float = 5.0, qos: int = 1) -> bool:
        """Publish; True once the broker acknowledged it (QoS 1) or it was written out (QoS 0) within `timeout`."""
        if not self.connected.is_set():
            return False
        try:
            info = self.client.publish(topic, payload, qos=qos, retain=retain)
            info.wait_for_publish(timeout)
            return info.is_published()
        except (RuntimeError, ValueError) as exc:
            log.debug("publish on %s: %s", topic, exc)
            return False

    def bounce(self) -> None:
        """Drop a connection that looks open but carries nothing (seen after a node died): paho's
        loop then reconnects, to the next node."""
        sock = self.client.socket()
        if sock is not None:
            log.warning("%s: connection to %s carries nothing; reconnecting", self.client._client_id.decode(),
                        self.nodes[self.index].url)
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def drop(link: Link) -> None:
    """Stop a link without a DISCONNECT's side effects on the session (it stays for the next owner)."""
    link.client.loop_stop()
    try:
        link.client.socket() and link.client.socket().close()
    except OSError:
        pass
