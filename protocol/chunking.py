"""Payloads larger than the broker's packet limit, as chunks with a manifest: no I/O here.

A payload (a model or an update message) of more than one packet is split into `count`
chunks, each one packet::

    [2, "chunk", sha256 (32 bytes, of the whole payload), index, count, data (bytes)]

A chunked model goes out as retained chunks on ``model/chunk/<i>``, then a retained
manifest on the model topic itself, published last::

    {"type": "manifest", "format": 2, "fleet": str, "version": int, "chunks": int,
     "bytes": int, "sha256": bytes}

A device assembles only when every chunk of the manifest's checksum is there, and the
assembled payload's SHA-256 is the manifest's: it never trains on a mix of versions, and a
device that subscribes later finds the whole current model in the retained chunks. A
chunked update goes out on ``update/<agent>/chunk`` (QoS 1, in order, no manifest: each
chunk names its payload's checksum and chunk count; the last one completes it).
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from dataclasses import dataclass

import msgpack

from protocol.errors import ProtocolError

FORMAT_VERSION = 2
# Smallest broker packet limit fedmq works with (the model topic's manifest must fit).
MIN_PACKET_BYTES = 1024
# A chunk's msgpack framing beside its data: array, format, "chunk", bin8 digest, two uint32, bin32 header.
CHUNK_HEADER_BYTES = 1 + 1 + 6 + 34 + 5 + 5 + 5
# MQTT PUBLISH framing besides the topic: fixed header (<= 5), topic length (2), packet id (2).
MQTT_OVERHEAD_BYTES = 9
MAX_CHUNKS = 65_536
_MANIFEST_TAG = b"\xa4type\xa8manifest"  # how a manifest's msgpack map starts (after the map header)


@dataclass(frozen=True)
class Chunk:
    """One piece of a payload."""

    digest: bytes  # SHA-256 of the whole payload
    index: int
    count: int
    data: bytes


@dataclass(frozen=True)
class Manifest:
    """What a complete model is: its version, chunk count, size and SHA-256."""

    fleet: str
    version: int
    chunks: int
    size: int
    digest: bytes


def packet_bytes(topic: str, payload_len: int) -> int:
    """Size of the MQTT PUBLISH packet carrying `payload_len` bytes on `topic` (QoS 1, MQTT 3.1.1)."""
    return MQTT_OVERHEAD_BYTES + len(topic.encode()) + payload_len


def fits(topic: str, payload_len: int, max_packet_bytes: int | None) -> bool:
    """The payload goes in one packet under the limit (always, without one)."""
    return max_packet_bytes is None or packet_bytes(topic, payload_len) <= max_packet_bytes


def capacity(max_packet_bytes: int, topic: str) -> int:
    """Data bytes per chunk on `topic` (the longest chunk topic) under the packet limit."""
    room = max_packet_bytes - packet_bytes(topic, 0) - CHUNK_HEADER_BYTES
    if room < 1:
        raise ValueError(f"a packet limit of {max_packet_bytes} bytes leaves no room for chunk data on {topic}")
    return room


def split(payload: bytes, room: int) -> list[bytes]:
    """The chunk messages of `payload`, each carrying at most `room` data bytes."""
    count = max(1, math.ceil(len(payload) / room))
    if count > MAX_CHUNKS:
        raise ValueError(f"{len(payload)} bytes in chunks of {room} is more than {MAX_CHUNKS} chunks")
    digest = hashlib.sha256(payload).digest()
    view = memoryview(payload)
    return [msgpack.packb([FORMAT_VERSION, "chunk", digest, i, count, bytes(view[i * room:(i + 1) * room])],
                          use_bin_type=True) for i in range(count)]


def manifest(payload: bytes, fleet: str, version: int, count: int) -> Manifest:
    """The manifest of a payload split into `count` chunks."""
    return Manifest(fleet, version, count, len(payload), hashlib.sha256(payload).digest())


def encode_manifest(m: Manifest) -> bytes:
    """The manifest's payload for the model topic (its map starts with "type", see `is_manifest`)."""
    return msgpack.packb({"type": "manifest", "format": FORMAT_VERSION, "fleet": m.fleet, "version": m.version,
                          "chunks": m.chunks, "bytes": m.size, "sha256": m.digest}, use_bin_type=True)


