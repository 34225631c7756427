"""Poisoning benchmark: test accuracy with 20% of agents sending distorted updates, per defence.

Real agents (`edge_agent.Agent` with a `PoisonedTrainer` for the attackers) and the real
coordinator core exchange real payloads in one process (simulation.inprocess), fedbuff
on digits with Dirichlet(0.5) partitions. Every attack meets every defence, and the
all-honest fleet meets every defence too (the cost of a defence without an attack).
Prints JSON; docs/security.md explains the figures.

    python bench/poisoning.py [--updates 1000] [--seeds 5] [--buffer-size 10] [--jobs 1]
                              [--attacks none,sign-flip] [--defences mean,trimmed-mean+norm-reject]

--jobs runs the (attack, defence, seed) cells in that many processes; each run is seeded,
so the figures are the same as one process's.
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from simulation.poisoning import ATTACKS, Defence, run  # noqa: E402

DEFENCES = {
    "mean": Defence(),
    "median": Defence("median"),
    "trimmed-mean": Defence("trimmed-mean:0.2"),
    "mean+norm-clip": Defence(norm_factor=2, norm_action="clip"),
    "mean+norm-reject": Defence(norm_factor=2),
    "median+norm-reject": Defence("median", 2),
    "trimmed-mean+norm-reject": Defence("trimmed-mean:0.2", 2),
}


def _names(known: list[str]):
    """An argparse type: a comma-separated subset of `known`, in the order given."""
    def parse(text: str) -> list[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        unknown = [n for n in names if n not in known]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(unknown) or 'empty list'}; choose from {', '.join(known)}")
        return names
    return parse


def summarise(runs: list[dict]) -> dict:
    """Mean and per-seed accuracy of one (attack, defence) cell, with what got through."""
    return {
        "accuracy": round(float(np.mean([r["tail_accuracy"] for r in runs])), 4),
        "accuracy_per_seed": [round(r["tail_accuracy"], 4) for r in runs],
        "final_accuracy": round(float(np.mean([r["final_accuracy"] for r in runs])), 4),
        "attack_updates_accepted": sum(r["attack_accepted"] for r in runs),
        "attack_updates_rejected": sum(r["attack_rejected"] for r in runs),
        "honest_updates_rejected": sum(r["honest_rejected"] for r in runs),
        "clipped": sum(r["clipped"] for r in runs),
    }


def one_run(cell: tuple[str, str, int, dict]) -> dict:
    """One seeded run of an (attack, defence) cell; top level so a process pool can call it."""
    attack, name, seed, options = cell
    return run(None if attack == "none" else attack, DEFENCES[name], seed=seed, **options)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--agents", type=int, default=20)
    p.add_argument("--attackers", type=int, default=4)
    p.add_argument("--updates", type=int, default=1000)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--buffer-size", type=int, default=10)
    p.add_argument("--partition", default="dirichlet:0.5")
    p.add_argument("--jobs", type=int, default=1, help="processes to run the seeded runs in (same figures)")
    p.add_argument("--attacks", type=_names(["none", *ATTACKS]), default=["none", *ATTACKS],
                   help="comma-separated attacks to run (default: all; `none` is the all-honest fleet)")
    p.add_argument("--defences", type=_names(list(DEFENCES)), default=list(DEFENCES),
                   help="comma-separated defences to run (default: all)")
    args = p.parse_args()
    if "none" not in args.attacks or "mean" not in args.defences:
        p.error("--attacks must include none and --defences mean: every figure is against the all-honest mean")
    options = dict(agents=args.agents, attackers=args.attackers, updates=args.updates,
                   buffer_size=args.buffer_size, scheme=args.partition)
    results: dict[str, dict] = {attack: {} for attack in args.attacks}
    cells = [(attack, name) for attack in results for name in args.defences]
    with ProcessPoolExecutor(args.jobs) as pool:
        runs = pool.map(one_run, [(a, n, s, options) for a, n in cells for s in range(args.seeds)])
        for attack, name in cells:
            results[attack][name] = summarise([next(runs) for _ in range(args.seeds)])
            print(f"{attack:14s} {name:26s} {results[attack][name]['accuracy']:.4f}", file=sys.stderr, flush=True)
    honest = results["none"]["mean"]["accuracy"]
    for cells in results.values():
        for cell in cells.values():
            cell["points_vs_all_honest_mean"] = round(100 * (cell["accuracy"] - honest), 2)
    print(json.dumps({
        "benchmark": "poisoning", "dataset": "digits", "partition": args.partition, "agents": args.agents,
        "attackers": args.attackers, "updates": args.updates, "seeds": args.seeds, "strategy": "fedbuff",
        "buffer_size": args.buffer_size, "staleness": "polynomial:0.5", "codec": "int8",
        "accuracy": "mean test accuracy of the models published in the last 25% of the updates",
        "attacks": {name: {"delta_factor": a.factor, "claimed_samples": a.claimed_samples} for name, a in ATTACKS.items()},
        "defences": {name: str(DEFENCES[name]) for name in args.defences},
        "all_honest_mean_accuracy": honest,
        "results": results,
    }, indent=1))


if __name__ == "__main__":
    main()
