"""The two msgpack messages of fedmq, their encoders and strict decoders.

Model (coordinator -> agents, retained, sent rarely: a self-describing map)::

    {"format": 2, "type": "model", "fleet": str, "version": int, "time": float,
     "spec": {...ModelSpec...}, "params": bytes (little-endian float32, spec.n_params),
     "started_at": float (optional: when the publishing coordinator started)}

An agent that sees the same version again with another `started_at` knows the coordinator
restarted (its last update may have been lost with a broker's state) and sends afresh.

Update (agent -> coordinator, the hot path: a positional array, floats as float32)::

    [2, "update", seq, base, samples, delta (see codec.Encoded), metrics {str: float}]

The update carries no fleet, agent id or timestamp: the topic ``<prefix>/<fleet>/update/<agent>``
names the first two (and the broker's ACL authenticates it), and the coordinator stamps
arrival with its own clock. Decoders raise `ProtocolError` for anything that is not exactly this.
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

FORMAT_VERSION = 2
# Positions of the update array's fields (names used in errors and by tests).
UPDATE_FIELDS = ("format", "type", "seq", "base", "samples", "delta", "metrics")
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
    started_at: float | None = None  # the publishing coordinator's start (wall clock)


@dataclass(frozen=True)
class UpdateMessage:
    """One agent's contribution: an encoded delta from the model at `base_version`.

    `agent_id` travels in the topic, not the payload; decoding takes it from the caller.
    """

    agent_id: str | None
    seq: int
    base_version: int
    n_samples: int
    delta: codec.Encoded
    metrics: dict = field(default_factory=dict)


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
            **({} if msg.started_at is None else {"started_at": msg.started_at}),
        },
        use_bin_type=True,
    )


def decode_model(payload: bytes, *, fleet: str | None = None, max_bytes: int = MAX_MESSAGE_BYTES) -> ModelMessage:
    """Strictly decode a model message (optionally checking it is for `fleet`)."""
    wire = _unpack(payload, max_bytes)
    if not isinstance(wire, dict):
        raise ProtocolError("schema", f"a model message must be a map, got {type(wire).__name__}")
    _check_header(wire, "model")
    got_fleet = _typed(wire, "fleet", str)
    if fleet is not None and got_fleet != fleet:
        raise ProtocolError("fleet", f"message for fleet {got_fleet!r}, expected {fleet!r}")
    spec = ModelSpec.from_wire(wire.get("spec"))
    raw = _typed(wire, "params", bytes)
    if len(raw) != 4 * spec.n_params:
        raise ProtocolError("shape", f"params has {len(raw)} bytes, spec needs {4 * spec.n_params}")
    params = np.frombuffer(raw, dtype="<f4").astype(np.float64)
    if not np.isfinite(params).all():
        raise ProtocolError("non_finite", "model params contain NaN or Inf")
    return ModelMessage(
        fleet=got_fleet,
        version=_int(wire, "version", 0, MAX_SEQ),
        spec=spec,
        params=params,
        time=_number(wire, "time"),
        started_at=_number(wire, "started_at") if "started_at" in wire else None,
    )


def encode_update(msg: UpdateMessage) -> bytes:
    """The update's payload; publish it on ``Topics.update(msg.agent_id)``."""
    return msgpack.packb(
        [
            FORMAT_VERSION,
            "update",
            msg.seq,
            msg.base_version,
            msg.n_samples,
            msg.delta.to_wire(),
            {k: float(v) for k, v in msg.metrics.items()},
        ],
        use_bin_type=True,
        use_single_float=True,
    )


def decode_update(payload: bytes, agent_id: str | None = None, *, max_bytes: int = MAX_MESSAGE_BYTES) -> UpdateMessage:
    """Strictly decode an update payload from agent `agent_id` (known from its topic).

    The delta stays encoded (see `codec.decode`).
    """
    wire = _unpack(payload, max_bytes)
    if not isinstance(wire, list) or len(wire) != len(UPDATE_FIELDS):
        got = f"{len(wire)} fields" if isinstance(wire, list) else type(wire).__name__
        raise ProtocolError("schema", f"an update must be an array of {len(UPDATE_FIELDS)} fields, got {got}")
    wire = dict(zip(UPDATE_FIELDS, wire))
    _check_header(wire, "update")
    metrics = wire["metrics"]
    if not isinstance(metrics, dict) or len(metrics) > MAX_METRICS:
        raise ProtocolError("schema", f"metrics must be a map of at most {MAX_METRICS} entries")
    for key, value in metrics.items():
        if not isinstance(key, str) or not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ProtocolError("schema", "metrics must map names to numbers")
        if not math.isfinite(value):
            raise ProtocolError("non_finite", f"metric {key} is not finite")
    return UpdateMessage(
        agent_id=agent_id,
        seq=_int(wire, "seq", 0, MAX_SEQ),
        base_version=_int(wire, "base", 0, MAX_SEQ),
        n_samples=_int(wire, "samples", 1, MAX_SAMPLES),
        delta=codec.Encoded.from_wire(wire["delta"]),
        metrics={k: float(v) for k, v in metrics.items()},
    )


def _unpack(payload: bytes, max_bytes: int) -> object:
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise ProtocolError("decode", f"payload must be bytes, got {type(payload).__name__}")
    if len(payload) > max_bytes:
        raise ProtocolError("oversize", f"{len(payload)} bytes exceeds the limit of {max_bytes}")
    try:
        return msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises many types for bad input
        raise ProtocolError("decode", f"not valid msgpack: {type(exc).__name__}: {exc}") from None


def _check_header(wire: dict, kind: str) -> None:
    fmt = wire.get("format")
    if fmt != FORMAT_VERSION:
        raise ProtocolError("format", f"unsupported format {fmt!r}, this side speaks {FORMAT_VERSION}")
    if wire.get("type") != kind:
        raise ProtocolError("schema", f"expected a {kind} message, got type {wire.get('type')!r}")


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
