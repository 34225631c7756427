"""Aggregation strategies: how accepted updates change the global parameters.

One small class per rule behind one interface, as Flower does. A strategy receives the
current float64 parameters and one decoded delta at a time; it returns the new
parameters when the model changes (the coordinator then bumps the version) or None while
it is still collecting.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import Counter, OrderedDict
from itertools import count

import numpy as np

from coordinator.aggregation import capped_weights, parse_aggregate
from coordinator.staleness import Constant, StalenessFn

# fedasync's mixing weight: 0.6 followed the newest non-IID agent too closely (docs/benchmarks.md)
DEFAULT_ALPHA = 0.3


class Strategy(ABC):
    """Interface every aggregation rule implements."""

    name: str
    # True: a step mixes the agent's model (base + delta) in; False: it adds the (weighted) delta.
    # The norm bound judges what is applied (coordinator.validation.judged_norm).
    mixes_models = False

    def admit(self, staleness: int) -> str | None:
        """A rejection reason for an update this strategy will not take, else None."""
        return None

    @abstractmethod
    def add(
        self, params: np.ndarray, delta: np.ndarray, n_samples: int, staleness: int, base: np.ndarray | None = None,
        agent: str | None = None,
    ) -> np.ndarray | None:
        """Fold in one accepted update; new parameters if the model changed, else None.

        `base` is the published model the update was computed from, when still known; `agent`
        its sender (None: shares its agent with no other update).
        """

    @property
    def pending(self) -> int:
        """Updates received but not yet applied."""
        return 0

    def flush(self, params: np.ndarray) -> np.ndarray | None:
        """Apply what is pending now (a buffer that cannot fill); None when nothing is."""
        return None

    def resize(self, live: int) -> bool:
        """The number of agents online changed (coordinator/presence.py); True when what is
        pending is now a full buffer (the caller flushes it)."""
        return False

    def buffer(self) -> dict | None:
        """For the status: the configured and the effective buffer size (buffered rules), else None."""
        return None

    def buffered_agents(self) -> set:
        """The agents whose update the buffer holds (buffered rules), else none."""
        return set()

    def state(self) -> dict:
        """What a checkpoint must hold so that pending updates survive a crash."""
        return {}

    def restore(self, state: dict) -> None:
        """Take back `state()` from a checkpoint."""


class FedAsync(Strategy):
    """Mix each update as it arrives (Xie et al., 2019): x <- (1 - a) x + a (base + delta),
    a = alpha * w(s), where base + delta is the agent's local model.

    Mixing is convex, so many updates computed from the same base cannot overshoot the way
    summing their deltas would. When the base is no longer known, base = x (delta form).
    """

    name = "fedasync"
    mixes_models = True

    def __init__(self, alpha: float = DEFAULT_ALPHA, staleness: StalenessFn = Constant()) -> None:
        if not 0 < alpha <= 1:
            raise ValueError(f"fedasync alpha must be in (0, 1], got {alpha}")
        self.alpha = alpha
        self.staleness = staleness

    def add(self, params, delta, n_samples, staleness, base=None, agent=None):
        # x + a (local - x), in place on one new array: at 1e5 parameters the four temporaries
        # of (1 - a) x + a local cost more than decoding the update (docs/benchmarks.md)
        a = self.alpha * self.staleness(staleness)
        if base is None:  # local - x is the delta itself
            out = np.multiply(delta, a, dtype=np.float64)
        else:
            out = np.add(base, delta, dtype=np.float64)
            out -= params
            out *= a
        out += params
        return out


class FedBuff(Strategy):
    """Buffer K updates, then step by the server learning rate times their aggregate.

    K shrinks to the agents online when fewer are (`resize`), so a small fleet steps on
    every agent's update rather than waiting for --buffer-timeout.

    x <- x + eta * sum(n_i w(s_i) delta_i) / sum(n_i), with each n_i at most the buffer's lower
    median count (Nguyen et al., 2022 average the K rows alike; here a row below the median keeps
    its smaller weight), or a robust coordinate-wise median / trimmed mean of the w(s_i) delta_i.

    One row per agent: an agent's newer update replaces its older one in the buffer
    (`bounded_["repeat_agent"]`), and at the step no n_i exceeds the buffer's lower median
    (`bounded_["weight_cap"]`, coordinator.aggregation.capped_weights): one agent's claimed counts
    or volume cannot own the mean. At 2x the median, one agent claiming 10^9 rows of a buffer of 5
    held a third of every step it was in.
    """

    name = "fedbuff"

    def __init__(
        self,
        buffer_size: int = 5,
        server_lr: float = 1.0,
        staleness: StalenessFn = Constant(),
        aggregate: str = "mean",
    ) -> None:
        if buffer_size < 1:
            raise ValueError(f"buffer size must be >= 1, got {buffer_size}")
        if server_lr <= 0:
            raise ValueError(f"server learning rate must be > 0, got {server_lr}")
        self.buffer_size = buffer_size
        self.server_lr = server_lr
        self.staleness = staleness
        self.aggregate_name = aggregate
        self._aggregate = parse_aggregate(aggregate)
        self._deltas: list[np.ndarray] = []
        self._samples: list[float] = []
        self._agents: list[str | None] = []
        self.bounded_: Counter[str] = Counter()
        self.live = 0  # agents online (coordinator/presence.py); 0: unknown, the buffer is K

    @property
    def pending(self) -> int:
        return len(self._deltas)

    @property
    def effective_size(self) -> int:
        """K = min(K, live agents): a fleet smaller than K fills its buffer once every agent sent."""
        return min(self.buffer_size, self.live) if self.live > 0 else self.buffer_size

    def resize(self, live: int) -> bool:
        self.live = max(0, int(live))
        return 0 < self.effective_size <= self.pending

    def buffer(self) -> dict:
        return {"size": self.buffer_size, "effective": self.effective_size, "live_agents": self.live}

    def buffered_agents(self) -> set:
        return set(self._agents)

    def add(self, params, delta, n_samples, staleness, base=None, agent=None):
        row = self.staleness(staleness) * np.asarray(delta, dtype=np.float64)
        if agent is not None and agent in self._agents:  # its newer update replaces the older
            i = self._agents.index(agent)
            del self._deltas[i], self._samples[i], self._agents[i]
            self.bounded_["repeat_agent"] += 1
        self._deltas.append(row)
        self._samples.append(float(n_samples))
        self._agents.append(agent)
        if len(self._deltas) < self.effective_size:
            return None
        return self.flush(params)

    def flush(self, params):
        if not self._deltas:
            return None
        new = self._stepped(params, self._deltas, self._samples)
        self._deltas, self._samples, self._agents = [], [], []
        return new

    def _stepped(self, params: np.ndarray, rows: list, samples: list) -> np.ndarray:
        """params + server lr x the aggregate of `rows`, their sample weights capped."""
        return params + self.server_lr * self._aggregate(np.stack(rows), self._capped(np.asarray(samples)))

    def _capped(self, weights: np.ndarray) -> np.ndarray:
        """`weights` with none above their lower median (aggregation.capped_weights), counted."""
        capped, lowered = capped_weights(weights)
        if lowered:
            self.bounded_["weight_cap"] += lowered
        return capped

    def state(self) -> dict:
        # copies: a snapshot taken under the session's lock stays valid while it is written
        return {"deltas": list(self._deltas), "samples": list(self._samples), "row_agents": list(self._agents)}

    def restore(self, state: dict) -> None:
        deltas, samples, agents = _buffer_columns(state)
        if "fresh" in state:  # a --buffer-memory checkpoint: its fresh rows are the buffer
            keep = [i for i in state["fresh"] if isinstance(i, int) and 0 <= i < len(deltas)]
            deltas, samples, agents = ([c[i] for i in keep] for c in (deltas, samples, agents))
        if len(deltas) >= self.buffer_size:
            raise ValueError(f"buffer of {len(deltas)} updates does not fit a buffer size of {self.buffer_size}")
        self._deltas = [np.asarray(d, dtype=np.float64) for d in deltas]
        self._samples = [float(n) for n in samples]
        self._agents = [a if isinstance(a, str) else None for a in agents]


def _buffer_columns(state: dict) -> tuple[list, list, list]:
    """A checkpointed buffer's rows as (deltas, samples, agents), one entry each; ValueError if they differ in length."""
    deltas, samples = state.get("deltas", []), state.get("samples", [])
    agents = list(state.get("row_agents") or [None] * len(deltas))
    if not len(deltas) == len(samples) == len(agents):
        raise ValueError(f"a buffer of {len(deltas)} deltas, {len(samples)} sample counts and {len(agents)} agents "
                         "does not fit together")
    return deltas, samples, agents


