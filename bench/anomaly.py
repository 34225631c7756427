"""Anomaly detection benchmark: the federated one-class SVM vs the same model trained centrally.

Real agents and the real coordinator core exchange real payloads in one process
(simulation.inprocess) on the synthetic pump-sensor fleet (simulation.datasets.make_anomaly:
eight sensors in their own units, 5% of rows a fault). Agents hold their rows unlabeled
(the label is never given to them), report their feature statistics, and train
`sgd-one-class-svm` with scikit-learn's defaults (nu 0.5) under fedasync; the coordinator
scores the held-out split by ROC AUC against the 0/1 fault label. The centralized twin is
the same SGDOneClassSVM given the pooled train split standardized with its own statistics
(and the same origin shift, protocol/model_spec.py ONE_CLASS_SHIFT), the same number of
epochs of partial_fit (and once without the shift, to show why it is there). Target: within
0.03 ROC AUC.

Prints and writes bench/results/anomaly.json; docs/benchmarks.md quotes it.

    python bench/anomaly.py [--seeds 5] [--agents 5] [--epochs 20]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from sklearn.linear_model import SGDOneClassSVM
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from coordinator.server import Coordinator  # noqa: E402
from coordinator.statistics import FleetStatistics  # noqa: E402
from coordinator.strategies import make_strategy  # noqa: E402
from coordinator.validation import UpdateValidator  # noqa: E402
from edge_agent.agent import Agent  # noqa: E402
from edge_agent.data import ArraySource  # noqa: E402
from edge_agent.trainer import LocalTrainer  # noqa: E402
from protocol.model_spec import ONE_CLASS_SHIFT, ModelSpec  # noqa: E402
from protocol.topics import Topics  # noqa: E402
from simulation.datasets import Dataset, load_dataset  # noqa: E402
from simulation.inprocess import drive  # noqa: E402
from bench.report import seed_cell, write_results  # noqa: E402
from simulation.partition import partition  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "anomaly.json"
TOPICS = Topics("bench-anomaly")


def centralized(ds: Dataset, *, epochs: int, seed: int, shift: float = ONE_CLASS_SHIFT) -> float:
    """ROC AUC of SGDOneClassSVM trained on the pooled, self-standardized train split (plus `shift`)."""
    mean, std = ds.X_train.mean(axis=0), ds.X_train.std(axis=0)
    Z = (ds.X_train - mean) / std + shift
    est, rng = SGDOneClassSVM(random_state=seed), np.random.default_rng(seed)
    for _ in range(epochs):
        est.partial_fit(Z[rng.permutation(len(Z))])
    return float(roc_auc_score(ds.y_test, -est.decision_function((ds.X_test - mean) / std + shift)))


def federated(ds: Dataset, *, agents: int, epochs: int, seed: int) -> dict:
    """ROC AUC and flagged shares of a fedasync fleet of `agents` on unlabeled shards of `ds`."""
    spec = ModelSpec(ds.model, ds.n_features, columns=ds.columns)
    core = Coordinator(TOPICS, spec, make_strategy("fedasync", alpha=0.5), UpdateValidator(TOPICS, spec.n_params),
                       publish_interval=0, eval_data=(ds.X_test, ds.y_test),
                       statistics=FleetStatistics(TOPICS, ds.n_features, columns=ds.columns))
    fleet = []
    for i, idx in enumerate(partition(np.zeros(len(ds.y_train), dtype=int), agents, "iid", seed=seed)):
        unlabeled = np.zeros(len(idx), dtype=np.int64)  # the agents never see the fault label
        fleet.append(Agent(f"a{i}", TOPICS, ArraySource(ds.X_train[idx], unlabeled),
                           LocalTrainer(random_state=seed + i), "float32", seed=seed + i))
    for agent in fleet:
        assert core.handle_statistics(TOPICS.stats(agent.agent_id), agent.statistics_payload()) is None
    for _ in drive(core, fleet, updates=epochs * agents, seed=seed, publish_every=1):
        pass
    return {"roc_auc": float(core.scores_["roc_auc"]), "flagged_eval": float(core.scores_["flagged"]),
            "flagged_agents": float(core.fleet_eval.summary()["flagged"])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--agents", type=int, default=5)
    p.add_argument("--epochs", type=int, default=20)
    args = p.parse_args()
    central, fed, centred = [], [], []
    for seed in range(args.seeds):
        ds = load_dataset("anomaly", seed=seed, raw=True)
        central.append(centralized(ds, epochs=args.epochs, seed=seed))
        centred.append(centralized(ds, epochs=args.epochs, seed=seed, shift=0.0))
        fed.append(federated(ds, agents=args.agents, epochs=args.epochs, seed=seed))
        print(seed, round(central[-1], 4), fed[-1], flush=True)
    results = {
        "dataset": "anomaly", "anomaly_rate": 0.05, "agents": args.agents, "epochs": args.epochs, "seeds": args.seeds,
        "centralized": seed_cell(central, key="roc_auc"),
        # the twin without the origin shift: what a linear one-class SVM does on centred features
        "centralized_no_shift": {"per_seed": [round(x, 4) for x in centred]},
        "federated": dict(seed_cell([f["roc_auc"] for f in fed], key="roc_auc"),
                          flagged_eval=round(float(np.mean([f["flagged_eval"] for f in fed])), 4),
                          flagged_agents=round(float(np.mean([f["flagged_agents"] for f in fed])), 4)),
    }
    results["gap_roc_auc"] = round(results["centralized"]["roc_auc"] - results["federated"]["roc_auc"], 4)
    print(json.dumps(results))
    write_results(RESULTS, results)


if __name__ == "__main__":
    main()
