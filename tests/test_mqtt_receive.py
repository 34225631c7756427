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
