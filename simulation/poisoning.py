"""Model poisoning, measured: a share of agents trains honestly, then sends a distorted delta.

An attacker is a real `LocalTrainer` whose delta is multiplied by a factor (and whose
sample count may be inflated) before the agent encodes it with its normal codec, so its
payload is a well-formed update that only the norm bound and the aggregate can tell
apart. `run` drives a fleet with attackers through the real coordinator core
(simulation.inprocess) and reports the test accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from coordinator.staleness import parse_staleness
from coordinator.strategies import make_strategy
from coordinator.validation import NormBound
from edge_agent.trainer import LocalTrainer, TrainResult
from protocol.messages import ModelMessage
from protocol.topics import Topics
from simulation.datasets import load_dataset
from simulation.inprocess import drive, make_agents, make_core


@dataclass(frozen=True)
class Attack:
    """What an attacker does to its honest result: scale the delta, optionally lie about its size."""

    factor: float  # negative: sign flip
    claimed_samples: int | None = None


ATTACKS = {
    "sign-flip": Attack(-4.0),
    "scale": Attack(10.0),
    # stays inside a 2x relative norm bound, but claims a billion samples to outweigh the buffer
    "inflated-flip": Attack(-1.5, 10**9),
}


class PoisonedTrainer(LocalTrainer):
    """Trains like any agent, then distorts its result as `attack` says."""

    def __init__(self, attack: Attack, **kwargs) -> None:
        super().__init__(**kwargs)
        self.attack = attack

    def train(self, model: ModelMessage, X, y) -> TrainResult | None:
        result = super().train(model, X, y)
        if result is None:
            return None
        return replace(result, delta=self.attack.factor * result.delta,
                       n_samples=self.attack.claimed_samples or result.n_samples)


@dataclass(frozen=True)
class Defence:
    """The coordinator's robust settings: fedbuff aggregate and relative norm bound."""

    aggregate: str = "mean"
    norm_factor: float | None = None
    norm_action: str = "reject"

    def __str__(self) -> str:
        norm = f" --norm-factor {self.norm_factor:g} --norm-action {self.norm_action}" if self.norm_factor else ""
        return f"--aggregate {self.aggregate}{norm}"


def run(
    attack: str | None, defence: Defence, *, seed: int, agents: int = 20, attackers: int = 4,
    updates: int = 600, buffer_size: int = 10, scheme: str = "dirichlet:0.5", codec: str = "int8",
    publish_every: int = 10, dataset: str = "digits", tail: float = 0.25,
) -> dict:
    """One fedbuff run on `dataset` with `attackers` of `agents` running ATTACKS[`attack`] (None: all honest).

    `tail_accuracy` is the mean test accuracy of the models published in the last `tail`
    of the run: single snapshots of SGD on digits swing by several points from one publish
    to the next, which would drown the effect measured.
    """
    ds = load_dataset(dataset, seed=seed)
    topics = Topics("poisoning")
    strategy = make_strategy("fedbuff", buffer_size=buffer_size, staleness=parse_staleness("polynomial:0.5"),
                             aggregate=defence.aggregate)
    core = make_core(ds, topics, strategy, norm=NormBound(factor=defence.norm_factor), norm_action=defence.norm_action)
    rng = np.random.default_rng(seed + 1)
    bad = set(rng.choice(agents, attackers, replace=False).tolist()) if attack else set()

    def trainer(i: int) -> LocalTrainer:
        return PoisonedTrainer(ATTACKS[attack], random_state=seed + i) if i in bad else LocalTrainer(random_state=seed + i)

    fleet = make_agents(ds, topics, agents, scheme, codec, seed=seed, trainer=trainer)
    bad_ids = {fleet[i].agent_id for i in bad}
    counts = {"honest_accepted": 0, "honest_rejected": 0, "attack_accepted": 0, "attack_rejected": 0}
    tail_scores = []
    for n, step in enumerate(drive(core, fleet, updates=updates, seed=seed, publish_every=publish_every)):
        who = "attack" if step.agent.agent_id in bad_ids else "honest"
        counts[f"{who}_{'accepted' if step.reason is None else 'rejected'}"] += 1
        if step.scores is not None and n >= (1 - tail) * updates:
            tail_scores.append(step.scores["accuracy"])
    return {"tail_accuracy": float(np.mean(tail_scores)), "final_accuracy": core.scores_["accuracy"],
            "clipped": core.clipped_, **counts}
