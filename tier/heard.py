"""The agents the root heard from recently: its fedbuff buffer of K shrinks to them (issue 18 point 5 on the tier).

K_eff = max(1, min(K, agents named in partials the root folded within the last `window` seconds)), the single
coordinator's K = min(K, live agents) (coordinator/presence.py) counted from what the root reads anyway. Why partials
and not the agents' retained statuses: every root already drains every partial, where a status subscription would
send every device's status changes to one process (the per-device traffic the tier keeps off the root); a partial's
`covers` are updates a partition accepted (under the tier's authorization a device publishes as itself only), a
status only a claim; and they count the agents that fill a buffer, not the ones that say they are online.

Bounded: only the `cap` most recently heard agents are kept (cap = K), which is exact for min(K, heard): if K or
more were heard within the window, the K newest all were; if fewer, all of them are among the K newest. A flood of
ids therefore costs K entries and can only raise K_eff to K, never lower it: an agent adds itself (one) to the
count and removes no other, so 4 honest agents and 1 repeating hostile one count 5, and a lone agent steps alone
only when it is the only one heard. Until a root of the fleet has listened for a whole window K stays K (what it
heard is a lower bound only: a fresh root would otherwise step on its first agent alone). The entries and when
listening began go into the root's checkpoint, so a standby taking over carries on without a new warm-up; a
checkpoint older than a window starts listening again (they could be rebuilt from new partials, at the cost of one
window at K). Times are wall-clock, so that they mean the same on the next root (its clock off by much less than a
window, as NTP keeps it).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable


def effective_k(k: int, live: int | None) -> int:
    """The buffer size now: K while the agents heard are unknown (None), else max(1, min(K, live))."""
    return k if live is None else max(1, min(k, int(live)))


class Heard:
    """Agent ids with the wall-clock time the root last folded a partial of theirs, the `cap` newest at most."""

    def __init__(self, window: float, cap: int, now: float) -> None:
        self.window = float(window)  # <= 0: never shrink K
        self.cap = max(1, int(cap))
        self.since = now  # when listening began (a fresh fleet's root, or one whose checkpoint had expired)
        self._last: OrderedDict[str, float] = OrderedDict()  # oldest first

    def note(self, agents: Iterable, now: float) -> None:
        """The agents of one folded partial (None: an agent without a name, not counted)."""
        for agent in agents:
            if agent is None:
                continue
            self._last[agent] = now
            self._last.move_to_end(agent)
            if len(self._last) > self.cap:
                self._last.popitem(last=False)

    def live(self, now: float) -> int | None:
        """Agents heard within the window; None before a whole window was listened to (or with no window)."""
        if self.window <= 0 or now - self.since < self.window:
            return None
        return sum(1 for t in self._last.values() if now - t <= self.window)

    def state(self, now: float) -> dict:
        return {"since": self.since, "at": now, "agents": dict(self._last)}

    def restore(self, state: dict | None, now: float) -> None:
        """A checkpoint's entries (None, or older than the window: listening begins again now)."""
        self._last.clear()
        self.since = now
        if not isinstance(state, dict) or now - float(state.get("at", 0)) > self.window:
            return
        self.since = float(state["since"])
        for agent, t in sorted(dict(state.get("agents") or {}).items(), key=lambda item: item[1]):
            self.note([str(agent)], float(t))
