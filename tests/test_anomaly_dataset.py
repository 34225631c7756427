"""simulation.datasets.make_anomaly: the synthetic pump-sensor fleet with faults (issue 12 item 5)."""

from __future__ import annotations

import numpy as np

from simulation.datasets import SENSORS, load_dataset


def test_the_anomaly_set_is_seeded_stratified_in_raw_units_with_dropping_faults():
    a, b, c = (load_dataset("anomaly", seed=s, raw=True) for s in (0, 0, 1))
    assert np.array_equal(a.X_train, b.X_train) and not np.array_equal(a.X_train, c.X_train)
    assert a.model == "sgd-one-class-svm" and a.classes == () and a.columns == tuple(s[0] for s in SENSORS)
    y = np.concatenate([a.y_train, a.y_test])
    assert set(np.unique(y)) == {0, 1} and 0.04 < y.mean() < 0.06
    assert abs(a.y_train.mean() - a.y_test.mean()) < 0.01  # stratified by the fault label
    normal = a.X_train[a.y_train == 0]
    for j, (name, mean, std) in enumerate(SENSORS):  # each sensor in its own unit
        assert abs(normal[:, j].mean() - mean) < 0.1 * std and 0.9 * std < normal[:, j].std() < 1.1 * std, name
    drop = (normal.mean(axis=0) - a.X_train[a.y_train == 1].mean(axis=0)) / np.array([s[2] for s in SENSORS])
    assert (drop[[1, 3, 4, 5]] > 3).all() and (np.abs(drop[[0, 2, 6, 7]]) < 0.5).all()  # the stalling pump


def test_the_simulator_trains_a_one_class_fleet_in_sensor_units_to_its_twin(mosquitto):
    from protocol.transport import BrokerSettings
    from simulation.datasets import centralized_baseline
    from simulation.fleet import SimConfig, Simulation

    config = SimConfig(agents=5, duration=10.0, partition="iid", strategy="fedasync", round_time=0.02, seed=0,
                       fleet="simanomaly", raw_units=True)
    result = Simulation(config, load_dataset("anomaly", seed=0, raw=True), BrokerSettings.from_url(mosquitto.url)).run()
    assert result["metric"] == "roc_auc" and not result["rejected"]
    twin = centralized_baseline(load_dataset("anomaly", seed=0), seed=0)  # standardized pooled, same model
    assert result["final_score"] >= 0.85 and twin - result["final_score"] <= 0.03, (result["final_score"], twin)
