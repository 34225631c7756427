"""Partial aggregates: what a partition worker folds and hands to the root, and the wire format.

Partial sums commute with buffering: the root's FedBuff step over the union of partials equals
the single coordinator's step over the same updates (sample-weighted mean of staleness-weighted
deltas), whatever the flush granularity. `PartialSum` is a coordinator Strategy (one small class
behind the same interface) that never steps: the partition's `Coordinator` core validates,
dedups and weighs each update as the single coordinator does, and this strategy only sums.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgpack
import numpy as np

from coordinator.staleness import Constant, StalenessFn
from coordinator.strategies import Strategy
from protocol.errors import ProtocolError

MAX_PARTIAL_BYTES = 8 * 1024 * 1024


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

    @property
    def msg_id(self) -> str:
        return f"p{self.partition}-{self.seq}"


def encode_partial(p: Partial) -> bytes:
    return msgpack.packb({
        "v": 1, "partition": p.partition, "epoch": p.epoch, "seq": p.seq,
        "sum": np.ascontiguousarray(p.weighted_sum, dtype="<f8").tobytes(), "weight": float(p.weight),
        "count": int(p.count), "covers": [list(c) for c in p.covers], "created": p.created, "oldest": p.oldest,
        "clip": p.clip, "round": p.round,
    }, use_bin_type=True)


def decode_partial(data: bytes, n_params: int) -> Partial:
    """ProtocolError on anything that is not a partial of `n_params` finite values."""
    if len(data) > MAX_PARTIAL_BYTES:
        raise ProtocolError("oversize", f"partial of {len(data)} bytes")
    try:
        m = msgpack.unpackb(data, raw=False, strict_map_key=False)
        total = np.frombuffer(m["sum"], dtype="<f8")
        p = Partial(int(m["partition"]), int(m["epoch"]), int(m["seq"]), total, float(m["weight"]), int(m["count"]),
                    [(str(a), int(s), int(b)) for a, s, b in m["covers"]], float(m.get("created", 0)),
                    float(m.get("oldest", 0)), None if m.get("clip") is None else float(m["clip"]),
                    None if m.get("round") is None else bytes(m["round"]))
    except (ValueError, TypeError, KeyError, msgpack.UnpackException) as exc:
        raise ProtocolError("decode", f"not a partial aggregate: {exc}") from None
    if total.shape != (n_params,) or not np.isfinite(total).all() or not np.isfinite(p.weight) or p.weight < 0 \
            or p.count != len(p.covers):
        raise ProtocolError("shape", "partial aggregate with the wrong length, non-finite values or a bad count")
    return p


class PartialSum(Strategy):
    """Sums n w(s) delta for the partition's flush; never changes the model itself."""

    name = "partial"

    def __init__(self, n_params: int, staleness: StalenessFn = Constant()) -> None:
        self.n_params = n_params
        self.staleness = staleness
        self.reset()

    def reset(self) -> None:
        self.weighted_sum = np.zeros(self.n_params)
        self.weight = 0.0
        self.count = 0

    @property
    def pending(self) -> int:
        return self.count

    def add(self, params, delta, n_samples, staleness, base=None, agent=None):
        n = float(n_samples)
        self.weighted_sum += (n * self.staleness(staleness)) * np.asarray(delta, dtype=np.float64)
        self.weight += n
        self.count += 1
        return None

    def take(self) -> tuple[np.ndarray, float, int]:
        """The sums since the last take, and start again."""
        out = (self.weighted_sum, self.weight, self.count)
        self.reset()
        return out
