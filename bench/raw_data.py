"""Raw-unit data benchmark: federated statistics vs the centralized ceiling on standardized pooled data.

Real agents and the real coordinator core exchange real payloads in one process
(simulation.inprocess): every agent first sends its feature statistics
(edge_agent.Agent.statistics_payload), the coordinator merges them and publishes the
scaling with the model, then agents train. The data is in raw units: wine and
breast_cancer as bundled, digits with a random gain per feature spanning 1e-3 to 1e3 and
an offset of up to 3 (gained) deviations. Rows compared per dataset:

- ceiling: the same SGD model trained centrally (20 epochs of partial_fit) on the pooled
  train split standardized with its own mean and deviation (what no fleet can compute);
- federated: the fleet on raw units, scaled only by the federated statistics;
- late joiners: two agents report and train for the first half, the rest join then (the
  scaling is refined and the model re-expressed exactly);
- raw, no statistics: the same fleet without them (the coordinator before issue 12);
- per-agent skew: each agent's sensors with their own calibration (gain within
  10^+-0.1, offset within +-0.1 deviations), scaled by the fleet's statistics only.

Prints and writes bench/results/raw_data.json; docs/benchmarks.md quotes it.

    python bench/raw_data.py [--seeds 3] [--agents 5] [--epochs 20]
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from coordinator.server import Coordinator  # noqa: E402
from coordinator.statistics import FleetStatistics  # noqa: E402
from coordinator.strategies import make_strategy  # noqa: E402
from coordinator.validation import UpdateValidator  # noqa: E402
from edge_agent.agent import Agent  # noqa: E402
from edge_agent.data import ArraySource  # noqa: E402
from edge_agent.trainer import LocalTrainer  # noqa: E402
from protocol.model_spec import ModelSpec  # noqa: E402
from protocol.topics import Topics  # noqa: E402
from simulation.datasets import Dataset, centralized_baseline, load_dataset, skew_features  # noqa: E402
from simulation.inprocess import drive  # noqa: E402
from simulation.partition import partition  # noqa: E402
from bench.report import seed_cell, write_results  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "raw_data.json"
TOPICS = Topics("bench-raw")


def raw_dataset(name: str, seed: int) -> Dataset:
    """`name` in raw units; digits with a fleet-wide gain in 1e-3..1e3 and offset per feature."""
    ds = load_dataset(name, seed=seed, raw=True)
    if name == "digits":
        rng = np.random.default_rng(1000 + seed)
        both = skew_features(np.vstack([ds.X_train, ds.X_test]), rng, 3.0)
        ds = replace(ds, X_train=both[:len(ds.X_train)], X_test=both[len(ds.X_train):])
    return ds


def standardized(ds: Dataset) -> Dataset:
    """The pooled train split's own standardization applied to both splits (the ceiling's data)."""
    mean, std = ds.X_train.mean(axis=0), ds.X_train.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    return replace(ds, X_train=(ds.X_train - mean) / std, X_test=(ds.X_test - mean) / std)


def federated(ds: Dataset, *, agents: int, epochs: int, seed: int, statistics: bool, skew: float = 0.0,
              late: bool = False) -> float:
    """Test accuracy of a fedasync fleet of `agents` on `ds` after about `epochs` passes over the data.

    `late`: only the first two agents report statistics and train for the first half; the
    others join then, refining the scaling (the model is re-expressed, not restarted).
    """
    spec = ModelSpec(ds.model, ds.n_features, ds.classes)
    core = Coordinator(TOPICS, spec, make_strategy("fedasync", alpha=0.5), UpdateValidator(TOPICS, spec.n_params),
                       publish_interval=0, eval_data=(ds.X_test, ds.y_test),
                       statistics=FleetStatistics(TOPICS, ds.n_features) if statistics else None)
    rng = np.random.default_rng(seed)
    fleet = []
    for i, idx in enumerate(partition(ds.y_train, agents, "iid", seed=seed)):
        X = skew_features(ds.X_train[idx], rng, skew) if skew else ds.X_train[idx]
        agent = Agent(f"a{i}", TOPICS, ArraySource(X, ds.y_train[idx]), LocalTrainer(random_state=seed + i),
                      "float32", seed=seed + i)
        fleet.append(agent)
    first = fleet[:2] if late else fleet
    for group, updates in ((first, epochs * agents // 2), (fleet, epochs * agents - epochs * agents // 2)) if late \
            else ((fleet, epochs * agents),):
        for agent in group:
            payload = agent.statistics_payload()  # None when already sent and the window did not grow
            if statistics and payload is not None:
                assert core.handle_statistics(TOPICS.stats(agent.agent_id), payload) is None
        assert core.ready
        for _ in drive(core, group, updates=updates, seed=seed, publish_every=1):
            pass
    return float(core.scores_["accuracy"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--agents", type=int, default=5)
    p.add_argument("--epochs", type=int, default=20)
    args = p.parse_args()
    results: dict = {"agents": args.agents, "epochs": args.epochs, "seeds": args.seeds, "datasets": {}}
    for name in ("wine", "breast_cancer", "digits"):
        rows: dict[str, list[float]] = {"ceiling": [], "federated": [], "late_joiners": [], "raw_no_statistics": [],
                                        "per_agent_skew": []}
        for seed in range(args.seeds):
            ds = raw_dataset(name, seed)
            rows["ceiling"].append(centralized_baseline(standardized(ds), epochs=args.epochs, seed=seed))
            options = dict(agents=args.agents, epochs=args.epochs, seed=seed)
            rows["federated"].append(federated(ds, statistics=True, **options))
            rows["late_joiners"].append(federated(ds, statistics=True, late=True, **options))
            rows["raw_no_statistics"].append(federated(ds, statistics=False, **options))
            rows["per_agent_skew"].append(federated(ds, statistics=True, skew=0.1, **options))
        cell = {k: seed_cell(v) for k, v in rows.items()}
        cell["gap_points"] = round(100 * (cell["ceiling"]["accuracy"] - cell["federated"]["accuracy"]), 2)
        results["datasets"][name] = cell
        print(name, json.dumps(cell), flush=True)
    write_results(RESULTS, results)


if __name__ == "__main__":
    main()
