"""Issue 12 item 4 end to end: anomaly detection on unlabeled device data.

Real mosquitto, real agent and coordinator processes: agents hold the pump-sensor CSVs of
simulation.datasets.make_anomaly without their label column (one in another column order),
the coordinator is given only `--model sgd-one-class-svm` and a labelled --eval-csv, which it
scores by ROC AUC; agents report the share of their rows flagged.
"""

from __future__ import annotations

import csv

import numpy as np

from fleet import TopicWatcher, spawn, stop
from protocol.messages import decode_model
from protocol.topics import Topics
from simulation.datasets import load_dataset

FLEET = "anomalyfleet"
TOPICS = Topics(FLEET)


def _write(path, X, names, order, y=None) -> None:
    with path.open("w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow([names[j] for j in order] + ([] if y is None else ["label"]))
        for i, xi in enumerate(X):
            out.writerow([repr(float(xi[j])) for j in order] + ([] if y is None else [int(y[i])]))


def _status(watcher) -> dict:
    return watcher.json(TOPICS.coordinator_status) or {}


def test_one_class_on_unlabeled_csvs_scored_by_roc_auc(tmp_path, mosquitto):
    ds = load_dataset("anomaly", seed=0, raw=True)
    n = ds.n_features
    shards = np.array_split(np.random.default_rng(0).permutation(len(ds.y_train)), 3)
    orders = [list(range(n)), list(range(n)), list(reversed(range(n)))]
    paths = []
    for i, (idx, order) in enumerate(zip(shards, orders)):
        paths.append(tmp_path / f"agent{i}.csv")
        _write(paths[-1], ds.X_train[idx], ds.columns, order)  # no label column at all
    eval_path = tmp_path / "eval.csv"
    _write(eval_path, ds.X_test, ds.columns, list(range(n)), ds.y_test)
    watcher = TopicWatcher(mosquitto.port, TOPICS.everything)
    coordinator = spawn(
        "coordinator", "--broker", mosquitto.url, "--fleet", FLEET, "--model", "sgd-one-class-svm",
        "--feature-stats", "--stats-min-agents", "3", "--schema-agents", "3", "--eval-csv", eval_path,
        "--publish-interval", "0.3", log=tmp_path / "coordinator.log")
    agents = [spawn("edge_agent", "--broker", mosquitto.url, "--fleet", FLEET, "--id", f"agent{i}", "--data", p,
                    "--unlabeled", "--train-every", "0.2", log=tmp_path / f"agent{i}.log")
              for i, p in enumerate(paths)]
    try:
        model = watcher.wait_for(lambda: (raw := watcher.latest.get(TOPICS.model)) and decode_model(raw), 60,
                                 "the first model")
        assert model.spec.estimator == "sgd-one-class-svm" and set(model.spec.columns) == set(ds.columns)
        assert model.spec.classes == () and model.scaling is not None
        status = watcher.wait_for(lambda: (s := _status(watcher)).get("roc_auc") is not None
                                  and s["roc_auc"] >= 0.85 and s, 90, "ROC AUC >= 0.85 on the labelled eval set")
        assert 0 < status["flagged"] < 0.5 and status["accuracy"] is None
        flagged = watcher.wait_for(lambda: _status(watcher).get("fleet_eval", {}).get("flagged"), 30,
                                   "the agents' share of rows flagged")
        assert 0 < flagged < 0.5
        for i in range(3):
            assert (watcher.json(TOPICS.agent_status(f"agent{i}")) or {}).get("state") != "error"
    finally:
        for proc in agents:
            stop(proc)
        stop(coordinator)
        watcher.close()