class FedBuffMemory(FedBuff):
    """FedBuff that remembers each agent's newest update (Gu et al., 2021, MIFA): a step, due after K
    fresh updates, aggregates the newest row of every agent remembered, not only the K fresh ones.

    With K below the fleet the fastest agents fill every buffer, and a class held only by a slow
    device was washed out between its rare updates (docs/benchmarks.md section 16); remembered, its
    row takes part in every step until it sends a newer one. At most `memory` agents are held
    (the least recently heard is forgotten first): `memory` x the model's float64 size in RAM and
    in every checkpoint.
    """

    def __init__(self, buffer_size: int = 5, server_lr: float = 1.0, staleness: StalenessFn = Constant(),
                 aggregate: str = "mean", memory: int = 100) -> None:
        super().__init__(buffer_size, server_lr, staleness, aggregate)
        if memory < 1:
            raise ValueError(f"--buffer-memory must be >= 1, got {memory}")
        self.memory = memory
        self._rows: OrderedDict[object, tuple[np.ndarray, float]] = OrderedDict()  # agent -> (row, samples)
        self._fresh: set = set()  # agents whose row arrived since the last step
        self._anonymous = count()

    @property
    def pending(self) -> int:
        return len(self._fresh)

    def buffer(self) -> dict:
        return dict(super().buffer(), remembered=len(self._rows), memory=self.memory)

    def buffered_agents(self) -> set:
        return set(self._fresh)

    def add(self, params, delta, n_samples, staleness, base=None, agent=None):
        key = agent if agent is not None else ("anonymous", next(self._anonymous))
        if key in self._fresh:
            self.bounded_["repeat_agent"] += 1
        self._rows.pop(key, None)
        self._rows[key] = (self.staleness(staleness) * np.asarray(delta, dtype=np.float64), float(n_samples))
        self._fresh.add(key)
        while len(self._rows) > self.memory:
            self._fresh.discard(self._rows.popitem(last=False)[0])
        if len(self._fresh) < self.effective_size:
            return None
        return self.flush(params)

    def flush(self, params):
        if not self._fresh:
            return None
        rows = list(self._rows.values())
        self._fresh.clear()
        return self._stepped(params, [r for r, _ in rows], [n for _, n in rows])

    def state(self) -> dict:
        keys = list(self._rows)
        return {"deltas": [r for r, _ in self._rows.values()], "samples": [n for _, n in self._rows.values()],
                "row_agents": [k if isinstance(k, str) else None for k in keys],
                "fresh": [i for i, k in enumerate(keys) if k in self._fresh]}

    def restore(self, state: dict) -> None:
        deltas, samples, agents = _buffer_columns(state)
        fresh = set(state.get("fresh", []))
        if len(deltas) > self.memory:
            raise ValueError(f"a memory of {len(deltas)} rows does not fit --buffer-memory {self.memory}")
        if len(fresh) >= self.buffer_size or not fresh <= set(range(len(deltas))):
            raise ValueError(f"{len(fresh)} fresh rows do not fit a buffer size of {self.buffer_size}")
        self._rows = OrderedDict()
        self._fresh = set()
        for i, (d, n, a) in enumerate(zip(deltas, samples, agents)):
            key = a if isinstance(a, str) else ("anonymous", next(self._anonymous))
            self._rows[key] = (np.asarray(d, dtype=np.float64), float(n))
            if i in fresh:
                self._fresh.add(key)


