"""Which agents are online, from their retained statuses and last wills (``agent/<id>/status``).

An agent publishes its state retained (online, training, idle, error, budget_spent) and
leaves a last will saying offline, so the broker tells the coordinator who can still send
updates. fedbuff/fedavg size their buffer by it (K = min(K, live agents), see
`FedBuff.resize`): a fleet smaller than K steps on every live agent's update instead of once
per --buffer-timeout.
"""

from __future__ import annotations

import json
from collections import Counter

from protocol.agent_states import IDLE, ONLINE, TRAINING
from protocol.topics import Topics

# States of an agent that will send updates (protocol/agent_states.py); error, budget_spent and offline will not.
LIVE_STATES = frozenset({ONLINE, TRAINING, IDLE})
MAX_STATUS_BYTES = 16 * 1024  # an agent's status is a few hundred bytes; anything larger is refused unread
MAX_AGENTS = 100_000  # agents tracked: a bound on memory against a flood of ids


def status_state(payload: bytes) -> str | None:
    """The `state` an agent's status names (an empty payload, a status cleared: offline); None if unreadable."""
    try:
        state = json.loads(payload).get("state") if payload else "offline"
    except (ValueError, AttributeError, RecursionError):
        return None
    return state if isinstance(state, str) else None


class Presence:
    """The agents whose newest status says they train, counted; refused statuses counted by reason."""

    def __init__(self, topics: Topics, max_agents: int = MAX_AGENTS) -> None:
        self.topics = topics
        self.max_agents = max_agents
        self.live: set[str] = set()
        self.refused_: Counter[str] = Counter()

    def handle(self, topic: str, payload: bytes) -> str | None:
        """Take one status (empty: cleared); None if used, else the refusal reason (counted)."""
        agent = self.topics.agent_of_status(topic)
        reason = None
        if agent is None:
            reason = "status_topic"
        elif len(payload) > MAX_STATUS_BYTES:
            reason = "status_oversize"
        else:
            state = status_state(payload)
            if state is None:  # undecodable, or a list or map (unhashable: the set lookup would raise)
                reason = "status_decode"
            if state in LIVE_STATES and (agent in self.live or len(self.live) < self.max_agents):
                self.live.add(agent)
            else:
                self.live.discard(agent)  # offline, error, budget_spent, or a status we cannot read
        if reason is not None:
            self.refused_[reason] += 1
        return reason

    @property
    def count(self) -> int:
        """Agents online that will send updates."""
        return len(self.live)
