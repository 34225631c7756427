"""Norm-bound lock-out benchmark: how often the relative norm bound refuses an honest agent for good.

Real agents and the real coordinator core in one process on a publish clock
(simulation.inprocess.drive_clocked): fedasync at the defaults (--norm-factor 2), digits standardised
(what a real fleet's feature statistics converge to), 5 agents on 5 of 6 shards: those of
tests/test_hostile_counts.py (iid, seed 0), with and without a sixth agent sending its honest delta x-4,
and shards drawn per seed (iid, Dirichlet 0.5). Each fleet
runs under the bound's old rule (every update over the bound refused) and its current one (one that
agrees with the fleet's heading, from an agent not refused `standing` times in a row, is taken at the
others' median norm). An agent is locked out when the bound refused at least 80% of the updates of its
run's second half. Prints JSON; docs/security.md explains the figures.

    python bench/norm_lockout.py [--seeds 10] [--versions 200] [--load 2.0]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from coordinator.staleness import parse_staleness  # noqa: E402
from coordinator.strategies import make_strategy  # noqa: E402
from coordinator.validation import DEFAULT_NORM_FACTOR, NormBound  # noqa: E402
from edge_agent.agent import Agent  # noqa: E402
from edge_agent.data import ArraySource  # noqa: E402
from edge_agent.trainer import LocalTrainer  # noqa: E402
from protocol.topics import Topics  # noqa: E402
from simulation.datasets import load_dataset, standardise  # noqa: E402
from simulation.inprocess import drive_clocked, make_core  # noqa: E402
from simulation.partition import partition  # noqa: E402
from simulation.poisoning import ATTACKS, PoisonedTrainer  # noqa: E402

# name: (partition, its seed (None: the run's), a sign-flipping sixth agent); the test's shards are iid seed 0
FLEETS = {"the test's iid shards, all honest": ("iid", 0, False),
          "the test's iid shards, one sign-flip of 6": ("iid", 0, True),
          "iid shards per seed, all honest": ("iid", None, False),
          "dirichlet:0.5 shards per seed, all honest": ("dirichlet:0.5", None, False)}
RULES = {"old: refuse": None, "current: shrink along the heading": "default"}
HONEST = 5
LOCKED = 0.8  # share of the second half of an agent's updates refused that counts as locked out


def locked_out(outcomes: str) -> bool:
    """`outcomes` (one character per update, X refused) ends refused: at least LOCKED of its second half."""
    tail = outcomes[len(outcomes) // 2:]
    return bool(tail) and tail.count("X") >= LOCKED * len(tail)


def one_run(scheme: str, shards: int | None, flip: bool, rule: str | None, *, seed: int, versions: int,
            load: float) -> dict:
    """One fedasync fleet on the clock; per-agent outcomes and the final test accuracy."""
    ds = load_dataset("digits", seed=0)
    ds.X_train, ds.X_test = standardise(ds.X_train, ds.X_test)
    topics = Topics("lockout")
    bound = NormBound(factor=DEFAULT_NORM_FACTOR) if rule else NormBound(factor=DEFAULT_NORM_FACTOR, heading_margin=None)
    core = make_core(ds, topics, make_strategy("fedasync", staleness=parse_staleness("polynomial:0.5")), norm=bound)
    parts = partition(ds.y_train, HONEST + 1, scheme, seed=seed if shards is None else shards)
    fleet = []
    for i, rows in enumerate(parts[:HONEST + flip]):
        kind = PoisonedTrainer(ATTACKS["sign-flip"], random_state=10 * seed + i) if i == HONEST else \
            LocalTrainer(random_state=10 * seed + i)
        fleet.append(Agent(f"a{i}", topics, ArraySource(ds.X_train[rows], ds.y_train[rows]), kind, "int8",
                           seed=10 * seed + i))
    outcomes = {a.agent_id: "" for a in fleet}
    for step in drive_clocked(core, fleet, versions=versions, seed=seed, load=load):
        outcomes[step.agent.agent_id] += "X" if step.reason == "norm" else "."
    attacker = outcomes.pop(f"a{HONEST}", "")
    return {"accuracy": core.scores_["accuracy"], "honest_updates": sum(map(len, outcomes.values())),
            "honest_refused": sum(o.count("X") for o in outcomes.values()),
            "locked_out": sorted(a for a, o in outcomes.items() if locked_out(o)),
            "shrunk": core.clipped_, "attack_accepted": attacker.count("."), "attack_refused": attacker.count("X")}


def summarise(runs: list[dict]) -> dict:
    """One (fleet, rule) cell over its seeds."""
    return {
        "accuracy": round(float(np.mean([r["accuracy"] for r in runs])), 4),
        "honest_updates": sum(r["honest_updates"] for r in runs),
        "honest_refused": sum(r["honest_refused"] for r in runs),
        "runs_with_an_agent_locked_out": sum(bool(r["locked_out"]) for r in runs),
        "agents_locked_out": sum(len(r["locked_out"]) for r in runs),
        "locked_out_per_seed": [r["locked_out"] for r in runs],
        "shrunk": sum(r["shrunk"] for r in runs),
        "attack_accepted": sum(r["attack_accepted"] for r in runs),
        "attack_refused": sum(r["attack_refused"] for r in runs),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--versions", type=int, default=200, help="model versions each run goes to")
    p.add_argument("--load", type=float, default=2.0, help="an agent's training time in publish intervals (x its speed)")
    args = p.parse_args()
    results: dict[str, dict] = {}
    for fleet, (scheme, shards, flip) in FLEETS.items():
        results[fleet] = {}
        for rule, on in RULES.items():
            runs = [one_run(scheme, shards, flip, on, seed=s, versions=args.versions, load=args.load) for s in range(args.seeds)]
            results[fleet][rule] = cell = summarise(runs)
            print(f"{fleet:42s} {rule:34s} refused {cell['honest_refused']:4d}/{cell['honest_updates']} "
                  f"locked-out runs {cell['runs_with_an_agent_locked_out']} attack in {cell['attack_accepted']}",
                  file=sys.stderr, flush=True)
    print(json.dumps({
        "benchmark": "norm_lockout", "dataset": "digits (standardised)", "strategy": "fedasync",
        "norm_factor": DEFAULT_NORM_FACTOR, "honest_agents": HONEST, "seeds": args.seeds, "versions": args.versions,
        "load": args.load, "codec": "int8", "locked_out": f"the bound refused at least {LOCKED:.0%} of the second half of its updates",
        "results": results,
    }, indent=1))


if __name__ == "__main__":
    main()
