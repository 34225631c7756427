"""The root's rules: how folded partial aggregates step the global model.

Pure functions of (params, buffered sums); one small class per rule behind one interface, like
coordinator/strategies.py. A partial's sum is already staleness-weighted per update by its
partition worker, so the root's FedBuff step over the union of partials is the single
coordinator's FedBuff (sample-weighted mean) over the same updates. FedAsync does not partition
exactly: at scale it is a mix per partial (a small per-partition buffer), as PAPAYA/FedBuff do.

A partial's weight is a claim: the sum of its updates' claimed sample counts (no agent's above its
partial's lower median, tier/partial.py). A partial says each update's weight (`rows`, checked against
its weight by the decoder) and agent (`covers`), so the root bounds them as the single coordinator bounds
a buffer's rows, per agent (issue 18 point 3: the fedbuff mean is bounded per agent per buffer): K counts
the agents in the buffer, not updates, and no agent's updates together weigh more than the lower median
of the agents' weights (coordinator.aggregation.agent_capped_weights). A fast agent's updates land in
many partials of one buffer; each weighs its share of that agent's one weight. The coordinator keeps an
agent's newest row where the root can only scale the sums it holds: a partial is scaled as a whole (exact
for a partial of one agent's updates; capped_sum says how one shared with other agents is).
"""

from __future__ import annotations

import numpy as np

from coordinator.aggregation import agent_capped_weights, agent_index
from coordinator.strategies import DEFAULT_ALPHA
from tier.heard import effective_k


def capped_sum(sums: list[np.ndarray], rows: list[np.ndarray], agents: list[list], n_params: int
               ) -> tuple[np.ndarray, np.ndarray, int]:
    """The buffered partials' sum with no agent weighing more than the lower median of the agents' weights
    (agent_capped_weights over every partial's rows, `agents[i]` naming partial i's), the rows as weighed (their
    sum: the buffer's weight), and how many updates were lowered. A partial is one sum, scaled as a whole: one
    holding a capped agent that is in no other partial by its capped rows' weight over its own (the partition's
    mix kept); an agent in several partials to its bound at most, its partials of its own updates alone lowered
    first, those it shares with others only when they alone exceed its bound (the others in them lowered with it).
    Vectorized: O(rows log rows) per call (the root's checkpoint calls it at every commit)."""
    every = np.concatenate(rows) if rows else np.zeros(0)
    who = [a for names in agents for a in names]
    capped, lowered = agent_capped_weights(every, who)
    if not lowered:
        return (np.sum(sums, axis=0) if sums else np.zeros(n_params)), every, 0
    index = agent_index(who)
    part = np.repeat(np.arange(len(rows)), [len(r) for r in rows])
    pair, at = np.unique(index * len(rows) + part, return_inverse=True)  # each (agent, partial) once
    pair_agent, pair_part = pair // len(rows), pair % len(rows)
    spread = np.bincount(pair_agent, minlength=index.max() + 1)  # partials per agent
    alone = np.bincount(pair_part, minlength=len(rows)) <= 1  # partials of one agent's updates
    over = capped < every
    factor = np.ones(len(rows))
    mixed = np.unique(part[over & (spread[index] == 1)])
    factor[mixed] = np.bincount(part, weights=capped, minlength=len(rows))[mixed] / \
        np.bincount(part, weights=every, minlength=len(rows))[mixed]
    # an agent in several partials, over its bound: each proposes factors for its partials, and a partial takes the
    # smallest proposed (so each agent weighs at most what its own proposal gives it)
    repeat = np.zeros(len(spread), dtype=bool)
    repeat[index[over & (spread[index] > 1)]] = True
    weight = np.bincount(at, weights=every, minlength=len(pair)) * factor[pair_part]  # per (agent, partial)
    shared = np.bincount(pair_agent, weights=np.where(alone[pair_part], 0.0, weight), minlength=len(spread))
    own = np.bincount(pair_agent, weights=np.where(alone[pair_part], weight, 0.0), minlength=len(spread))
    bound = np.bincount(index, weights=capped, minlength=len(spread))
    acts = repeat & (shared + own > bound)  # within its bound already (a partial it shares was lowered): nothing
    fits = shared <= bound  # its own partials carry what is left of its bound, else they weigh 0 and its shared ones
    own_factor = np.where(acts, np.where(fits, (bound - shared) / np.where(own > 0, own, 1.0), 0.0), 1.0)
    shared_factor = np.where(acts & ~fits, bound / np.where(shared > 0, shared, 1.0), 1.0)
    proposed = np.ones(len(rows))
    np.minimum.at(proposed, pair_part, np.where(alone[pair_part], own_factor[pair_agent], shared_factor[pair_agent]))
    factor *= proposed
    weighed = every * factor[part]
    total = np.tensordot(factor, np.stack(sums), axes=1)
    return total, weighed, int((weighed < every * (1 - 1e-12)).sum())


