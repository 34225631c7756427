"""The `mosquitto` fixture is a real broker: it routes QoS 1, and restart() keeps its port and state."""

from __future__ import annotations

import threading

import paho.mqtt.client as mqtt

from mosquitto import Mosquitto

TIMEOUT = 10


class Client:
    """A paho 2.x client that records messages and lets a test wait for one."""

    def __init__(self, broker: Mosquitto, name: str, subscribe: str | None = None) -> None:
        self.messages: list[tuple[str, bytes, int, bool]] = []
        self._cond = threading.Condition()
        self._ready = threading.Event()
        self.paho = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=name)
        self.paho.on_connect = self._on_connect
        self.paho.on_subscribe = lambda *a: self._ready.set()
        self.paho.on_message = self._on_message
        self._subscribe = subscribe
        self.paho.connect(broker.host, broker.port)
        self.paho.loop_start()
        assert self._ready.wait(TIMEOUT), f"{name} did not connect/subscribe within {TIMEOUT} s"

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if self._subscribe:
            client.subscribe(self._subscribe, qos=1)
        else:
            self._ready.set()

    def _on_message(self, client, userdata, msg):
        with self._cond:
            self.messages.append((msg.topic, msg.payload, msg.qos, msg.retain))
            self._cond.notify_all()

    def wait_for(self, payload: bytes) -> tuple[str, bytes, int, bool]:
        with self._cond:
            assert self._cond.wait_for(lambda: any(m[1] == payload for m in self.messages), TIMEOUT), \
                f"{payload!r} not received within {TIMEOUT} s; got {self.messages}"
            return next(m for m in self.messages if m[1] == payload)

    def close(self) -> None:
        self.paho.disconnect()
        self.paho.loop_stop()


def test_fixture_routes_qos1_between_two_clients(mosquitto):
    assert mosquitto.url == f"mqtt://127.0.0.1:{mosquitto.port}"
    sub = Client(mosquitto, "sub", subscribe="fixture/#")
    pub = Client(mosquitto, "pub")
    try:
        info = pub.paho.publish("fixture/hello", b"hello", qos=1)
        info.wait_for_publish(TIMEOUT)
        assert info.is_published()
        assert sub.wait_for(b"hello") == ("fixture/hello", b"hello", 1, False)
    finally:
        pub.close()
        sub.close()


def test_restart_keeps_the_port_and_persisted_retained_messages(tmp_path):
    with Mosquitto(tmp_path, persistence=True) as broker:
        port = broker.port
        pub = Client(broker, "pub")
        pub.paho.publish("fixture/retained", b"kept", qos=1, retain=True).wait_for_publish(TIMEOUT)
        pub.close()
        broker.restart()  # SIGTERM saves the database; the new process loads it
        assert broker.port == port
        sub = Client(broker, "sub", subscribe="fixture/#")
        try:
            assert sub.wait_for(b"kept")[3] is True  # delivered as retained by the new process
        finally:
            sub.close()
        broker.kill()
        assert broker.proc.returncode == -9
        broker.restart()  # after kill -9, on the same port again
        assert broker.port == port
        Client(broker, "after-kill").close()


def test_start_failure_reports_the_log(tmp_path):
    broker = Mosquitto(tmp_path, extra_conf="no_such_option 1\n")
    try:
        broker.start()
    except RuntimeError as exc:
        assert "no_such_option" in str(exc) or "Unknown configuration" in str(exc), str(exc)
    else:
        broker.stop()
        raise AssertionError("mosquitto started with an invalid config")
