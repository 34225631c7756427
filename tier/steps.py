"""The root's rules: how folded partial aggregates step the global model.

Pure functions of (params, buffered sums); one small class per rule behind one interface, like
coordinator/strategies.py. A partial's sum is already staleness-weighted per update by its
partition worker, so the root's FedBuff step over the union of partials is the single
coordinator's FedBuff (sample-weighted mean) over the same updates. FedAsync does not partition
exactly: at scale it is a mix per partial (a small per-partition buffer), as PAPAYA/FedBuff do.

A partial's weight is a claim: the sum of its updates' claimed sample counts (each already at most its
partial's lower median, tier/partial.py). A partial says each update's weight (`rows`, checked against
its weight by the decoder), so the root bounds them as the single coordinator bounds a buffer's rows:
no update weighs more than the lower median of every update in the root's buffer
(coordinator.aggregation.capped_weights, issue 18 point 3); a partial is scaled by its capped rows'
weight over its own (exact for a partial of one update; of several, their mix keeps the partition's).
"""

from __future__ import annotations

import numpy as np

from coordinator.aggregation import capped_weights
from coordinator.strategies import DEFAULT_ALPHA


def capped_sum(sums: list[np.ndarray], rows: list[np.ndarray], n_params: int) -> tuple[np.ndarray, np.ndarray, int]:
    """The buffered partials' sum with no update weighing more than the lower median of all their rows
    (capped_weights), those capped rows (their sum: the buffer's weight), and how many were lowered. Partial i
    is scaled by its capped rows' sum over its own."""
    every = np.concatenate(rows) if rows else np.zeros(0)
    capped, lowered = capped_weights(every)
    if not lowered:
        return (np.sum(sums, axis=0) if sums else np.zeros(n_params)), every, 0
    total, start = np.zeros(n_params), 0
    for s, r in zip(sums, rows):
        kept, start = float(capped[start:start + len(r)].sum()), start + len(r)
        if r.sum() > 0:
            total += s * (kept / float(r.sum()))
    return total, capped, lowered


class RootRule:
    name: str

    def __init__(self, n_params: int) -> None:
        self.n_params = n_params
        self.weight_capped = 0  # updates whose weight the buffer's cap lowered (the status's bounded.weight_cap)
        self._clear()

    def _clear(self) -> None:
        self._sums: list[np.ndarray] = []
        self._rows: list[np.ndarray] = []  # each partial's per-update weights
        self.count = 0

    def add(self, weighted_sum: np.ndarray, weight: float, count: int, rows=None) -> None:
        """One partial; `rows`: its updates' weights (None, from a worker that did not send them: its weight
        evenly over its `count` updates)."""
        if rows is None:
            rows = np.full(count, weight / count) if count else np.zeros(0)
        self._sums.append(np.asarray(weighted_sum, dtype=np.float64))
        self._rows.append(np.asarray(rows, dtype=np.float64))
        self.count += count

    def ready(self) -> bool:
        """The buffer holds enough to step now."""
        raise NotImplementedError

    def step(self, params: np.ndarray) -> np.ndarray:
        """The new parameters from the buffer (which is emptied)."""
        raise NotImplementedError

    def _take_mean(self) -> np.ndarray:
        total, rows, lowered = capped_sum(self._sums, self._rows, self.n_params)
        self.weight_capped += lowered
        self._clear()
        weight = float(rows.sum())
        return total / weight if weight > 0 else np.zeros(self.n_params)

    def state(self) -> dict:
        """The buffer as one partial of its capped rows (as of now): a checkpoint the size of one partial, whatever
        the buffer holds; after a takeover it is bounded again with the partials that follow, as a whole."""
        total, capped, _ = capped_sum(self._sums, self._rows, self.n_params)
        return {"sum": np.ascontiguousarray(total, dtype="<f8").tobytes(), "weight": float(capped.sum()),
                "count": self.count, "rows": np.ascontiguousarray(capped, dtype="<f8").tobytes(),
                "weight_capped": self.weight_capped}

    def restore(self, state: dict) -> None:
        total = np.frombuffer(state["sum"], dtype="<f8").copy()
        if total.shape != (self.n_params,):
            raise ValueError("checkpointed root buffer has the wrong length")
        rows = np.frombuffer(state["rows"], dtype="<f8").copy() if state.get("rows") is not None else None
        self._clear()
        self.weight_capped = int(state.get("weight_capped", 0))
        if int(state["count"]) or float(state["weight"]):
            self.add(total, float(state["weight"]), int(state["count"]), rows)


class RootFedBuff(RootRule):
    """x <- x + eta * sum(n_i w(s_i) delta_i) / sum(n_i) once K updates are buffered, no n_i above the lower
    median of the buffer's (the single coordinator's FedBuff)."""

    name = "fedbuff"

    def __init__(self, n_params: int, buffer_size: int = 5, server_lr: float = 1.0) -> None:
        super().__init__(n_params)
        if buffer_size < 1 or server_lr <= 0:
            raise ValueError("fedbuff needs a buffer size >= 1 and a server learning rate > 0")
        self.buffer_size = buffer_size
        self.server_lr = server_lr

    def ready(self) -> bool:
        return self.count >= self.buffer_size

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