class RootRule:
    name: str

    def __init__(self, n_params: int) -> None:
        self.n_params = n_params
        self.weight_capped = 0  # updates whose weight the buffer's cap lowered (the status's bounded.weight_cap)
        self.repeat_agent = 0  # updates of an agent already in the buffer (the status's bounded.repeat_agent)
        self._clear()

    def _clear(self) -> None:
        self._sums: list[np.ndarray] = []
        self._rows: list[np.ndarray] = []  # each partial's per-update weights
        self._agents: list[list] = []  # each partial's per-update agents (None: unknown, an agent of its own)
        self._members: set[str] = set()
        self.updates = 0
        self.count = 0  # agents in the buffer: K of them step it, however many updates each sent

    def add(self, weighted_sum: np.ndarray, weight: float, count: int, rows=None, agents=None) -> None:
        """One partial; `rows`: its updates' weights (None, from a worker that did not send them: its weight
        evenly over its `count` updates); `agents`: each update's agent (None: each an agent of its own)."""
        if rows is None:
            rows = np.full(count, weight / count) if count else np.zeros(0)
        names = list(agents) if agents is not None else [None] * len(rows)
        if len(names) != len(rows):
            raise ValueError(f"a partial of {len(rows)} update weights names {len(names)} agents")
        for agent in names:
            if agent is None:
                self.count += 1
            elif agent in self._members:
                self.repeat_agent += 1
            else:
                self._members.add(agent)
                self.count += 1
        self._sums.append(np.asarray(weighted_sum, dtype=np.float64))
        self._rows.append(np.asarray(rows, dtype=np.float64))
        self._agents.append(names)
        self.updates += len(names)

    def ready(self) -> bool:
        """The buffer holds enough to step now."""
        raise NotImplementedError

    def resize(self, live: int | None) -> None:
        """The agents the root heard from recently (tier/heard.py; None: not known yet): fedbuff's K shrinks to them."""

    def buffer(self) -> dict | None:
        """For the status: K as configured and as it is now (fedbuff), else None."""
        return None

    def step(self, params: np.ndarray) -> np.ndarray:
        """The new parameters from the buffer (which is emptied)."""
        raise NotImplementedError

    def _take_mean(self) -> np.ndarray:
        total, rows, lowered = capped_sum(self._sums, self._rows, self._agents, self.n_params)
        self.weight_capped += lowered
        self._clear()
        weight = float(rows.sum())
        return total / weight if weight > 0 else np.zeros(self.n_params)

    def state(self) -> dict:
        """The buffer as one partial of its rows as weighed now, with their agents: a checkpoint the size of one
        partial, whatever the buffer holds; after a takeover it is bounded again with the partials that follow,
        as a whole."""
        total, weighed, _ = capped_sum(self._sums, self._rows, self._agents, self.n_params)
        return {"sum": np.ascontiguousarray(total, dtype="<f8").tobytes(), "weight": float(weighed.sum()),
                "count": self.updates, "rows": np.ascontiguousarray(weighed, dtype="<f8").tobytes(),
                "agents": [a for names in self._agents for a in names],
                "weight_capped": self.weight_capped, "repeat_agent": self.repeat_agent}

    def restore(self, state: dict) -> None:
        total = np.frombuffer(state["sum"], dtype="<f8").copy()
        if total.shape != (self.n_params,):
            raise ValueError("checkpointed root buffer has the wrong length")
        rows = np.frombuffer(state["rows"], dtype="<f8").copy() if state.get("rows") is not None else None
        agents = state.get("agents")  # None from a checkpoint before them: each update an agent of its own
        self._clear()
        self.weight_capped = int(state.get("weight_capped", 0))
        if int(state["count"]) or float(state["weight"]):
            self.add(total, float(state["weight"]), int(state["count"]), rows,
                     None if agents is None else [a if a is None else str(a) for a in agents])
        self.repeat_agent = int(state.get("repeat_agent", 0))  # counted when they were folded


class RootFedBuff(RootRule):
    """x <- x + eta * sum(n_i w(s_i) delta_i) / sum(n_i) once K agents are buffered (K shrunk to the
    agents heard recently, tier/heard.py), no agent's n_i above the lower median agent's (the single coordinator's
    FedBuff)."""

    name = "fedbuff"

    def __init__(self, n_params: int, buffer_size: int = 5, server_lr: float = 1.0) -> None:
        super().__init__(n_params)
        if buffer_size < 1 or server_lr <= 0:
            raise ValueError("fedbuff needs a buffer size >= 1 and a server learning rate > 0")
        self.buffer_size = buffer_size
        self.server_lr = server_lr
        self.effective = buffer_size  # K = max(1, min(K, agents heard recently)): a fleet smaller than K still steps
        self.live: int | None = None

    def resize(self, live: int | None) -> None:
        self.live, self.effective = live, effective_k(self.buffer_size, live)

    def buffer(self) -> dict:
        return {"size": self.buffer_size, "effective": self.effective, "heard_agents": self.live}

    def ready(self) -> bool:
        return self.count >= self.effective

    def step(self, params):
        return params + self.server_lr * self._take_mean()


class RootFedAsync(RootRule):
    """x <- x + alpha * (mean staleness-weighted delta of one flush): FedAsync in delta form."""

    name = "fedasync"

    def __init__(self, n_params: int, alpha: float = DEFAULT_ALPHA) -> None:
        super().__init__(n_params)
        if not 0 < alpha <= 1:
            raise ValueError(f"fedasync alpha must be in (0, 1], got {alpha}")
        self.alpha = alpha

    def ready(self) -> bool:
        return self.count > 0

    def step(self, params):
        return params + self.alpha * self._take_mean()


def make_rule(name: str, n_params: int, *, buffer_size: int = 5, server_lr: float = 1.0,
              alpha: float = DEFAULT_ALPHA) -> RootRule:
    if name == "fedbuff":
        return RootFedBuff(n_params, buffer_size, server_lr)
    if name == "fedasync":
        return RootFedAsync(n_params, alpha)
    raise ValueError(f"unknown root strategy {name!r}: use fedbuff or fedasync")
