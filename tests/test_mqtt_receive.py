"""protocol/mqtt_receive.py: the PUBLISH decoder decodes what paho's does, with one payload copy.

Pure functions, no broker. With paho's own decoder in its place the memory test is red: an
8 MiB packet peaked at two live copies (16 MiB) beside the packet buffer.
"""

from __future__ import annotations

import tracemalloc

import pytest
from paho.mqtt.enums import MQTTProtocolVersion
from paho.mqtt.exception import MalformedPacket
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from protocol.mqtt_receive import PAHO_DECODE_PUBLISH, decode_publish

V3, V5 = MQTTProtocolVersion.MQTTv311, MQTTProtocolVersion.MQTTv5


def publish(topic: bytes, payload: bytes, *, qos: int = 1, mid: int = 7, properties: bytes = b"") -> bytearray:
    """A PUBLISH's variable header and payload, as paho's network loop hands them over."""
    return bytearray(len(topic).to_bytes(2, "big") + topic + (mid.to_bytes(2, "big") if qos else b"") + properties + payload)


def props() -> bytes:
    p = Properties(PacketTypes.PUBLISH)
    p.UserProperty = [("who", "agent-1"), ("why", "test")]
    p.ContentType = "application/msgpack"
    p.TopicAlias = 3
    return bytes(p.pack())


CASES = {
    "3.1.1 qos 0": (0x30, publish(b"f/update/a1", b"\x93\x01\x02\x03", qos=0), V3),
    "3.1.1 qos 1 retained dup": (0x3B, publish(b"f/model", b"x" * 1000, mid=65535), V3),
    "3.1.1 empty payload": (0x33, publish(b"f/model/chunk/3", b""), V3),
    "5 with properties": (0x32, publish(b"f/stats/a2", b"\x80", properties=props()), V5),
    "5 empty topic (alias), no properties": (0x30, publish(b"", b"payload", qos=0, properties=b"\x00"), V5),
}


@pytest.mark.parametrize("name", list(CASES))
def test_it_decodes_what_paho_decodes(name):
    header, packet, protocol = CASES[name]
    ours, paho = decode_publish(header, packet, protocol), PAHO_DECODE_PUBLISH(header, bytearray(packet), protocol)
    assert (ours.dup, ours.qos, ours.retain, ours.topic, ours.mid, bytes(ours.payload)) == \
           (paho.dup, paho.qos, paho.retain, paho.topic, paho.mid, bytes(paho.payload))
    assert type(ours.payload) is bytes and type(ours.topic) is bytes
    assert str(ours.properties) == str(paho.properties)


@pytest.mark.parametrize("packet, protocol", [
    (bytearray(b"\x00"), V3),  # no room for the topic length
    (bytearray(b"\x00\x09f/model"), V3),  # topic longer than the packet
    (bytearray(b"\x00\x00\x00\x01"), V3),  # empty topic
    (bytearray(b"\x00\x01f\x00"), V3),  # qos 1 without its packet id
    (bytearray(b"\x00\x01f\x00\x01\x7f"), V5),  # properties longer than the packet
])
def test_a_malformed_publish_is_refused_as_malformed(packet, protocol):
    with pytest.raises(MalformedPacket):
        decode_publish(0x32, packet, protocol)


@pytest.mark.parametrize("protocol", [V3, V5])
def test_an_8_mib_publish_costs_one_copy_of_its_payload(protocol):
    size = 8 * 1024 * 1024
    packet = publish(b"f/update/evil", bytes(size), properties=props() if protocol == V5 else b"")
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        result = decode_publish(0x32, packet, protocol)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(result.payload) == size
    assert peak < size + 64 * 1024, f"decoding peaked at {peak / size:.2f} x the payload"


@pytest.mark.parametrize("properties", [
    b"\x02\xc3\x6e",  # an unknown property identifier (paho: KeyError)
    b"\x03\x21\x00\x05",  # Receive Maximum, not a PUBLISH property (MQTTException)
    b"\x02\x23\xf3",  # Topic Alias cut short, the packet with it (struct.error)
])
def test_garbage_properties_are_malformed_like_paho_not_another_exception(properties):
    packet = publish(b"f/model", b"", properties=properties)
    with pytest.raises(MalformedPacket):
        PAHO_DECODE_PUBLISH(0x32, bytearray(packet), V5)
    with pytest.raises(MalformedPacket):
        decode_publish(0x32, packet, V5)


def test_a_broker_sending_garbage_properties_is_left_and_reconnected_to():
    """A raw-socket broker: CONNACK, then a PUBLISH with an unknown property. paho (installed decoder)
    must drop the connection as malformed and reconnect, not lose its network thread."""
    import socket
    import threading

    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from protocol import mqtt_receive

    assert mqtt_receive.install()
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(30)
    connections = []

    def broker():
        for _ in range(2):
            try:
                conn, _ = server.accept()
            except OSError:
                return
            connections.append(conn)
            conn.recv(1024)  # CONNECT
            conn.sendall(b"\x20\x03\x00\x00\x00")  # CONNACK, v5, no properties
            body = publish(b"f/model", b"x", qos=0, properties=b"\x02\xc3\x6e")
            conn.sendall(bytes([0x30, len(body)]) + body)

    thread = threading.Thread(target=broker, daemon=True)
    thread.start()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="red", protocol=mqtt.MQTTv5)
    client.reconnect_delay_set(0.1, 0.2)
    errors = []
    threading.excepthook, old_hook = (lambda args: errors.append(args.exc_value)), threading.excepthook
    try:
        client.connect("127.0.0.1", server.getsockname()[1])
        client.loop_start()
        thread.join(30)
        assert not errors, f"the network thread died: {errors[0]!r}"
        assert len(connections) == 2, "the client never reconnected after the malformed PUBLISH"
    finally:
        threading.excepthook = old_hook
        client.loop_stop()
        server.close()
        for conn in connections:
            conn.close()