def model_packets(model_topic: str, chunk_topic, payload: bytes, fleet: str, version: int,
                  max_packet_bytes: int | None, sent: int) -> tuple[list[tuple[str, bytes]], int]:
    """The retained publications of one model, in order, and how many chunk topics they fill: the whole payload on
    `model_topic` when it fits, else its chunks on `chunk_topic(i)` and the manifest on `model_topic` last (a device
    that has the manifest finds every chunk retained); empty payloads clear the chunk topics of the `sent` before
    that this one does not fill (the single coordinator's and the tier root's)."""
    if fits(model_topic, len(payload), max_packet_bytes):
        chunks = []
    else:
        chunks = split(payload, capacity(max_packet_bytes, chunk_topic(MAX_CHUNKS - 1)))
    packets = [(chunk_topic(i), c) for i, c in enumerate(chunks)]
    packets += [(chunk_topic(i), b"") for i in range(len(chunks), sent)]
    last = encode_manifest(manifest(payload, fleet, version, len(chunks))) if chunks else payload
    return packets + [(model_topic, last)], len(chunks)


def is_manifest(payload: bytes) -> bool:
    """A payload on the model topic is a manifest (not a whole model): a cheap look at its first bytes."""
    return len(payload) > 15 and 0x80 <= payload[0] <= 0x8F and payload[1:15] == _MANIFEST_TAG


def _unpack(payload: bytes, max_bytes: int) -> object:
    if not isinstance(payload, (bytes, bytearray)) or len(payload) > max_bytes:
        raise ProtocolError("oversize", "chunk or manifest is not bytes or too large")
    try:
        return msgpack.unpackb(payload, raw=False, max_str_len=256, max_bin_len=max_bytes, max_array_len=6,
                               max_map_len=8, max_ext_len=0, strict_map_key=True)
    except Exception as exc:  # msgpack raises many types for bad input
        raise ProtocolError("decode", f"not valid msgpack: {type(exc).__name__}") from None


