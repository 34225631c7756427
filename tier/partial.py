"""Partial aggregates: what a partition worker folds and hands to the root, and the wire format.

Partial sums commute with buffering: the root's FedBuff step over the union of partials equals
the single coordinator's step over the same updates (sample-weighted mean of staleness-weighted
deltas), whatever the flush granularity, as long as no claimed count is above the lower median of its
partial's and of the root's buffer and no agent sends twice into one buffer (each bounds an agent's weight there:
issue 18 point 3, tier/steps.py). `PartialSum` is a
coordinator Strategy (one small class behind the same interface) that never steps: the partition's
`Coordinator` core validates, dedups and weighs each update as the single coordinator does, and this
strategy only sums.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgpack
import numpy as np

from coordinator.aggregation import agent_capped_weights
from coordinator.staleness import Constant, StalenessFn
from coordinator.strategies import Strategy
from protocol.errors import ProtocolError
from protocol.topics import TIER_SUBJECTS, parse_tier

MAX_PARTIAL_BYTES = 8 * 1024 * 1024
# what a partial's or a counts message's numbers may be: the partials' subjects are reachable by whoever may
# publish on the fleet's NATS account (a device through the MQTT listener, without authorization), and the root
# checkpoints what it keeps (msgpack: at most 64-bit integers) and keeps the larger of each count forever
MAX_INT = 2 ** 63 - 1  # partition, epoch, seq, covered seq and base
MAX_COUNT = 2 ** 53  # a refusal count (exact as a float: the status's JSON, the metrics)
MAX_REASONS = 32  # reasons per counts map (the coordinator's refusal reasons are a dozen)
MAX_REASON_CHARS = 64


@dataclass
class Partial:
    """Sum of n_i w(s_i) delta_i over the updates of one partition since its last flush.

    `covers` is every (agent, seq) folded in: the root's audit log is the proof that each sent
    update counted exactly once. (partition, seq) numbers partials gap-free per partition
    across owners; `epoch` is the owner's lease epoch (fencing).
    """

    partition: int
    epoch: int
    seq: int
    weighted_sum: np.ndarray
    weight: float
    count: int
    covers: list = field(default_factory=list)  # [(agent, seq, base_version), ...]
    created: float = 0.0  # worker wall clock at flush (publish-to-fold latency)
    oldest: float = 0.0  # wall clock the oldest covered update arrived at the worker
    clip: float | None = None  # central DP: the C its updates were clipped to (weight 1 each); None without
    round: bytes | None = None  # secure aggregation: the cohort's round id (the sum of its members' deltas)
    # the partition's device messages refused so far, by reason (cumulative across owners: its checkpoint
    # holds them); the root's status sums the newest of each partition, so an operator sees every refusal
    rejected: dict = field(default_factory=dict)
    # secure aggregation: the partition's members left out of cohorts so far, by reason (cumulative likewise)
    excluded: dict = field(default_factory=dict)
    # each covered update's weight, in `covers` order (they sum to `weight`): the root caps each at its buffer's
    # lower median (tier/steps.py); None from a worker that did not send them (its weight counts as even)
    rows: np.ndarray | None = None

    @property
    def msg_id(self) -> str:
        return f"p{self.partition}-{self.seq}"


def encode_partial(p: Partial) -> bytes:
    return msgpack.packb({
        "v": 1, "partition": p.partition, "epoch": p.epoch, "seq": p.seq,
        "sum": np.ascontiguousarray(p.weighted_sum, dtype="<f8").tobytes(), "weight": float(p.weight),
        "count": int(p.count), "covers": [list(c) for c in p.covers], "created": p.created, "oldest": p.oldest,
        "clip": p.clip, "round": p.round, "rejected": {str(k): int(v) for k, v in p.rejected.items()},
        "excluded": {str(k): int(v) for k, v in p.excluded.items()},
        "rows": None if p.rows is None else np.ascontiguousarray(p.rows, dtype="<f8").tobytes(),
    }, use_bin_type=True)


def decode_partial(data: bytes, n_params: int) -> Partial:
    """ProtocolError on anything that is not a partial of `n_params` finite values."""
    if len(data) > MAX_PARTIAL_BYTES:
        raise ProtocolError("oversize", f"partial of {len(data)} bytes")
    try:
        m = msgpack.unpackb(data, raw=False, strict_map_key=False)
        total = np.frombuffer(m["sum"], dtype="<f8")
        p = Partial(_int(m["partition"]), _int(m["epoch"]), _int(m["seq"]), total, float(m["weight"]), _int(m["count"]),
                    [(str(a), _int(s), _int(b)) for a, s, b in m["covers"]], float(m.get("created", 0)),
                    float(m.get("oldest", 0)), None if m.get("clip") is None else float(m["clip"]),
                    None if m.get("round") is None else bytes(m["round"]),
                    _counts(m.get("rejected")), _counts(m.get("excluded")),
                    None if m.get("rows") is None else np.frombuffer(m["rows"], dtype="<f8"))
    except (ValueError, TypeError, KeyError, OverflowError, AttributeError, msgpack.UnpackException) as exc:
        raise ProtocolError("decode", f"not a partial aggregate: {exc}") from None
    if total.shape != (n_params,) or not np.isfinite(total).all() or not np.isfinite(p.weight) or p.weight < 0 \
            or p.count != len(p.covers):
        raise ProtocolError("shape", "partial aggregate with the wrong length, non-finite values or a bad count")
    if p.rows is not None and not rows_fit(p.rows, p.weight, p.count):
        raise ProtocolError("shape", "partial aggregate whose update weights are not its count of finite, non-negative "
                                     "weights summing to its weight")
    return p


def rows_fit(rows: np.ndarray, weight: float, count: int) -> bool:
    """A partial's per-update weights are `count` finite, non-negative numbers summing to its `weight` (to rounding):
    the root caps those, so they must be the weight the partial's sum was made with."""
    return rows.shape == (count,) and bool(np.isfinite(rows).all()) and bool((rows >= 0).all()) \
        and abs(float(rows.sum()) - weight) <= 1e-9 * max(1.0, weight)


