"""Per-agent update rate limit: a token bucket per agent id, bounded in memory.

Under fedasync every accepted update moves the global model by `alpha`, so an agent that
floods updates (compromised, or a bug in a loop) would own the model even if each update
passes the norm bound. The limit is checked before decoding, so a flood costs the
coordinator almost nothing.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable


class RateLimit:
    """At most `per_minute` updates per agent per minute on average, in bursts of up to `per_minute`."""

    def __init__(self, per_minute: float, *, max_agents: int = 100_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not per_minute > 0:
            raise ValueError(f"--max-agent-rate must be > 0 updates per minute, got {per_minute}")
        self.capacity = float(per_minute)
        self.refill_per_s = per_minute / 60.0
        self.max_agents = max_agents
        self.clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # agent -> (tokens, at)

    def allow(self, agent: str) -> bool:
        """Take one token from `agent`'s bucket; False when it is empty."""
        now = self.clock()
        tokens, at = self._buckets.pop(agent, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - at) * self.refill_per_s)
        allowed = tokens >= 1.0
        self._buckets[agent] = (tokens - 1.0 if allowed else tokens, now)
        while len(self._buckets) > self.max_agents:  # the least recently seen agent forgets its debt
            self._buckets.popitem(last=False)
        return allowed
