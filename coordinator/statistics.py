"""The fleet's merged feature statistics, and re-expressing the model when they are refined.

`FleetStatistics` keeps the newest statistics of every agent (an agent that sends again
replaces its own contribution; one that joins late adds its own) and merges them in agent
order. `Rescales` remembers each change of scaling by the model version it took effect at,
so an update trained on a model of an older scaling is re-expressed before it is applied.
"""

from __future__ import annotations

import logging

import numpy as np

from protocol.errors import ProtocolError
from protocol.model_spec import ONE_CLASS_SHIFT, ModelSpec
from protocol.statistics import FeatureStats, Scaling, identity, reexpress, robust_merge, scaling_of
from protocol.stats_message import decode_stats
from protocol.topics import Topics

log = logging.getLogger(__name__)

# At most this many agents' statistics are held: a bound on memory against a flood of ids
# (an agent's statistics are never dropped to make room: that would move the scaling).
MAX_AGENTS = 100_000
# No one agent decides the fleet's scaling (issue 18): its count weighs at most this many times the
# median count, and per feature this fraction of the agents with the most extreme means (and
# variances) at each end is left out; below 5 agents nothing is trimmed.
STATS_COUNT_FACTOR = 4.0
STATS_TRIM = 0.2


class FleetStatistics:
    """Per-agent statistics in, one merged `Scaling` out; rejections counted by reason."""

    def __init__(self, topics: Topics, n_features: int, *, min_agents: int = 1, columns: tuple = ()) -> None:
        if min_agents < 1:
            raise ValueError("--stats-min-agents must be at least 1")
        self.topics = topics
        self.n_features = n_features
        self.columns = tuple(columns)  # the fleet's column names: named statistics are put in this order
        self.min_agents = min_agents
        self.by_agent: dict[str, FeatureStats] = {}
        self.payloads: dict[str, bytes] = {}  # as received: what a checkpoint keeps, bit for bit
        self.rejected_: dict[str, int] = {}
        self.changes_ = 0  # bumped whenever the merged statistics may have changed

    def handle(self, topic: str, payload: bytes) -> str | None:
        """Take one statistics payload; None if accepted, else the reason it was not."""
        agent = self.topics.agent_of_stats(topic)
        reason = None
        if agent is None:
            reason = "topic"
        elif not payload:  # an agent clearing its retained statistics
            if self.by_agent.pop(agent, None) is not None:
                self.payloads.pop(agent, None)
                self.changes_ += 1
            return None
        elif agent not in self.by_agent and len(self.by_agent) >= MAX_AGENTS:
            reason = "too_many_agents"
        else:
            try:
                stats = decode_stats(payload, self.n_features, self.columns)
            except ProtocolError as exc:
                reason = exc.reason
                log.warning("rejected statistics on %s: %s", topic, exc)
            else:
                if stats != self.by_agent.get(agent):
                    self.by_agent[agent] = stats
                    self.payloads[agent] = bytes(payload)
                    self.changes_ += 1
        if reason is not None:
            self.rejected_[reason] = self.rejected_.get(reason, 0) + 1
        return reason

    @property
    def ready(self) -> bool:
        """Enough agents have reported for a first scaling."""
        return len(self.by_agent) >= self.min_agents

    def merged(self) -> FeatureStats | None:
        """Every agent's statistics merged robustly (`robust_merge`: counts capped at STATS_COUNT_FACTOR x
        their median, the STATS_TRIM fraction of extreme agents left out per feature; agents in sorted order)."""
        return robust_merge([self.by_agent[a] for a in sorted(self.by_agent)], trim=STATS_TRIM,
                            count_factor=STATS_COUNT_FACTOR)

    def scaling(self) -> Scaling | None:
        """The scaling the merged statistics give; None before any agent reported."""
        merged = self.merged()
        return None if merged is None else scaling_of(merged)

    def summary(self) -> dict:
        """For the coordinator status: agents counted, rows seen per feature (min), rejections."""
        merged = self.merged()
        return {"agents": len(self.by_agent),
                "rows": int(merged.count.max(initial=0)) if merged is not None else 0,
                "missing_features": int((merged.count == 0).sum()) if merged is not None else self.n_features,
                "rejected": dict(self.rejected_)}

    def state(self) -> dict:
        """Checkpointable form: each agent's statistics as their wire payload."""
        return dict(self.payloads)

    def restore(self, state: dict) -> None:
        """Take back `state()`."""
        self.by_agent = {agent: decode_stats(raw, self.n_features, self.columns) for agent, raw in state.items()}
        self.payloads = {agent: bytes(raw) for agent, raw in state.items()}
        self.changes_ += 1


class Rescales:
    """The scaling in force and its history: version -> (old, new), to re-express stale deltas."""

    def __init__(self, spec: ModelSpec, keep: int = 64) -> None:
        self.spec = spec
        self.shift = ONE_CLASS_SHIFT if spec.is_one_class else 0.0  # what the model adds to its features
        self.keep = keep
        self.current: Scaling | None = None
        self.history: list[tuple[int, Scaling, Scaling]] = []  # (first version of `new`, old, new)

    def change(self, version: int, new: Scaling, vectors: list[np.ndarray]) -> list[np.ndarray]:
        """Make `new` current from `version` on; returns `vectors` (params, deltas) re-expressed."""
        old = self.current or identity(self.spec.n_features)
        self.current = new
        self.history.append((version, old, new))
        del self.history[:-self.keep]
        return [reexpress(v, self.spec.coef_shape, old, new, self.shift) for v in vectors]

    def catch_up(self, delta: np.ndarray, base_version: int) -> np.ndarray:
        """A delta computed on the model at `base_version`, re-expressed for the current scaling."""
        for version, old, new in self.history:
            if base_version < version:
                delta = reexpress(delta, self.spec.coef_shape, old, new, self.shift)
        return delta

    def state(self) -> dict | None:
        """Checkpointable form (float64 bytes), None when no scaling was ever set."""
        if self.current is None:
            return None
        wire = lambda s: [np.ascontiguousarray(s.mean, "<f8").tobytes(), np.ascontiguousarray(s.scale, "<f8").tobytes()]  # noqa: E731
        return {"current": wire(self.current), "history": [[v, *wire(o), *wire(n)] for v, o, n in self.history]}

    def restore(self, state: dict | None) -> None:
        """Take back `state()`."""
        if not state:
            return
        vec = lambda raw: np.frombuffer(raw, dtype="<f8").astype(np.float64)  # noqa: E731
        self.current = Scaling(*map(vec, state["current"]))
        self.history = [(v, Scaling(vec(a), vec(b)), Scaling(vec(c), vec(d))) for v, a, b, c, d in state["history"]]
