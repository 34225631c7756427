"""One hostile agent's feature statistics (--feature-stats): accuracy against the honest fleet.

The raw-unit fleet of bench/raw_data.py (wine and breast_cancer as bundled, fedasync), 6
agents on iid partitions, every agent sending its statistics once; in each attack agent a5
trains honestly but sends crafted statistics, kept self-consistent (mean inside min..max,
variance inside the range) so that only the merge can stop them:

    shift     its mean moved by 100 standard deviations of its own data, per feature
    squash    its variance divided by 10^6 (a scale that blows standardized features up)
    blowup    its variance times 10^6 (a scale that flattens them)
    inflate   the shift, claiming 1000 times its rows
    overflow  a sum of 10^308 (it used to end the coordinator; counted as accuracy 0)

Accuracy on the test split of the final model, means over seeds; `honest` is the same fleet
with a5 honest. Prints and writes bench/results/stats_hostile.json; docs/security.md quotes it.

    python bench/stats_hostile.py [--seeds 5] [--epochs 20]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import msgpack
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.raw_data import TOPICS, raw_dataset  # noqa: E402
from bench.report import seed_cell, write_results  # noqa: E402
from bench.stats_noise import stats_core  # noqa: E402
from edge_agent.agent import Agent  # noqa: E402
from edge_agent.data import ArraySource  # noqa: E402
from edge_agent.trainer import LocalTrainer  # noqa: E402
from protocol.statistics import FeatureStats, describe  # noqa: E402
from protocol.stats_message import encode_stats  # noqa: E402
from simulation.datasets import Dataset  # noqa: E402
from simulation.inprocess import drive  # noqa: E402
from simulation.partition import partition  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "stats_hostile.json"
AGENTS = 6
ATTACKS = ("shift", "squash", "blowup", "inflate", "overflow")


def hostile_stats(X: np.ndarray, attack: str) -> bytes:
    """The statistics payload agent a5 sends under `attack` (its data is `X`)."""
    s = describe(X)
    std = np.sqrt(s.m2 / np.maximum(s.count, 1))
    std = np.where(std > 0, std, 1.0)
    count, mean, var = s.count, s.mean, s.m2 / np.maximum(s.count, 1)
    if attack in ("shift", "inflate"):
        mean = mean + 100 * std
        count = count * (1000 if attack == "inflate" else 1)
    elif attack == "squash":
        var = var / 1e6
    elif attack == "blowup":
        var = var * 1e6
    elif attack == "overflow":
        f = lambda v: np.full(len(count), v, dtype="<f8").tobytes()  # noqa: E731
        return msgpack.packb({"format": 2, "type": "stats", "count": f(1.0), "sum": f(1e308), "sumsq": f(1e308),
                              "min": f(-1.7e308), "max": f(1.7e308)}, use_bin_type=True)
    half = np.sqrt(var) + np.abs(mean - s.mean) + (s.max - s.min)  # min..max holding the mean and the spread
    return encode_stats(FeatureStats(count, mean, var * count, mean - 2 * half, mean + 2 * half))


def federated(ds: Dataset, attack: str | None, *, epochs: int, seed: int) -> float:
    """Test accuracy of a fedasync fleet of AGENTS scaled by its federated statistics, a5 hostile under `attack`."""
    core = stats_core(ds)
    fleet = []
    for i, idx in enumerate(partition(ds.y_train, AGENTS, "iid", seed=seed)):
        agent = Agent(f"a{i}", TOPICS, ArraySource(ds.X_train[idx], ds.y_train[idx]),
                      LocalTrainer(random_state=seed + i), "float32", seed=seed + i)
        fleet.append(agent)
        hostile = attack is not None and i == AGENTS - 1
        payload = hostile_stats(ds.X_train[idx], attack) if hostile else agent.statistics_payload()
        core.handle_statistics(TOPICS.stats(agent.agent_id), payload)
    try:
        for _ in drive(core, fleet, updates=epochs * AGENTS, seed=seed, publish_every=1):
            pass
    except Exception as exc:  # the coordinator this stands for would have exited
        print(f"  {attack}: the coordinator failed ({type(exc).__name__}: {exc})", flush=True)
        return 0.0
    return float(core.scores_["accuracy"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=20)
    args = p.parse_args()
    results: dict = {"agents": AGENTS, "hostile": 1, "epochs": args.epochs, "seeds": args.seeds, "datasets": {}}
    np.seterr(all="ignore")  # the attacks overflow on purpose
    logging.disable(logging.WARNING)  # agents diverging under an attack say so every round
    for name in ("wine", "breast_cancer"):
        rows: dict[str, list[float]] = {"honest": [], **{a: [] for a in ATTACKS}}
        for seed in range(args.seeds):
            ds = raw_dataset(name, seed)
            for attack in (None, *ATTACKS):
                rows[attack or "honest"].append(federated(ds, attack, epochs=args.epochs, seed=seed))
        cell = {k: seed_cell(v) for k, v in rows.items()}
        cell["worst_points_below_honest"] = round(100 * (cell["honest"]["accuracy"]
                                                         - min(cell[a]["accuracy"] for a in ATTACKS)), 1)
        results["datasets"][name] = cell
        print(name, json.dumps(cell), flush=True)
    write_results(RESULTS, results)


if __name__ == "__main__":
    main()
