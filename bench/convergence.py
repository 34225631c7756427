"""Convergence benchmark: time to a target accuracy with 20% of agents 10x slower,
asynchronous (fedasync, fedbuff) against synchronous fedavg rounds, through one mosquitto.

    python bench/convergence.py [--agents 20] [--target 0.90] [--duration 60]

Prints JSON: per strategy the time to target, final accuracy, versions, and the
centralized baseline on the pooled data.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from protocol.transport import BrokerSettings  # noqa: E402
from simulation.datasets import centralized_baseline, load_dataset  # noqa: E402
from simulation.fleet import SimConfig, Simulation  # noqa: E402
from simulation.mosquitto import Mosquitto  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--agents", type=int, default=20)
    p.add_argument("--target", type=float, default=0.90)
    p.add_argument("--duration", type=float, default=60.0)
    p.add_argument("--round-time", type=float, default=0.2, help="seconds per local round of a normal agent")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    dataset = load_dataset("digits", seed=args.seed)
    baseline = centralized_baseline(dataset, seed=args.seed)
    runs = {
        "fedasync": dict(strategy="fedasync", alpha=0.3),
        "fedbuff": dict(strategy="fedbuff", buffer_size=5, server_lr=1.0),
        "fedavg": dict(strategy="fedavg", buffer_size=args.agents),
    }
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in runs.items():
            with Mosquitto(Path(tmp) / name) as broker:
                config = SimConfig(agents=args.agents, partition="dirichlet:0.5", duration=args.duration,
                                   target=args.target, stragglers=0.2, straggler_factor=10.0,
                                   round_time=args.round_time, seed=args.seed, fleet=name, **overrides)
                r = Simulation(config, dataset, BrokerSettings.from_url(broker.url)).run()
            results[name] = {
                "time_to_target_s": None if r["time_to_target_s"] is None else round(r["time_to_target_s"], 2),
                "final_accuracy": round(r["final_score"], 4),
                "final_vs_centralized": round(r["final_score"] / baseline, 4),
                "versions": r["version"], "updates_sent": r["updates_sent"], "accepted": r["accepted"],
                "rejected": r["rejected"], "staleness": r["staleness"],
            }
            print(json.dumps({name: results[name]}), file=sys.stderr)
    sync = results["fedavg"]["time_to_target_s"]
    for name in ("fedasync", "fedbuff"):
        t = results[name]["time_to_target_s"]
        results[name]["fraction_of_sync_time"] = None if t is None or sync is None else round(t / sync, 3)
    print(json.dumps({"benchmark": "convergence", "dataset": "digits", "partition": "dirichlet:0.5",
                      "agents": args.agents, "stragglers": "20% x10", "round_time_s": args.round_time,
                      "target_accuracy": args.target, "centralized_accuracy": round(baseline, 4),
                      "duration_s": args.duration, "results": results}, indent=1))


if __name__ == "__main__":
    main()