class FedAvg(FedBuff):
    """Synchronous rounds (McMahan et al., 2017), the baseline async is measured against.

    Only updates computed from the current model count; a round closes after K of them.
    """

    name = "fedavg"

    def __init__(self, clients_per_round: int = 5, server_lr: float = 1.0, aggregate: str = "mean") -> None:
        super().__init__(buffer_size=clients_per_round, server_lr=server_lr, staleness=Constant(), aggregate=aggregate)

    def admit(self, staleness: int) -> str | None:
        return None if staleness == 0 else "stale_round"


def make_strategy(
    name: str,
    *,
    alpha: float = DEFAULT_ALPHA,
    staleness: StalenessFn = Constant(),
    buffer_size: int = 5,
    server_lr: float = 1.0,
    aggregate: str = "mean",
    memory: int = 0,
) -> Strategy:
    """Build a strategy by its CLI name (`memory` > 0: fedbuff remembers that many agents' newest rows)."""
    if memory and name != "fedbuff":
        raise ValueError("--buffer-memory needs --strategy fedbuff")
    if name == "fedasync":
        return FedAsync(alpha, staleness)
    if name == "fedbuff" and memory:
        return FedBuffMemory(buffer_size, server_lr, staleness, aggregate, memory)
    if name == "fedbuff":
        return FedBuff(buffer_size, server_lr, staleness, aggregate)
    if name == "fedavg":
        return FedAvg(buffer_size, server_lr, aggregate)
    raise ValueError(f"unknown strategy {name!r}: use fedasync, fedbuff or fedavg")
