"""When the coordinator publishes a changed model: when it matters, not on a clock (issue 23 point 5).

Every publish is a download for every listening device, so a model is worth sending when a
step moved it enough since the last one sent, or when agents wait for it: their update was
folded into the model and they hold nothing newer to train on (FedAsync sends one update per
model received; a FedBuff buffer that stepped leaves its K contributors waiting). A floor
between publishes bounds the downlink whatever the fleet does, and a ceiling keeps the old
coalescing clock for everything else (stragglers' small steps). Pure: the caller counts.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import numpy as np

CLOCK, CHANGE = "clock", "change"
POLICIES = (CHANGE, CLOCK)


@dataclass(frozen=True)
class PublishPolicy:
    """`kind` clock: publish a changed model once `max_interval` passed (the old behaviour).
    `kind` change: also at once, but never within `min_interval` of the last publish, when the
    parameters moved by `min_change` (relative L2) since it, or when `waiting_share` of the
    active agents wait for a newer model. The floor is at most the ceiling."""

    max_interval: float = 1.0  # --publish-interval: a changed model waits no longer than this
    min_interval: float = 0.05  # --publish-min-interval: the floor between two publishes
    min_change: float = 0.05  # --publish-min-change
    waiting_share: float = 0.5  # --publish-waiting-share
    kind: str = CHANGE  # --publish-policy

    def __post_init__(self) -> None:
        if self.kind not in POLICIES:
            raise ValueError(f"unknown publish policy {self.kind!r}: use {' or '.join(POLICIES)}")
        if not (self.max_interval >= 0 and self.min_interval >= 0):  # NaN too
            raise ValueError("--publish-interval and --publish-min-interval must be >= 0")
        if not self.min_change > 0:
            raise ValueError("--publish-min-change must be > 0")
        if not 0 < self.waiting_share <= 1:
            raise ValueError("--publish-waiting-share must be in (0, 1]")


def relative_change(new: np.ndarray, published: np.ndarray | None) -> float:
    """||new - published|| / ||published||: how far a step moved the model from the one devices
    hold (inf when nothing was published or it was all zeros and the model moved)."""
    if published is None:
        return math.inf
    moved = float(np.linalg.norm(new - published))
    held = float(np.linalg.norm(published))
    if held == 0.0:
        return math.inf if moved > 0.0 else 0.0
    return moved / held


def floor(policy: PublishPolicy) -> float:
    """The fewest seconds between two publishes under `policy`."""
    return min(policy.min_interval, policy.max_interval) if policy.kind == CHANGE else policy.max_interval


def publish_due(policy: PublishPolicy, *, since_last: float, changed: bool, change: float = 0.0,
                waiting: int = 0, active: int = 0) -> bool:
    """Publish now? `since_last`: seconds since the last publish; `changed`: the model differs
    from it; `change`: its relative_change; `waiting` of `active` agents wait (AgentsWaiting)."""
    if not changed or since_last < floor(policy):
        return False
    if policy.kind == CLOCK or since_last >= policy.max_interval or change >= policy.min_change:
        return True
    return waiting > 0 and waiting >= math.ceil(policy.waiting_share * active)


class AgentsWaiting:
    """Which agents wait for a newer model, from the base version of each agent's newest folded update.

    An agent waits when that base is the published version (it trained on what it holds); it is
    active when the base is the published version or the one before (it answered lately), so a
    device that went silent stops counting after two publishes. O(1) per update.
    """

    def __init__(self) -> None:
        self.base: dict[str, int] = {}  # agent -> base version of its newest folded update
        self.by_base: Counter[int] = Counter()
        self.published = -1  # the version devices hold now
        self.previous = -1  # the version published before it

    def folded(self, agent: str, base_version: int) -> None:
        """An update of `agent` trained on `base_version` was folded in."""
        old = self.base.get(agent)
        if old is not None:
            self.by_base[old] -= 1
            if not self.by_base[old]:
                del self.by_base[old]
        self.base[agent] = base_version
        self.by_base[base_version] += 1

    def publishing(self, version: int) -> None:
        """`version` goes out now."""
        if version != self.published:
            self.previous, self.published = self.published, version

    @property
    def waiting(self) -> int:
        return self.by_base.get(self.published, 0)

    @property
    def active(self) -> int:
        return self.waiting + (self.by_base.get(self.previous, 0) if self.previous >= 0 else 0)
