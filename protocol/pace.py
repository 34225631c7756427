"""Pace steering: how often each device should train and report, carried by the model message.

As in Google's federated-learning system design (the server tells each device when to come
back), the coordinator divides a target fleet update rate among the agents online:
`steer(agents, target)` gives every device the report interval agents / target (bounded), so
the fleet's update rate, and with it the model downloads of devices that fetch a model once
per round, stays near the target however many devices join. A device draws each wait
uniformly in interval * [1 - jitter, 1 + jitter] (mean: the interval), so a fleet that
started together spreads out; its first round comes after a uniform fraction of one interval
(`first_wait`), so even the first reports do not arrive together. `bounded` is the device's side: whatever a model message says,
its interval and jitter stay within the device's own limits.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

DEFAULT_JITTER = 0.5  # each wait in interval * [0.5, 1.5]
MAX_JITTER = 0.9  # a wait is never shorter than a tenth of the interval
DEFAULT_MAX_INTERVAL = 600.0  # the longest report interval a device accepts (fedmq-agent --max-pace)


@dataclass(frozen=True)
class Pace:
    """One device's report interval (seconds, mean) and the spread of its waits around it (a fraction)."""

    interval: float
    jitter: float = DEFAULT_JITTER

    def to_wire(self) -> dict:
        return {"interval": float(self.interval), "jitter": float(self.jitter)}

    def wait(self, rng: random.Random) -> float:
        """One wait before the next report: uniform in interval * [1 - jitter, 1 + jitter]."""
        return self.interval * rng.uniform(1.0 - self.jitter, 1.0 + self.jitter)

    def first_wait(self, rng: random.Random) -> float:
        """Before a device's first paced round: uniform in [0, interval), so a fleet that starts (or comes
        back) together reports spread over one interval instead of all at once."""
        return self.interval * rng.random()


def steer(agents: int, target_updates_per_s: float, *, min_interval: float = 1.0,
          max_interval: float = DEFAULT_MAX_INTERVAL, jitter: float = DEFAULT_JITTER) -> Pace:
    """The pace that makes `agents` devices report `target_updates_per_s` updates a second in all:
    interval agents / target, within [min_interval, max_interval] (no agents known: min_interval)."""
    if not target_updates_per_s > 0 or not 0 < min_interval <= max_interval or not 0 <= jitter <= MAX_JITTER:
        raise ValueError(f"pace needs target > 0, 0 < min <= max interval and jitter in [0, {MAX_JITTER}]: got "
                         f"target {target_updates_per_s}, interval [{min_interval}, {max_interval}], jitter {jitter}")
    return Pace(min(max_interval, max(min_interval, max(0, agents) / target_updates_per_s)), jitter)


@dataclass(frozen=True)
class Steering:
    """A coordinator's pace settings (fedmq-coordinator --target-updates-per-s and the --pace-* bounds)."""

    target_updates_per_s: float
    min_interval: float = 1.0
    max_interval: float = DEFAULT_MAX_INTERVAL
    jitter: float = DEFAULT_JITTER

    def __post_init__(self) -> None:
        self.pace(0)  # ValueError now, at configuration, for impossible settings

    def pace(self, agents: int) -> Pace:
        """The pace for `agents` devices online."""
        return steer(agents, self.target_updates_per_s, min_interval=self.min_interval,
                     max_interval=self.max_interval, jitter=self.jitter)


def from_wire(wire: object) -> Pace:
    """A model message's pace as sent: a map of two finite numbers (ValueError otherwise); `bounded` clamps it."""
    if not isinstance(wire, dict) or set(wire) - {"interval", "jitter"} or "interval" not in wire:
        raise ValueError("pace must be a map {interval, jitter}")
    values = [wire["interval"], wire.get("jitter", DEFAULT_JITTER)]
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) for v in values):
        raise ValueError("pace interval and jitter must be finite numbers")
    return Pace(float(values[0]), float(values[1]))


def bounded(pace: Pace | None, max_interval: float = DEFAULT_MAX_INTERVAL) -> Pace | None:
    """The device's limits on what a model message asks: interval in [0, max_interval], jitter in
    [0, MAX_JITTER]; None (no pace) stays None, and so does an interval of 0 (no steering) or a
    `max_interval` of 0 (this device ignores pace)."""
    if pace is None or pace.interval <= 0 or max_interval <= 0:
        return None
    return Pace(min(pace.interval, max_interval), min(max(pace.jitter, 0.0), MAX_JITTER))
