"""An in-process MQTT 3.1.1 broker (amqtt) so fedmq can be tried without mosquitto.

For demos only: one measurement (loopback, one paho publisher and one subscriber,
QoS 1, 10 KB payloads, 3,000 messages) carried 2,400-3,300 messages/s, where mosquitto
on the same machine carried 11,000-12,000. Tests, benchmarks and deployments use mosquitto.

amqtt 0.12 behaviours this module corrects or lives with:

- Its AnonymousAuthPlugin marks every client anonymous, and amqtt then drops an
  anonymous client's subscriptions and queued QoS 1 messages when it disconnects, so
  clean_session=False did nothing. `_AcceptAll` lets everyone in without that mark,
  so persistent sessions queue messages as with mosquitto.
- On every CONNECT it replays retained messages matching *any* client's subscription
  filter, at QoS 0, even to a client that never subscribed to them. `_Broker` replays
  only the connecting client's own filters. A reconnecting persistent client still gets
  the retained messages for its filters again (mosquitto would not), and messages queued
  for it while away arrive with the retain flag set; fedmq ignores the flag.
- Sessions and retained messages live in memory only: `stop()` forgets them.
- Its default plugins ($SYS topics every 20 s, packet logging) are left out.
- It warns "PUBACK waiter with Id '54' already done" when a client's acknowledgement comes after
  its own wait for it ended (the demo's 20 agents printed one such line among their 1,040 updates):
  the message reached the client, so `_LateAck` drops those lines.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading

from amqtt.broker import Broker
from amqtt.plugins.base import BaseAuthPlugin

_AMQTT_LOGGERS = ("amqtt", "transitions")
_HANDLER_LOGGER = "amqtt.mqtt.protocol.handler"


class _LateAck(logging.Filter):
    """Drops amqtt's warning about an acknowledgement that came after its wait ended (the module docstring)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().endswith("already done")


class _AcceptAll(BaseAuthPlugin):
    """Admit every client without marking it anonymous (see the module docstring)."""

    async def authenticate(self, *, session) -> bool:
        return True


class _Broker(Broker):
    """amqtt's Broker, replaying retained messages only for the client's own subscriptions."""

    async def _publish_retained_messages_for_subscription(self, subscription, session) -> None:
        subscribers = self._subscriptions.get(subscription[0], ())
        if any(s.client_id == session.client_id for s, _ in subscribers):
            await super()._publish_retained_messages_for_subscription(subscription, session)


class EmbeddedBroker:
    """amqtt on its own asyncio loop in a daemon thread; anonymous clients, loopback by default."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port or _free_port(host)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._broker: _Broker | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def start(self, timeout: float = 10.0) -> None:
        """Start serving; return once the listener is bound (so the port accepts), or raise RuntimeError."""
        for name in _AMQTT_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
        handler_log = logging.getLogger(_HANDLER_LOGGER)
        if not any(isinstance(f, _LateAck) for f in handler_log.filters):
            handler_log.addFilter(_LateAck())
        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}", "max_connections": 5000}},
            "plugins": {f"{__name__}._AcceptAll": {}},
        }
        self._loop = asyncio.new_event_loop()
        started = threading.Event()
        failure: list[BaseException] = []

        def serve() -> None:
            asyncio.set_event_loop(self._loop)
            try:
                self._broker = _Broker(config, loop=self._loop)
                self._loop.run_until_complete(self._broker.start())
            except BaseException as exc:  # handed to the thread that called start()
                failure.append(exc)
                self._loop.close()
                return
            finally:
                started.set()
            self._loop.run_forever()
            self._loop.close()

        self._thread = threading.Thread(target=serve, name="embedded-broker", daemon=True)
        self._thread.start()
        if not started.wait(timeout) or failure:
            self._broker = None
            reason = failure[0] if failure else f"not listening after {timeout:g} s"
            raise RuntimeError(f"embedded broker did not start on {self.url}: {reason}")

    def stop(self, timeout: float = 10.0) -> None:
        """Shut the broker down and end its thread; safe to call twice."""
        if self._broker is None:
            return
        broker, self._broker = self._broker, None
        asyncio.run_coroutine_threadsafe(broker.shutdown(), self._loop).result(timeout)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)

    def __enter__(self) -> "EmbeddedBroker":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]

