"""The fleet's schema from its agents: column names and label sets in, one model spec out.

Pure functions, no I/O. Each agent announces its feature columns (in its CSV's order) and the
labels it holds on ``<prefix>/<fleet>/schema/<agent>`` (msgpack, retained, QoS 1)::

    {"format": 2, "type": "schema", "columns": [str, ...], "labels": [int, ...] or nil}

(`labels` nil: the labels are not a small set of integers, i.e. regression targets, or the
agent is private -- local DP, secure aggregation, --private -- and keeps its label set). The
coordinator fixes the spec from the first agents (`fix_spec`); every side then checks an
agent's announcement against it with `mismatch` (one line, the same words on both sides)
and maps the agent's columns onto the fleet's by name with `column_order`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import msgpack
import numpy as np

from protocol.errors import ProtocolError
from protocol.messages import FORMAT_VERSION, MAX_COLUMNS, MAX_STR, WireLimits, _check_header, _nesting_refused, _unpack
from protocol.model_spec import ModelSpec

MAX_LABELS = 1_000  # an agent holding more distinct integer labels announces none (a regression target)
MAX_SCHEMA_BYTES = MAX_COLUMNS * (MAX_STR + 3) + MAX_LABELS * 9 + 256
SCHEMA_LIMITS = WireLimits(max_objects=16 + MAX_COLUMNS + MAX_LABELS, max_depth=2,
                           max_array=max(MAX_COLUMNS, MAX_LABELS), max_map=8)


@dataclass(frozen=True)
class Schema:
    """What one agent holds: feature column names in its own order, and its label set (None: targets)."""

    columns: tuple[str, ...]
    labels: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if not self.columns or len(self.columns) > MAX_COLUMNS:
            raise ValueError(f"a schema needs 1 to {MAX_COLUMNS} columns, got {len(self.columns)}")
        if not all(isinstance(c, str) and 0 < len(c) <= MAX_STR for c in self.columns):
            raise ValueError(f"column names must be non-empty strings of at most {MAX_STR} characters")
        if len(set(self.columns)) != len(self.columns):
            dup = sorted(c for c, n in Counter(self.columns).items() if n > 1)
            raise ValueError(f"duplicate column name(s) {', '.join(map(repr, dup[:5]))}")
        if self.labels is not None:
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in self.labels):
                raise ValueError("labels must be integers")  # first: a list among them would raise TypeError in set()
            if len(self.labels) > MAX_LABELS or len(set(self.labels)) != len(self.labels):
                raise ValueError(f"labels must be at most {MAX_LABELS} distinct integers")


def of_data(columns: Sequence[str], y: np.ndarray) -> Schema:
    """The schema of a data window: its columns, and its labels when they are few integers."""
    y = np.asarray(y)
    labels = None
    if y.dtype.kind in "iu":
        distinct = np.unique(y)
        if len(distinct) <= MAX_LABELS:
            labels = tuple(int(v) for v in distinct)
    return Schema(tuple(columns), labels)


def encode_schema(schema: Schema) -> bytes:
    """The schema payload; publish it retained on ``Topics.schema(agent_id)``."""
    return msgpack.packb({"format": FORMAT_VERSION, "type": "schema", "columns": list(schema.columns),
                          "labels": None if schema.labels is None else list(schema.labels)}, use_bin_type=True)


@_nesting_refused(lambda *_, **__: SCHEMA_LIMITS)
def decode_schema(payload: bytes) -> Schema:
    """Strictly decode a schema payload; ProtocolError if anything is off."""
    wire = _unpack(payload, MAX_SCHEMA_BYTES, SCHEMA_LIMITS)
    if not isinstance(wire, dict):
        raise ProtocolError("schema", f"a schema message must be a map, got {type(wire).__name__}")
    _check_header(wire, "schema")
    columns, labels = wire.get("columns"), wire.get("labels")
    if not isinstance(columns, list) or not (labels is None or isinstance(labels, list)):
        raise ProtocolError("schema", "columns must be a list and labels a list or nil")
    try:
        return Schema(tuple(columns), None if labels is None else tuple(labels))
    except ValueError as exc:
        raise ProtocolError("schema", f"bad schema: {exc}") from None


def fix_spec(first: Sequence[Schema], estimator: str, hyperparameters: dict | None = None, *,
             n_features: int | None = None, classes: tuple = ()) -> ModelSpec:
    """The spec the first agents' schemas give; what the flags gave (`n_features`, `classes`) wins.

    The columns are those of the most common column set among `first` (ties: the earliest),
    in the order of the earliest agent holding it; an explicit `n_features` keeps only the
    schemas of that many columns. A classifier's classes are the union of the label sets of
    the agents holding those columns. ValueError (one line) when nothing fits.
    """
    usable = [s for s in first if n_features is None or len(s.columns) == n_features]
    if not usable:
        raise ValueError(f"no agent announced {n_features} feature columns (--n-features)")
    sets = Counter(frozenset(s.columns) for s in usable)
    best = max(sets.values())
    chosen = next(s for s in usable if sets[frozenset(s.columns)] == best)
    agree = [s for s in usable if frozenset(s.columns) == frozenset(chosen.columns)]
    if estimator == "sgd-classifier" and not classes:
        if any(s.labels is None for s in agree):
            raise ValueError("an agent announced no label set (a private agent, or labels that are not a small set "
                             "of integers): give --classes")
        classes = tuple(sorted({v for s in agree for v in s.labels}))
        if len(classes) < 2:
            raise ValueError(f"the first agents hold only the label(s) {list(classes)}: give --classes, "
                             "or wait for more agents (--schema-agents)")
    return ModelSpec(estimator, len(chosen.columns), tuple(classes), dict(hyperparameters or {}),
                     columns=chosen.columns)


def mismatch(schema: Schema, spec: ModelSpec) -> str | None:
    """Why an agent holding `schema` cannot train the fleet's model of `spec` (its columns); None when it can."""
    if spec.columns:
        missing = [c for c in spec.columns if c not in set(schema.columns)]
        extra = [c for c in schema.columns if c not in set(spec.columns)]
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"missing column(s) {_names(missing)}")
            if extra:
                parts.append(f"unknown column(s) {_names(extra)}")
            return f"columns do not match the fleet's: {'; '.join(parts)}"
    elif len(schema.columns) != spec.n_features:
        return f"{len(schema.columns)} feature columns, the fleet's model has {spec.n_features}"
    return None


def unknown_labels(schema: Schema, spec: ModelSpec) -> list[int]:
    """Labels an agent holds that the fleet's classifier does not know (it skips those rows)."""
    if not spec.is_classifier or schema.labels is None:
        return []
    return sorted(set(schema.labels) - set(spec.classes))


def column_order(columns: Sequence[str], spec: ModelSpec) -> np.ndarray | None:
    """Indices that put data of `columns` into the fleet's column order; None when already in it.

    ValueError (the `mismatch` reason) when the columns are not the fleet's.
    """
    if not spec.columns:
        if len(columns) != spec.n_features:
            raise ValueError(f"{len(columns)} feature columns, the fleet's model has {spec.n_features}")
        return None
    if tuple(columns) == spec.columns:
        return None
    reason = mismatch(Schema(tuple(columns)), spec)
    if reason is not None:
        raise ValueError(reason)
    at = {c: i for i, c in enumerate(columns)}
    return np.array([at[c] for c in spec.columns], dtype=np.intp)


def _names(names: list[str], show: int = 5) -> str:
    more = f" and {len(names) - show} more" if len(names) > show else ""
    return ", ".join(repr(n) for n in names[:show]) + more
