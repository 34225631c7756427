"""Convergence benchmark: time to a target accuracy with 20% of agents 10x slower,
asynchronous (fedasync, fedbuff) against synchronous fedavg rounds, through one mosquitto.

    python bench/convergence.py [--agents 20] [--target 0.90] [--duration 30] [--seeds 3]

Prints JSON: per strategy and seed the time to target, final accuracy, versions, and the
centralized baseline on the pooled data; medians over the seeds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from protocol.transport import BrokerSettings  # noqa: E402
from simulation.datasets import centralized_baseline, load_dataset  # noqa: E402
from simulation.fleet import SimConfig, Simulation  # noqa: E402
from simulation.mosquitto import Mosquitto  # noqa: E402


def run_once(name: str, overrides: dict, args: argparse.Namespace, seed: int, workdir: Path) -> dict:
    """One strategy, one seed, on a fresh mosquitto; the figures the benchmark reports."""
    dataset = load_dataset("digits", seed=seed)
    baseline = centralized_baseline(dataset, seed=seed)
    with Mosquitto(workdir / f"{name}-{seed}") as broker:
        config = SimConfig(agents=args.agents, partition="dirichlet:0.5", duration=args.duration,
                           target=args.target, stragglers=0.2, straggler_factor=10.0,
                           round_time=args.round_time, publish_interval=args.publish_interval,
                           seed=seed, fleet=name, **overrides)
        r = Simulation(config, dataset, BrokerSettings.from_url(broker.url)).run()
    return {
        "seed": seed,
        "time_to_target_s": None if r["time_to_target_s"] is None else round(r["time_to_target_s"], 2),
        "final_accuracy": round(r["final_score"], 4),
        "centralized_accuracy": round(baseline, 4),
        "final_vs_centralized": round(r["final_score"] / baseline, 4),
        "versions": r["version"], "updates_sent": r["updates_sent"], "accepted": r["accepted"],
        "rejected": r["rejected"], "staleness": r["staleness"],
    }


def median_or_none(values: list) -> float | None:
    """Median of the runs, or None if any run never reached the target."""
    return None if any(v is None for v in values) else round(statistics.median(values), 3)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--agents", type=int, default=20)
    p.add_argument("--target", type=float, default=0.90)
    p.add_argument("--duration", type=float, default=30.0)
    p.add_argument("--round-time", type=float, default=0.2, help="seconds per local round of a normal agent")
    p.add_argument("--publish-interval", type=float, default=0.1,
                   help="coordinator's minimum seconds between model publishes (all strategies)")
    p.add_argument("--seeds", type=int, default=3)
    args = p.parse_args()
    runs = {
        "fedasync": dict(strategy="fedasync", alpha=0.3),
        "fedbuff": dict(strategy="fedbuff", buffer_size=max(1, args.agents // 2), server_lr=1.0),
        "fedavg": dict(strategy="fedavg", buffer_size=args.agents),
    }
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in runs.items():
            per_seed = []
            for seed in range(args.seeds):
                per_seed.append(run_once(name, overrides, args, seed, Path(tmp)))
                print(json.dumps({name: per_seed[-1]}), file=sys.stderr)
            results[name] = {
                "config": overrides,
                "median_time_to_target_s": median_or_none([r["time_to_target_s"] for r in per_seed]),
                "median_final_vs_centralized": median_or_none([r["final_vs_centralized"] for r in per_seed]),
                "runs": per_seed,
            }
    sync = results["fedavg"]["median_time_to_target_s"]
    for name in ("fedasync", "fedbuff"):
        t = results[name]["median_time_to_target_s"]
        results[name]["fraction_of_sync_time"] = None if t is None or sync is None else round(t / sync, 3)
    print(json.dumps({"benchmark": "convergence", "dataset": "digits", "partition": "dirichlet:0.5",
                      "agents": args.agents, "stragglers": "20% x10", "round_time_s": args.round_time,
                      "publish_interval_s": args.publish_interval, "target_accuracy": args.target,
                      "duration_s": args.duration, "seeds": args.seeds, "results": results}, indent=1))


if __name__ == "__main__":
    main()
