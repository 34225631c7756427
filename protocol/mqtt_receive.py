"""A received PUBLISH decoded with one copy of its payload instead of paho's three.

paho (2.1+) decodes every incoming PUBLISH in `paho.mqtt._packet.decode_publish` by
`struct.unpack("!H{n}s", ...)` three times over the whole packet (topic length, topic, packet
id), each a full copy while the previous one is still referenced, and MQTT 5 properties
slice the rest of the packet once per property. For an 8 MiB message (the broker's limit)
that is the packet buffer plus two live 8 MiB copies: 24 MiB of peak memory before the
process has seen one byte of it, whatever it does next (issue 18: one message must cost the
coordinator <= 32 MB). `decode_publish` here reads the same fields through a memoryview
and copies only the payload, so the peak is the packet buffer plus the payload.

`install()` puts it in paho's place for the whole process (every client decodes the same
way; the result is the same PublishPacket). It does nothing on a paho without that
function, and is idempotent.
"""

from __future__ import annotations

import struct

from paho.mqtt.enums import MQTTProtocolVersion
from paho.mqtt.exception import MalformedPacket, MQTTException
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties, VariableByteIntegers

try:  # paho >= 2.1
    from paho.mqtt import _packet
except ImportError:  # pragma: no cover - older paho decodes inline; nothing to replace
    _packet = None
PAHO_DECODE_PUBLISH = getattr(_packet, "decode_publish", None)  # paho's own, kept for comparison in the tests
# what paho's decoders turn into MalformedPacket (its network loop then drops the connection and
# reconnects); anything else raised here ends paho's network thread: a broker's garbage MQTT 5
# properties (an unknown identifier: KeyError) would wedge the client for good
DECODE_ERRORS = getattr(_packet, "DECODE_ERRORS", (struct.error, IndexError, KeyError, ValueError, MQTTException))


def decode_publish(header: int, packet: bytes | bytearray, protocol: MQTTProtocolVersion):
    """paho's PublishPacket for a PUBLISH whose fixed header byte is `header` and whose
    variable header and payload are `packet`; MalformedPacket for anything undecodable, as paho's own."""
    try:
        return _decode_publish(header, packet, protocol)
    except MalformedPacket:
        raise
    except DECODE_ERRORS as exc:
        raise MalformedPacket(f"PUBLISH undecodable: {exc!r}") from exc


def _decode_publish(header: int, packet: bytes | bytearray, protocol: MQTTProtocolVersion):
    qos = (header & 0x06) >> 1
    with memoryview(packet) as view:
        end = len(view)
        if end < 2:
            raise MalformedPacket("PUBLISH shorter than its topic length")
        pos = 2 + int.from_bytes(view[:2], "big")
        if pos > end:
            raise MalformedPacket("PUBLISH topic longer than the packet")
        topic = bytes(view[2:pos])
        if protocol != MQTTProtocolVersion.MQTTv5 and not topic:
            raise MalformedPacket("topic can't be empty in MQTTv3")
        mid = 0
        if qos > 0:
            if pos + 2 > end:
                raise MalformedPacket("PUBLISH without its packet identifier")
            mid = int.from_bytes(view[pos:pos + 2], "big")
            pos += 2
        properties = None
        if protocol == MQTTProtocolVersion.MQTTv5:
            length, used = VariableByteIntegers.decode(bytes(view[pos:pos + 4]))
            if pos + used + length > end:
                raise MalformedPacket("PUBLISH properties longer than the packet")
            properties = Properties(PacketTypes.PUBLISH)
            properties.unpack(bytes(view[pos:pos + used + length]))
            pos += used + length
        payload = bytes(view[pos:])
    return _packet.PublishPacket(dup=bool(header & 0x08), qos=qos, retain=bool(header & 0x01), topic=topic,
                                 mid=mid, properties=properties, payload=payload)


def install() -> bool:
    """Decode every PUBLISH this process receives with `decode_publish`; False if paho has no hook for it."""
    if _packet is None or not hasattr(_packet, "decode_publish") or not hasattr(_packet, "PublishPacket"):
        return False
    _packet.decode_publish = decode_publish
    return True
