"""Real agents and the real coordinator core exchanging real payloads in one process, no broker.

Benchmarks and tests that must isolate one factor (a codec, an attack, an aggregate) use
this loop: the bytes are exactly what would travel over MQTT, but the schedule is a
seeded random choice of agent per step (`drive`), or seeded agent speeds on a publish clock
(`drive_clocked`), so runs are deterministic and fast.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from coordinator.server import Coordinator
from coordinator.strategies import Strategy
from coordinator.validation import UpdateValidator
from edge_agent.agent import Agent
from edge_agent.data import ArraySource
from edge_agent.trainer import LocalTrainer
from protocol.model_spec import ModelSpec
from protocol.topics import Topics
from simulation.datasets import Dataset
from simulation.partition import partition


@dataclass
class Step:
    """One update as it went over the (absent) wire and what the coordinator made of it."""

    agent: Agent
    payload: bytes
    reason: str | None  # None when accepted
    scores: dict[str, float] | None = None  # test scores of the model published right after, if one was


def make_core(ds: Dataset, topics: Topics, strategy: Strategy, **validator_options) -> Coordinator:
    """The coordinator core for `ds`, scoring on its test split; options go to UpdateValidator."""
    spec = ModelSpec(ds.model, ds.n_features, ds.classes)
    validator = UpdateValidator(topics, spec.n_params, **validator_options)
    return Coordinator(topics, spec, strategy, validator, eval_data=(ds.X_test, ds.y_test))


def make_agents(
    ds: Dataset, topics: Topics, n: int, scheme: str, codec: str, *, seed: int,
    trainer: Callable[[int], LocalTrainer] | None = None,
) -> list[Agent]:
    """`n` agents `a0..` on a `scheme` partition of the train split; `trainer(i)` overrides agent i's."""
    parts = partition(ds.y_train, n, scheme, seed=seed)
    make_trainer = trainer or (lambda i: LocalTrainer(random_state=seed + i))
    return [Agent(f"a{i}", topics, ArraySource(ds.X_train[p], ds.y_train[p]), make_trainer(i), codec, seed=seed + i)
            for i, p in enumerate(parts)]


def drive(core: Coordinator, fleet: Sequence[Agent], *, updates: int, seed: int, publish_every: int) -> Iterator[Step]:
    """`updates` rounds of a randomly chosen agent training on the newest published model.

    The model is republished (and scored) every `publish_every` updates, as coalescing
    would, and once more at the end so `core.scores_` holds the final model's test scores.
    """
    rng = np.random.default_rng(seed)
    model = core.model_payload()
    for step in range(updates):
        agent = fleet[rng.integers(len(fleet))]
        agent.on_model(model)
        agent.trained_version_ = -1  # train again even on a model it has seen
        agent.due()  # reads its data the first time
        payload = agent.make_update()
        reason = None if payload is None else core.handle_update(core.topics.update(agent.agent_id), payload)
        published = step % publish_every == publish_every - 1
        if published:
            model = core.model_payload()
        if payload is not None:  # None: local training diverged, nothing sent
            yield Step(agent, payload, reason, dict(core.scores_) if published else None)
    core.model_payload()


def drive_clocked(core: Coordinator, fleet: Sequence[Agent], *, versions: int, seed: int, load: float = 2.0,
                  interval: float = 1.0) -> Iterator[Step]:
    """Agents on a clock, as a real fleet runs them, until the model reaches `versions`.

    The model is published every `interval` (if it changed); each agent trains on the newest published
    model for `load` x its own speed (0.5-1.5) x a lognormal jitter, sends its update, and starts again at
    once if a newer model came out meanwhile, else at the next publish. Updates arrive stale by however
    many others were folded since their base: what `drive` (one agent per step) does not show, and what
    made an honest agent's distance cross the norm bound in the real fleets of tests/test_hostile_counts.py.
    """
    rng = np.random.default_rng(seed)
    speed = rng.uniform(0.5, 1.5, len(fleet))
    model, version = core.model_payload(), core.version_
    pending: list[tuple[float, int, int, bytes | None]] = []  # (arrives, agent, base version, payload)
    idle: list[int] = []

    def start(i: int, now: float) -> None:
        agent = fleet[i]
        agent.on_model(model)
        agent.trained_version_ = -1
        agent.due()
        heapq.heappush(pending, (now + load * speed[i] * rng.lognormal(0.0, 0.5), i, version, agent.make_update()))

    for i in range(len(fleet)):
        start(i, 0.0)
    next_publish = interval
    while core.version_ < versions:
        if pending and pending[0][0] < next_publish:
            now, i, base, payload = heapq.heappop(pending)
            if payload is not None:
                yield Step(fleet[i], payload, core.handle_update(core.topics.update(fleet[i].agent_id), payload))
            if base < version:
                start(i, now)
            else:
                idle.append(i)
        elif core.version_ == version and not pending:  # every agent waits for a model that will not come
            break
        else:
            now, next_publish = next_publish, next_publish + interval
            if core.version_ != version:
                model, version = core.model_payload(), core.version_
                for i in idle:
                    start(i, now)
                idle.clear()
    core.model_payload()
