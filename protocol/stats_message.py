"""The statistics message (agent -> coordinator) and the scaling carried in the model message.

Statistics, on ``<prefix>/<fleet>/stats/<agent>`` (retained, QoS 1; the agent id is the topic's)::

    {"format": 2, "type": "stats", "count": bin, "sum": bin, "sumsq": bin, "min": bin, "max": bin}

each a little-endian float64 vector with one entry per feature; `count` counts the present
(non-missing) values. An agent that knows its column names adds ``"columns": [str, ...]`` (its
own order); a coordinator that knows the fleet's columns puts the vectors in its order by name. Scaling, inside the model message under "scaling"::

    {"mean": bin, "scale": bin}   (little-endian float64: agents standardize with exactly these)

Decoders raise `ProtocolError` for anything that is not exactly this.
"""

from __future__ import annotations

import msgpack
import numpy as np

from protocol.errors import ProtocolError
from protocol.messages import FORMAT_VERSION, MAX_STR, WireLimits, _check_header, _nesting_refused, _unpack
from protocol.statistics import FeatureStats, Scaling, from_sums

STATS_FIELDS = ("count", "sum", "sumsq", "min", "max")
MAX_FEATURES = 1_000_000
MAX_STATS_BYTES = 5 * 8 * MAX_FEATURES + 256
MAX_NAMED = 10_000  # column names a statistics message may carry (protocol/messages.py MAX_COLUMNS)
MAX_STATS_BYTES += MAX_NAMED * 260
STATS_LIMITS = WireLimits(max_objects=1 + 2 * 8 + MAX_NAMED, max_depth=2, max_array=MAX_NAMED, max_map=8,
                          max_bin=8 * MAX_FEATURES)


# Bounds every statistics message is held to (issue 18): a count no agent's window reaches, and
# values so large that no sum, square or merge of them can overflow float64.
MAX_STATS_COUNT = 10**9
MAX_STATS_VALUE = 1e100


def stats_bytes(n_features: int | None) -> int:
    """The largest statistics payload of `n_features` features (each named): refused past it unread."""
    if n_features is None:
        return MAX_STATS_BYTES
    return min(MAX_STATS_BYTES, 256 + len(STATS_FIELDS) * (16 + 8 * n_features) + min(n_features, MAX_NAMED) * (MAX_STR + 3))


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


def unnamed_stats_bytes(n_features: int) -> int:
    """An upper bound on a statistics message of `n_features` features without column names
    (five float64 vectors in bin 32 framing and the header): about 40 bytes a feature, the
    least an agent's statistics take on the wire (`stats_bytes` is the most a decoder takes)."""
    return 5 * (8 * n_features + 5) + 64


def encode_stats(stats: FeatureStats, columns: tuple[str, ...] | None = None) -> bytes:
    """The statistics payload (naming the features `columns` when given); publish it on ``Topics.stats(agent_id)``."""
    count, total, squares = stats.sums()
    values = dict(zip(STATS_FIELDS, (count, total, squares, stats.min, stats.max)))
    named = {"columns": list(columns)} if columns is not None and len(columns) <= MAX_NAMED else {}
    return msgpack.packb({"format": FORMAT_VERSION, "type": "stats", **{k: _bin(v) for k, v in values.items()},
                          **named}, use_bin_type=True)


@_nesting_refused(lambda *_, **__: STATS_LIMITS)
def decode_stats(payload: bytes, n_features: int | None = None, columns: tuple[str, ...] = ()) -> FeatureStats:
    """Strictly decode a statistics payload (of `n_features` features when given).

    With the fleet's `columns`, statistics that name their columns are put in that order
    (ProtocolError "columns" when the names are not the fleet's).
    """
    wire = _unpack(payload, stats_bytes(n_features), STATS_LIMITS)
    if not isinstance(wire, dict):
        raise ProtocolError("schema", f"a stats message must be a map, got {type(wire).__name__}")
    _check_header(wire, "stats")
    count = _vector(wire, "count", n_features)
    total, squares, low, high = (_vector(wire, key, len(count)) for key in STATS_FIELDS[1:])
    named = wire.get("columns")
    if named is not None and columns:  # the agent's column order -> the fleet's, by name
        if not isinstance(named, list) or not all(isinstance(c, str) for c in named) \
                or sorted(named) != sorted(columns) or len(set(named)) != len(named):
            raise ProtocolError("columns", "the statistics' columns are not the fleet's")
        at = {c: i for i, c in enumerate(named)}
        order = np.array([at[c] for c in columns], dtype=np.intp)
        count, total, squares, low, high = (v[order] for v in (count, total, squares, low, high))
    present = count > 0
    if not (np.isfinite(count).all() and (count >= 0).all() and (count == np.round(count)).all()):
        raise ProtocolError("schema", "count must hold non-negative whole numbers")
    if not all(np.isfinite(v[present]).all() for v in (total, squares, low, high)):
        raise ProtocolError("non_finite", "sum, sumsq, min and max must be finite where count > 0")
    if (squares[present] < 0).any() or (low[present] > high[present]).any():
        raise ProtocolError("schema", "sumsq must be >= 0 and min <= max")
    _check_bounds(count[present], total[present], squares[present], low[present], high[present])
    return from_sums(count, np.where(present, total, 0.0), np.where(present, squares, 0.0),
                     np.where(present, low, np.inf), np.where(present, high, -np.inf))


def _check_bounds(count: np.ndarray, total: np.ndarray, squares: np.ndarray, low: np.ndarray, high: np.ndarray) -> None:
    """Counts within MAX_STATS_COUNT, values within MAX_STATS_VALUE, a variance >= 0 (present features)."""
    if (count > MAX_STATS_COUNT).any():
        raise ProtocolError("stats_count", f"a count above {MAX_STATS_COUNT:.0e} rows")
    mean, mean_square = total / count, squares / count
    if not (np.abs(low) <= MAX_STATS_VALUE).all() or not (np.abs(high) <= MAX_STATS_VALUE).all() \
            or not (np.abs(mean) <= MAX_STATS_VALUE).all() or not (mean_square <= MAX_STATS_VALUE ** 2).all():
        raise ProtocolError("stats_range", f"values beyond +-{MAX_STATS_VALUE:.0e}")
    if (mean_square - mean * mean < -1e-9 * mean_square).any():
        raise ProtocolError("stats_variance", "sumsq / count < (sum / count)^2: a negative variance")


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
