"""The statistics message (agent -> coordinator) and the scaling carried in the model message.

Statistics, on ``<prefix>/<fleet>/stats/<agent>`` (retained, QoS 1; the agent id is the topic's)::

    {"format": 2, "type": "stats", "count": bin, "sum": bin, "sumsq": bin, "min": bin, "max": bin}

each a little-endian float64 vector with one entry per feature; `count` counts the present
(non-missing) values. Scaling, inside the model message under "scaling"::

    {"mean": bin, "scale": bin}   (little-endian float64: agents standardize with exactly these)

Decoders raise `ProtocolError` for anything that is not exactly this.
"""

from __future__ import annotations

import msgpack
import numpy as np

from protocol.errors import ProtocolError
from protocol.messages import FORMAT_VERSION, WireLimits, _check_header, _unpack
from protocol.statistics import FeatureStats, Scaling, from_sums

STATS_FIELDS = ("count", "sum", "sumsq", "min", "max")
MAX_FEATURES = 1_000_000
MAX_STATS_BYTES = 5 * 8 * MAX_FEATURES + 256
STATS_LIMITS = WireLimits(max_objects=1 + 2 * 7, max_depth=1, max_array=0, max_map=7, max_bin=8 * MAX_FEATURES)


def _bin(vector: np.ndarray) -> bytes:
    return np.ascontiguousarray(vector, dtype="<f8").tobytes()


def _vector(wire: dict, key: str, n: int | None) -> np.ndarray:
    raw = wire.get(key)
    if not isinstance(raw, bytes) or len(raw) % 8 or not raw:
        raise ProtocolError("schema", f"{key} must be a non-empty float64 vector")
    vector = np.frombuffer(raw, dtype="<f8").astype(np.float64)
    if n is not None and len(vector) != n:
        raise ProtocolError("shape", f"{key} has {len(vector)} entries, expected {n}")
    return vector


def encode_stats(stats: FeatureStats) -> bytes:
    """The statistics payload; publish it on ``Topics.stats(agent_id)``."""
    count, total, squares = stats.sums()
    values = dict(zip(STATS_FIELDS, (count, total, squares, stats.min, stats.max)))
    return msgpack.packb({"format": FORMAT_VERSION, "type": "stats", **{k: _bin(v) for k, v in values.items()}},
                         use_bin_type=True)


def decode_stats(payload: bytes, n_features: int | None = None) -> FeatureStats:
    """Strictly decode a statistics payload (of `n_features` features when given)."""
    wire = _unpack(payload, MAX_STATS_BYTES, STATS_LIMITS)
    if not isinstance(wire, dict):
        raise ProtocolError("schema", f"a stats message must be a map, got {type(wire).__name__}")
    _check_header(wire, "stats")
    count = _vector(wire, "count", n_features)
    total, squares, low, high = (_vector(wire, key, len(count)) for key in STATS_FIELDS[1:])
    present = count > 0
    if not (np.isfinite(count).all() and (count >= 0).all() and (count == np.round(count)).all()):
        raise ProtocolError("schema", "count must hold non-negative whole numbers")
    if not all(np.isfinite(v[present]).all() for v in (total, squares, low, high)):
        raise ProtocolError("non_finite", "sum, sumsq, min and max must be finite where count > 0")
    if (squares[present] < 0).any() or (low[present] > high[present]).any():
        raise ProtocolError("schema", "sumsq must be >= 0 and min <= max")
    return from_sums(count, np.where(present, total, 0.0), np.where(present, squares, 0.0),
                     np.where(present, low, np.inf), np.where(present, high, -np.inf))


def scaling_to_wire(scaling: Scaling) -> dict:
    """The model message's "scaling" map."""
    return {"mean": _bin(scaling.mean), "scale": _bin(scaling.scale)}


def scaling_from_wire(wire: object, n_features: int) -> Scaling:
    """Strictly build a `Scaling` of `n_features` from the model message's "scaling" map."""
    if not isinstance(wire, dict):
        raise ProtocolError("schema", "scaling must be a map")
    mean, scale = _vector(wire, "mean", n_features), _vector(wire, "scale", n_features)
    try:
        return Scaling(mean, scale)
    except ValueError as exc:
        raise ProtocolError("non_finite", f"bad scaling: {exc}") from None
