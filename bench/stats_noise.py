"""Noised feature statistics (--stats-noise): what one Gaussian release of them costs in accuracy.

The raw-unit fleet of bench/raw_data.py (5 agents, fedasync, wine and breast_cancer as
bundled), every agent sending its statistics once, either exact or through
protocol.stats_privacy.StatsMechanism with noise multiplier sigma (one release per agent,
epsilon at delta 1e-5 from protocol.accounting). The declared clipping ranges are each
feature's range over the pooled train split (a stand-in for a sensor's datasheet range:
the tightest declaration an operator could honestly make). Rows: the exact statistics,
then each sigma; accuracy on the test split, means over seeds.

Prints and writes bench/results/stats_noise.json; docs/security.md quotes it.

    python bench/stats_noise.py [--seeds 5] [--agents 5] [--epochs 20] [--sigmas 1,4,16]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.raw_data import TOPICS, raw_dataset  # noqa: E402
from bench.report import seed_cell, write_results  # noqa: E402
from coordinator.server import Coordinator  # noqa: E402
from coordinator.statistics import FleetStatistics  # noqa: E402
from coordinator.strategies import make_strategy  # noqa: E402
from coordinator.validation import UpdateValidator  # noqa: E402
from edge_agent.agent import Agent  # noqa: E402
from edge_agent.data import ArraySource  # noqa: E402
from edge_agent.trainer import LocalTrainer  # noqa: E402
from protocol.accounting import epsilon  # noqa: E402
from protocol.model_spec import ModelSpec  # noqa: E402
from protocol.stats_privacy import StatsMechanism  # noqa: E402
from simulation.datasets import Dataset  # noqa: E402
from simulation.inprocess import drive  # noqa: E402
from simulation.partition import partition  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "stats_noise.json"
DELTA = 1e-5


def declared_ranges(ds: Dataset) -> tuple[tuple[float, float], ...]:
    """Each feature's range over the pooled train split (widened where it is a single value)."""
    lo, hi = np.nanmin(ds.X_train, axis=0), np.nanmax(ds.X_train, axis=0)
    hi = np.where(hi > lo, hi, lo + 1.0)
    return tuple((float(a), float(b)) for a, b in zip(lo, hi))


def stats_core(ds: Dataset) -> Coordinator:
    """The in-process fedasync coordinator of the statistics benchmarks, merging feature statistics."""
    spec = ModelSpec(ds.model, ds.n_features, ds.classes)
    return Coordinator(TOPICS, spec, make_strategy("fedasync", alpha=0.5), UpdateValidator(TOPICS, spec.n_params),
                       publish_interval=0, eval_data=(ds.X_test, ds.y_test),
                       statistics=FleetStatistics(TOPICS, ds.n_features))


def federated(ds: Dataset, noise: StatsMechanism | None, *, agents: int, epochs: int, seed: int) -> float:
    """Test accuracy of a fedasync fleet scaled by its (noised when `noise`) federated statistics."""
    core = stats_core(ds)
    fleet = []
    for i, idx in enumerate(partition(ds.y_train, agents, "iid", seed=seed)):
        agent = Agent(f"a{i}", TOPICS, ArraySource(ds.X_train[idx], ds.y_train[idx]),
                      LocalTrainer(random_state=seed + i), "float32", seed=seed + i, stats_noise=noise)
        if noise is not None:
            agent.statistics.rng = np.random.default_rng(10_000 * seed + i)  # reproducible bench (never in use)
        fleet.append(agent)
    for agent in fleet:
        payload = agent.statistics_payload()
        assert core.handle_statistics(TOPICS.stats(agent.agent_id), payload) is None
    assert core.ready
    for _ in drive(core, fleet, updates=epochs * agents, seed=seed, publish_every=1):
        pass
    return float(core.scores_["accuracy"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--agents", type=int, default=5)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--sigmas", default="1,4,16")
    args = p.parse_args()
    sigmas = [float(s) for s in args.sigmas.split(",")]
    results: dict = {"agents": args.agents, "epochs": args.epochs, "seeds": args.seeds, "delta": DELTA,
                     "epsilon": {f"{s:g}": epsilon(s, 1, DELTA) for s in sigmas}, "datasets": {}}
    for name in ("wine", "breast_cancer"):
        rows: dict[str, list[float]] = {"exact": [], **{f"sigma_{s:g}": [] for s in sigmas}}
        for seed in range(args.seeds):
            ds = raw_dataset(name, seed)
            options = dict(agents=args.agents, epochs=args.epochs, seed=seed)
            rows["exact"].append(federated(ds, None, **options))
            for s in sigmas:
                rows[f"sigma_{s:g}"].append(federated(ds, StatsMechanism(s, declared_ranges(ds)), **options))
        cell = {k: seed_cell(v) for k, v in rows.items()}
        cell["n_features"] = ds.n_features
        results["datasets"][name] = cell
        print(name, json.dumps(cell), flush=True)
    write_results(RESULTS, results)


if __name__ == "__main__":
    main()