def _count(value: object, low: int, high: int, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ProtocolError("schema", f"{what} must be an integer in [{low}, {high}]")
    return value


def decode_manifest(payload: bytes, *, fleet: str | None = None, max_bytes: int = 64 * 1024 * 1024) -> Manifest:
    """Strictly decode a manifest (optionally checking it is for `fleet`, at most `max_bytes` assembled)."""
    wire = _unpack(payload, 4096)
    if not isinstance(wire, dict) or wire.get("type") != "manifest" or wire.get("format") != FORMAT_VERSION:
        raise ProtocolError("schema", "not a format 2 manifest")
    got = wire.get("fleet")
    if not isinstance(got, str) or (fleet is not None and got != fleet):
        raise ProtocolError("fleet", f"manifest for fleet {got!r}, expected {fleet!r}")
    digest = wire.get("sha256")
    if not isinstance(digest, bytes) or len(digest) != 32:
        raise ProtocolError("schema", "manifest sha256 must be 32 bytes")
    return Manifest(got, _count(wire.get("version"), 0, 2**63 - 1, "version"),
                    _count(wire.get("chunks"), 1, MAX_CHUNKS, "chunks"),
                    _count(wire.get("bytes"), 1, max_bytes, "bytes"), digest)


def decode_chunk(payload: bytes, *, max_bytes: int = 16 * 1024 * 1024) -> Chunk:
    """Strictly decode one chunk message."""
    wire = _unpack(payload, max_bytes)
    if not isinstance(wire, list) or len(wire) != 6 or wire[0] != FORMAT_VERSION or wire[1] != "chunk":
        raise ProtocolError("schema", "not a format 2 chunk")
    _, _, digest, index, count, data = wire
    if not isinstance(digest, bytes) or len(digest) != 32 or not isinstance(data, bytes) or not data:
        raise ProtocolError("schema", "chunk digest must be 32 bytes and its data non-empty bytes")
    count = _count(count, 1, MAX_CHUNKS, "chunk count")
    return Chunk(digest, _count(index, 0, count - 1, "chunk index"), count, data)


def assemble(digest: bytes, count: int, chunks: dict[int, bytes]) -> bytes | None:
    """The payload when all `count` chunks are there and their SHA-256 is `digest`, else None."""
    if len(chunks) != count or any(i not in chunks for i in range(count)):
        return None
    payload = b"".join(chunks[i] for i in range(count))
    return payload if hashlib.sha256(payload).digest() == digest else None


class Collector:
    """Chunks of a few payloads at once, keyed by (key, digest), bounded in bytes and payloads.

    `add` returns the payload a chunk completes. With `need_manifest` (the model), a payload
    completes only once `expect` named its digest (the newest manifest); without it (updates),
    the last chunk completes it. The oldest partial payloads are dropped past the bounds and
    reported by `take_dropped` (so their messages can be acknowledged).
    """

    def __init__(self, *, max_bytes: int, max_partial: int = 4, need_manifest: bool = True) -> None:
        self.max_bytes = max_bytes
        self.max_partial = max_partial
        self.need_manifest = need_manifest
        self.partial: OrderedDict[tuple, dict[int, bytes]] = OrderedDict()
        self.counts: dict[tuple, int] = {}
        self.bytes_ = 0
        self.expected: bytes | None = None  # the newest manifest's digest (need_manifest)
        self.dropped: list[tuple] = []

    def expect(self, digest: bytes, key: object = None) -> bytes | None:
        """A manifest names `digest`: the payload at once if its chunks are all there."""
        self.expected = digest
        return self._complete((key, digest))

    def add(self, chunk: Chunk, key: object = None) -> bytes | None:
        """Keep one chunk; the payload it completes, if any (a mismatching chunk count drops the old)."""
        k = (key, chunk.digest)
        if chunk.count * len(chunk.data) > self.max_bytes * 2 or len(chunk.data) > self.max_bytes:
            raise ProtocolError("oversize", f"a payload of {chunk.count} chunks of {len(chunk.data)} bytes is too large")
        if self.counts.get(k, chunk.count) != chunk.count:
            self._drop(k)
        parts = self.partial.setdefault(k, {})
        self.counts[k] = chunk.count
        old = parts.get(chunk.index)
        self.bytes_ += len(chunk.data) - (len(old) if old is not None else 0)
        parts[chunk.index] = chunk.data
        self.partial.move_to_end(k)
        done = self._complete(k) if not self.need_manifest or chunk.digest == self.expected else None
        while self.partial and (len(self.partial) > self.max_partial or self.bytes_ > self.max_bytes):
            oldest = next(iter(self.partial))
            if oldest[1] == self.expected and len(self.partial) > 1:  # the awaited one goes last
                self.partial.move_to_end(oldest)
                oldest = next(iter(self.partial))
            self._drop(oldest)
        return done

    def keys_of(self, key: object) -> list[tuple]:
        """The partial payloads of one key (e.g. one agent)."""
        return [k for k in self.partial if k[0] == key]

    def drop(self, k: tuple) -> None:
        """Forget one partial payload (reported by `take_dropped`)."""
        self._drop(k)

    def take_dropped(self) -> list[tuple]:
        """The (key, digest) of the partial payloads dropped since the last call."""
        out, self.dropped = self.dropped, []
        return out

    def _complete(self, k: tuple) -> bytes | None:
        parts = self.partial.get(k)
        if parts is None:
            return None
        payload = assemble(k[1], self.counts[k], parts)
        if payload is None:
            if len(parts) == self.counts[k]:  # all there, wrong checksum: never assembles
                self._drop(k)
            return None
        self.bytes_ -= sum(len(d) for d in parts.values())
        del self.partial[k], self.counts[k]
        return payload

    def _drop(self, k: tuple) -> None:
        parts = self.partial.pop(k, None)
        if parts is not None:
            self.bytes_ -= sum(len(d) for d in parts.values())
            del self.counts[k]
            self.dropped.append(k)
