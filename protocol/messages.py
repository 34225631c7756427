"""The two msgpack messages of fedmq, their encoders and strict decoders.

Model (coordinator -> agents, retained)::

    {"format": 1, "type": "model", "fleet": str, "version": int, "time": float,
     "spec": {...ModelSpec...}, "params": bytes (little-endian float32, spec.n_params)}

Update (agent -> coordinator)::

    {"format": 1, "type": "update", "fleet": str, "agent": str, "seq": int,
     "base": int, "samples": int, "time": float, "delta": {...Encoded...},
     "metrics": {str: float}}

Decoders raise `ProtocolError` for anything that is not exactly this.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import msgpack
import numpy as np

from protocol import codec
from protocol.errors import ProtocolError
from protocol.model_spec import ModelSpec
from protocol.topics import check_name

FORMAT_VERSION = 1
MAX_MESSAGE_BYTES = 8 * 1024 * 1024
MAX_SEQ = 2**63 - 1
MAX_SAMPLES = 10**12
MAX_METRICS = 16


@dataclass(frozen=True)
class ModelMessage:
    """The global model at one version."""

    fleet: str
    version: int
    spec: ModelSpec
    params: np.ndarray  # float64 in memory, float32 on the wire
    time: float = field(default_factory=time.time)


@dataclass(frozen=True)
class UpdateMessage:
    """One agent's contribution: an encoded delta from the model at `base_version`."""

    fleet: str
    agent_id: str
    seq: int
    base_version: int
    n_samples: int
    delta: codec.Encoded
    metrics: dict = field(default_factory=dict)
    time: float = field(default_factory=time.time)


def encode_model(msg: ModelMessage) -> bytes:
    params = np.ascontiguousarray(msg.params, dtype="<f4")
    return msgpack.packb(
        {
            "format": FORMAT_VERSION,
            "type": "model",
            "fleet": msg.fleet,
            "version": msg.version,
            "time": msg.time,
            "spec": msg.spec.to_wire(),
            "params": params.tobytes(),
        },
        use_bin_type=True,
    )


def decode_model(payload: bytes, *, fleet: str | None = None, max_bytes: int = MAX_MESSAGE_BYTES) -> ModelMessage:
    """Strictly decode a model message (optionally checking it is for `fleet`)."""
    wire = _unpack(payload, "model", fleet, max_bytes)
    spec = ModelSpec.from_wire(wire.get("spec"))
    raw = _typed(wire, "params", bytes)
    if len(raw) != 4 * spec.n_params:
        raise ProtocolError("shape", f"params has {len(raw)} bytes, spec needs {4 * spec.n_params}")
    params = np.frombuffer(raw, dtype="<f4").astype(np.float64)
    if not np.isfinite(params).all():
        raise ProtocolError("non_finite", "model params contain NaN or Inf")
    return ModelMessage(
        fleet=wire["fleet"],
        version=_int(wire, "version", 0, MAX_SEQ),
        spec=spec,
        params=params,
        time=_number(wire, "time"),
    )


def encode_update(msg: UpdateMessage) -> bytes:
    return msgpack.packb(
        {
            "format": FORMAT_VERSION,
            "type": "update",
            "fleet": msg.fleet,
            "agent": msg.agent_id,
            "seq": msg.seq,
            "base": msg.base_version,
            "samples": msg.n_samples,
            "time": msg.time,
            "delta": msg.delta.to_wire(),
            "metrics": {k: float(v) for k, v in msg.metrics.items()},
        },
        use_bin_type=True,
    )


def decode_update(payload: bytes, *, fleet: str | None = None, max_bytes: int = MAX_MESSAGE_BYTES) -> UpdateMessage:
    """Strictly decode an update message; the delta stays encoded (see `codec.decode`)."""
    wire = _unpack(payload, "update", fleet, max_bytes)
    agent = _typed(wire, "agent", str)
    try:
        check_name("agent id", agent)
    except ValueError as exc:
        raise ProtocolError("schema", str(exc)) from None
    metrics = wire.get("metrics", {})
    if not isinstance(metrics, dict) or len(metrics) > MAX_METRICS:
        raise ProtocolError("schema", f"metrics must be a map of at most {MAX_METRICS} entries")
    for key, value in metrics.items():
        if not isinstance(key, str) or not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ProtocolError("schema", "metrics must map names to numbers")
        if not math.isfinite(value):
            raise ProtocolError("non_finite", f"metric {key} is not finite")
    return UpdateMessage(
        fleet=wire["fleet"],
        agent_id=agent,
        seq=_int(wire, "seq", 0, MAX_SEQ),
        base_version=_int(wire, "base", 0, MAX_SEQ),
        n_samples=_int(wire, "samples", 1, MAX_SAMPLES),
        delta=codec.Encoded.from_wire(wire.get("delta")),
        metrics={k: float(v) for k, v in metrics.items()},
        time=_number(wire, "time"),
    )


def _unpack(payload: bytes, kind: str, fleet: str | None, max_bytes: int) -> dict:
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise ProtocolError("decode", f"payload must be bytes, got {type(payload).__name__}")
    if len(payload) > max_bytes:
        raise ProtocolError("oversize", f"{len(payload)} bytes exceeds the limit of {max_bytes}")
    try:
        wire = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises many types for bad input
        raise ProtocolError("decode", f"not valid msgpack: {type(exc).__name__}: {exc}") from None
    if not isinstance(wire, dict):
        raise ProtocolError("schema", f"a {kind} message must be a map, got {type(wire).__name__}")
    fmt = wire.get("format")
    if fmt != FORMAT_VERSION:
        raise ProtocolError("format", f"unsupported format {fmt!r}, this side speaks {FORMAT_VERSION}")
    if wire.get("type") != kind:
        raise ProtocolError("schema", f"expected a {kind} message, got type {wire.get('type')!r}")
    got_fleet = _typed(wire, "fleet", str)
    if fleet is not None and got_fleet != fleet:
        raise ProtocolError("fleet", f"message for fleet {got_fleet!r}, expected {fleet!r}")
    return wire


def _typed(wire: dict, key: str, kind: type):
    value = wire.get(key)
    if not isinstance(value, kind):
        raise ProtocolError("schema", f"{key} must be {kind.__name__}, got {type(value).__name__}")
    return value


def _int(wire: dict, key: str, low: int, high: int) -> int:
    value = wire.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ProtocolError("schema", f"{key} must be an integer, got {type(value).__name__}")
    if not low <= value <= high:
        raise ProtocolError("schema", f"{key}={value} outside [{low}, {high}]")
    return value


def _number(wire: dict, key: str) -> float:
    value = wire.get(key)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ProtocolError("schema", f"{key} must be a finite number")
    return float(value)
