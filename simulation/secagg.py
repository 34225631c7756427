"""Secure-aggregation rounds in one process: real `SecAggClient`s and `SecAggRounds` exchanging
the exact payloads MQTT would carry, with drop-outs at any stage, bytes and CPU counted per agent.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from coordinator.secagg import Result, SecAggRounds
from edge_agent.secagg import SecAggClient

STAGES = ("shares", "masked", "reveal")  # drop an agent before it sends that message


@dataclass
class RoundCosts:
    """What one round cost: bytes sent and received and CPU seconds per agent, the coordinator's CPU."""

    sent: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    received: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    cpu: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    coordinator_cpu: float = 0.0
    wall: float = 0.0


def run_round(
    rounds: SecAggRounds, clients: dict[str, SecAggClient], deltas: dict[str, np.ndarray], *,
    version: int = 0, drop: dict[str, str] | None = None, now: float = 0.0,
) -> tuple[Result | None, RoundCosts]:
    """Hold `deltas`, then run one round to its end; `drop` {agent: stage} vanishes an agent before
    it sends that stage's message. Returns the completed round's result (None if it aborted)."""
    drop = drop or {}
    costs = RoundCosts()
    clock = [now]
    start = time.perf_counter()

    def agent_call(agent: str, fn, *args):
        t0 = time.process_time()
        out = fn(*args)
        costs.cpu[agent] += time.process_time() - t0
        return out

    def to_coordinator(agent: str, messages) -> None:
        for topic, payload, _ in messages:
            kind = rounds.topics.secagg_of(topic)[0]
            if agent in drop and drop[agent] == {"share": "shares", "masked": "masked", "reveal": "reveal"}.get(kind):
                continue  # vanished before sending it
            costs.sent[agent] += len(payload)
            t0 = time.process_time()
            rounds.handle(topic, payload, clock[0])
            costs.coordinator_cpu += time.process_time() - t0

    announced = []
    for agent, delta in deltas.items():
        message = agent_call(agent, clients[agent].hold, delta, version)
        to_coordinator(agent, [message])
        announced.append(message)
    for peer, client in clients.items():  # the retained announcements reach every agent too (one clock read
        costs.received[peer] += sum(len(m[1]) for m in announced)  # per agent: process_time is not free)
        agent_call(peer, lambda c=client: [c.on_message(t, p) for t, p, _ in announced])
    for _ in range(8):  # at most cohort, inbox, unmask, and a timeout per stage
        t0 = time.process_time()
        result = rounds.tick(clock[0])
        out = rounds.take_outbox()
        costs.coordinator_cpu += time.process_time() - t0
        if result is not None:
            costs.wall = time.perf_counter() - start
            return result, costs
        if not out:
            if rounds.round is None:
                break
            clock[0] += rounds.timeout  # nobody answers any more: let the stage time out
            continue
        for topic, payload, _ in out:
            for agent, client in clients.items():
                if not client.owns(topic) or agent in drop and _gone(drop[agent], topic, rounds):
                    continue
                costs.received[agent] += len(payload)
                to_coordinator(agent, agent_call(agent, client.on_message, topic, payload))
    costs.wall = time.perf_counter() - start
    return None, costs


def announce(rounds: SecAggRounds, clients: dict[str, SecAggClient], message: tuple[str, bytes, bool],
             now: float = 0.0) -> None:
    """Deliver a key announcement as the broker does: to the coordinator and to every agent."""
    topic, payload, _ = message
    rounds.handle(topic, payload, now)
    for client in clients.values():
        client.on_message(topic, payload)


def _gone(stage: str, topic: str, rounds: SecAggRounds) -> bool:
    """A vanished agent reads nothing after the stage it vanished before."""
    t = rounds.topics
    order = {t.secagg_cohort: 0, t.secagg_unmask: 2}
    at = order.get(topic, 1)  # an inbox comes in stage 1
    return at >= STAGES.index(stage)
