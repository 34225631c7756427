"""The per-agent acknowledgement: the highest seq of one agent the coordinator durably accepted.

Under MQTT 3.1.1 a broker that drops a publish (its ACL) still answers PUBACK, so an agent cannot
tell from the broker whether its updates reach anyone. The coordinator therefore says it itself:
after each group commit, one retained QoS 1 message per agent whose updates that commit accepted,
on ``<prefix>/<fleet>/ack/<agent>`` (protocol/topics.py), JSON so an admin reads it with
mosquitto_sub::

    {"seq": 1764700000123456}

Coalesced: a commit that accepted ten updates of one agent sends one ack, its highest seq. A
model message with ``"acks": true`` says its publisher sends them (protocol/messages.py), so an
agent expects acks only from a coordinator that serves them. The scale-out tier's partition workers send the
same payload as core NATS messages, not retained (docs/architecture.md, "Acks on the tier").
"""

from __future__ import annotations

import json

from protocol.errors import ProtocolError
from protocol.messages import MAX_SEQ

MAX_ACK_BYTES = 256


def encode_ack(seq: int) -> bytes:
    """The retained payload for `Topics.ack`: the agent's highest durably accepted seq."""
    return json.dumps({"seq": int(seq)}, separators=(",", ":")).encode()


def decode_ack(payload: bytes) -> int:
    """The seq of an ack payload; ProtocolError for anything that is not exactly one."""
    if len(payload) > MAX_ACK_BYTES:
        raise ProtocolError("decode", f"an ack of {len(payload)} bytes exceeds {MAX_ACK_BYTES}")
    try:
        wire = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError("decode", f"an ack is not JSON: {exc}") from None
    seq = wire.get("seq") if isinstance(wire, dict) else None
    if isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq <= MAX_SEQ:
        raise ProtocolError("schema", f"an ack must be {{\"seq\": integer}}, got {payload[:60]!r}")
    return seq
