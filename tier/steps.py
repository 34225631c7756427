"""The root's rules: how folded partial aggregates step the global model.

Pure functions of (params, buffered sums); one small class per rule behind one interface, like
coordinator/strategies.py. A partial's sum is already staleness-weighted per update by its
partition worker, so the root's FedBuff step over the union of partials is the single
coordinator's FedBuff (sample-weighted mean) over the same updates. FedAsync does not partition
exactly: at scale it is a mix per partial (a small per-partition buffer), as PAPAYA/FedBuff do.
"""

from __future__ import annotations

import numpy as np

from coordinator.strategies import DEFAULT_ALPHA


class RootRule:
    name: str

    def __init__(self, n_params: int) -> None:
        self.n_params = n_params
        self.weighted_sum = np.zeros(n_params)
        self.weight = 0.0
        self.count = 0

    def add(self, weighted_sum: np.ndarray, weight: float, count: int) -> None:
        self.weighted_sum += weighted_sum
        self.weight += weight
        self.count += count

    def ready(self) -> bool:
        """The buffer holds enough to step now."""
        raise NotImplementedError

    def step(self, params: np.ndarray) -> np.ndarray:
        """The new parameters from the buffer (which is emptied)."""
        raise NotImplementedError

    def _take_mean(self) -> np.ndarray:
        mean = self.weighted_sum / self.weight if self.weight > 0 else np.zeros(self.n_params)
        self.weighted_sum = np.zeros(self.n_params)
        self.weight = 0.0
        self.count = 0
        return mean

    def state(self) -> dict:
        return {"sum": np.ascontiguousarray(self.weighted_sum, dtype="<f8").tobytes(), "weight": self.weight,
                "count": self.count}

    def restore(self, state: dict) -> None:
        total = np.frombuffer(state["sum"], dtype="<f8").copy()
        if total.shape != (self.n_params,):
            raise ValueError("checkpointed root buffer has the wrong length")
        self.weighted_sum, self.weight, self.count = total, float(state["weight"]), int(state["count"])


class RootFedBuff(RootRule):
    """x <- x + eta * sum(n_i w(s_i) delta_i) / sum(n_i) once K updates are buffered."""

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
