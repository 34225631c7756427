"""Sybil benchmark: how large a share of colluding ids each defence survives.

The poisoning benchmark's fleet (real agents and the real coordinator core in one process,
fedbuff K=10 on digits, Dirichlet(0.5)), 30 ids of which a growing share attack with a
4x sign flip. The norm and sample-count references are per agent (the newest update of
each of the last 50 agents), so attackers can own them only by owning ids, not volume.
Prints JSON; docs/security.md quotes it.

    python bench/sybil.py [--updates 600] [--seeds 3]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from simulation.poisoning import Defence, run  # noqa: E402

AGENTS = 30
SHARES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.67)
DEFENCES = {
    "mean": Defence(),
    "trimmed-mean+norm-reject": Defence("trimmed-mean:0.2", 2),
    "median+norm-reject": Defence("median", 2),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--updates", type=int, default=600)
    p.add_argument("--seeds", type=int, default=3)
    args = p.parse_args()
    honest = float(np.median([run(None, Defence(), seed=s, agents=AGENTS, updates=args.updates)["tail_accuracy"]
                              for s in range(args.seeds)]))
    results: dict[str, dict] = {}
    for name, defence in DEFENCES.items():
        results[name] = {}
        for share in SHARES:
            attackers = round(share * AGENTS)
            runs = [run("sign-flip", defence, seed=s, agents=AGENTS, attackers=attackers, updates=args.updates)
                    for s in range(args.seeds)]
            accuracy = float(np.median([r["tail_accuracy"] for r in runs]))
            results[name][str(attackers)] = {"share": round(attackers / AGENTS, 3), "accuracy": round(accuracy, 4),
                                            "points_vs_all_honest": round(100 * (accuracy - honest), 2)}
            print(f"{name:26s} {attackers:2d}/{AGENTS} {accuracy:.4f}", file=sys.stderr, flush=True)
    survives = {name: max([cell["share"] for cell in cells.values() if cell["points_vs_all_honest"] >= -5], default=0.0)
                for name, cells in results.items()}
    print(json.dumps({"benchmark": "sybil", "dataset": "digits", "agents": AGENTS, "attack": "sign-flip",
                      "updates": args.updates, "seeds": args.seeds, "buffer_size": 10,
                      "accuracy": "median over seeds of the mean test accuracy in the last 25% of the updates",
                      "all_honest_accuracy": round(honest, 4),
                      "survives": "largest share of attacking ids within 5 points of all-honest",
                      "largest_share_survived": survives, "results": results}, indent=1))


if __name__ == "__main__":
    main()