@dataclass
class Counts:
    """A partition's refusal counts alone (cumulative, as a partial carries them), for the commits that make no
    partial: a partition whose every device is hostile or silent still shows its refusals at the root. Being
    cumulative, the root keeps the larger of each count, so a redelivered or repeated one is never added twice."""

    partition: int
    rejected: dict = field(default_factory=dict)
    excluded: dict = field(default_factory=dict)


def _int(v, top: int = MAX_INT) -> int:
    """An integer in 0..top, as the tier's own encoders send it: ValueError on a float, a bool, a string, out of range."""
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= top:
        raise ValueError(f"{v!r:.40} is not an integer in 0..{top}")
    return int(v)


def _counts(m) -> dict[str, int]:
    """A map of refusal reason -> count (ValueError unless at most MAX_REASONS short strings to counts)."""
    m = m or {}
    if not isinstance(m, dict) or len(m) > MAX_REASONS:
        raise ValueError(f"counts must map at most {MAX_REASONS} reasons to counts")
    if not all(isinstance(k, str) and len(k) <= MAX_REASON_CHARS for k in m):
        raise ValueError(f"a reason must be a string of at most {MAX_REASON_CHARS} characters")
    return {k: _int(v, MAX_COUNT) for k, v in m.items()}


def encode_counts(c: Counts) -> bytes:
    return msgpack.packb({"v": 1, "kind": "counts", "partition": c.partition,
                          "rejected": {str(k): int(v) for k, v in c.rejected.items()},
                          "excluded": {str(k): int(v) for k, v in c.excluded.items()}}, use_bin_type=True)


def decode_message(data: bytes, n_params: int) -> Partial | Counts:
    """A partial aggregate or a partition's counts; ProtocolError on anything else."""
    if len(data) <= 4096:  # counts are small: a large partial is not unpacked twice
        try:
            m = msgpack.unpackb(data, raw=False, strict_map_key=False)
        except (ValueError, msgpack.UnpackException):
            m = None
        if isinstance(m, dict) and m.get("kind") == "counts":
            try:
                return Counts(_int(m["partition"]), _counts(m.get("rejected")), _counts(m.get("excluded")))
            except (ValueError, TypeError, KeyError, AttributeError, OverflowError) as exc:
                raise ProtocolError("decode", f"not a partition's counts: {exc}") from None
    return decode_partial(data, n_params)


def subject_partition(subject: str) -> tuple[int, bool] | None:
    """The partition a message on `<prefix>.<fleet>.partial.<P>[.counts]` was sent for, and whether it is on the
    counts subject; None for any other subject (the root checks a message's own partition against it)."""
    level = TIER_SUBJECTS["partial"][0]
    head, _, tail = subject.partition(f".{level}.")
    parsed = parse_tier([level, *tail.split(".")]) if head else None
    if parsed is None or parsed[0] not in ("partial", "partial_counts"):
        return None
    return parsed[1], parsed[0] == "partial_counts"


def merge_counts(old: dict[str, int], new: dict[str, int]) -> dict[str, int]:
    """Two cumulative counts of one partition: the larger of each reason (a stale or repeated one adds nothing)."""
    return {k: max(old.get(k, 0), new.get(k, 0)) for k in sorted({*old, *new})}


class PartialSum(Strategy):
    """Holds n, w(s) delta per update for the partition's flush and sums them with no agent's n above the lower
    median of the flush's agents (agent_capped_weights: an agent's several updates share one agent's weight, as the
    coordinator's FedBuff keeps one row per agent); never changes the model itself.
    The rows are held only until the flush (FLUSH_S, tier/worker.py): updates x parameters x 8 bytes."""

    name = "partial"

    def __init__(self, n_params: int, staleness: StalenessFn = Constant()) -> None:
        self.n_params = n_params
        self.staleness = staleness
        self.weight_capped = 0  # updates whose weight the cap lowered (the worker's metrics)
        self.repeat_agent = 0  # updates of an agent already in the partial (likewise)
        self.reset()

    def reset(self) -> None:
        self._deltas: list[np.ndarray] = []
        self._counts: list[float] = []
        self._agents: list[str | None] = []
        self._seen: set[str] = set()

    @property
    def pending(self) -> int:
        return len(self._deltas)

    def add(self, params, delta, n_samples, staleness, base=None, agent=None):
        self._deltas.append(self.staleness(staleness) * np.asarray(delta, dtype=np.float64))
        self._counts.append(float(n_samples))
        self._agents.append(agent)
        if agent is not None:
            self.repeat_agent += agent in self._seen
            self._seen.add(agent)
        return None

    def take(self) -> tuple[np.ndarray, float, int, np.ndarray]:
        """The capped sum since the last take, its weight, its count and each update's (capped) weight; and
        start again."""
        rows, lowered = agent_capped_weights(np.asarray(self._counts, dtype=np.float64), self._agents)
        self.weight_capped += lowered
        total = rows @ np.stack(self._deltas) if self._deltas else np.zeros(self.n_params)
        out = (total, float(rows.sum()), len(rows), rows)
        self.reset()
        return out
