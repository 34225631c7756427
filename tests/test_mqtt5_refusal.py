"""A broker that speaks only MQTT 3.1.1 is named as such when an MQTT 5 client connects.

MQTT 3.1.1 (section 3.1.2.2) has a server answer an unsupported protocol level with CONNACK
return code 0x01 and close the connection; some brokers just close it; amqtt (fedmq-sim's
embedded broker) keeps the socket open and never answers. Each case said "no answer from
broker" before, which sends people looking for a network problem. The first two are played
by a minimal 3.1.1-only listener here (mosquitto 2 speaks MQTT 5, so it cannot play them);
the third is the real amqtt. A real MQTT 5 broker (mosquitto) still connects."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from protocol.transport import BrokerError, BrokerSettings, connect, make_client


class Mqtt311Only:
    """Accepts TCP connections; to a CONNECT of protocol level 5 it sends CONNACK 0x01 then
    closes (`answer=True`, as 3.1.1 says), or closes without a word (`answer=False`)."""

    def __init__(self, answer: bool) -> None:
        self.answer = answer
        self.levels: list[int] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(5)
                packet = conn.recv(1024)
                # fixed header: the type, then the remaining length (1-4 bytes, the last < 128);
                # then "\0\4MQTT" and the protocol level (4: 3.1.1, 5: MQTT 5)
                if packet and packet[0] == 0x10:
                    length_bytes = next(i for i in range(1, 5) if packet[i] < 128)
                    self.levels.append(packet[1 + length_bytes + 6])
                    if self.answer and self.levels[-1] != 4:
                        conn.sendall(bytes([0x20, 0x02, 0x00, 0x01]))

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(5)
        self.sock.close()


def connect_v5(port: int, timeout: float = 10) -> tuple[str, float]:
    settings = BrokerSettings.from_url(f"mqtt://127.0.0.1:{port}", mqtt_version="5")
    client = make_client(settings, "v5-client")
    started = time.monotonic()
    with pytest.raises(BrokerError) as err:
        connect(client, settings, timeout=timeout)
    return str(err.value), time.monotonic() - started


@pytest.mark.parametrize("answer", [True, False], ids=["connack-0x01", "closes"])
def test_a_311_broker_refusing_mqtt5_is_named_at_once(answer):
    broker = Mqtt311Only(answer)
    try:
        message, took = connect_v5(broker.port)
    finally:
        broker.close()
    assert broker.levels and broker.levels[0] == 5, "the client sent an MQTT 5 CONNECT"
    assert "MQTT 5 CONNECT" in message and "speak" in message and "--mqtt-version 3.1.1" in message, message
    assert "no answer" not in message and "\n" not in message, message
    assert took < 5, f"the refusal is an answer: {took:.1f} s, no need to wait for the timeout"


def test_a_silent_311_broker_gets_the_hint_at_the_timeout():
    pytest.importorskip("amqtt")
    from simulation.embedded_broker import EmbeddedBroker

    broker = EmbeddedBroker()
    broker.start()
    try:
        message, _ = connect_v5(int(broker.url.rsplit(":", 1)[1]), timeout=3)
    finally:
        broker.stop()
    assert "MQTT 5 CONNECT" in message and "--mqtt-version 3.1.1" in message, message


def test_mqtt5_against_mosquitto_connects(mosquitto):
    settings = BrokerSettings.from_url(mosquitto.url, mqtt_version="5")
    client = make_client(settings, "v5-mosquitto")
    connect(client, settings, timeout=10)
    client.loop_stop()
    client.disconnect()
