"""Issue 12, the simulator: raw units and per-agent sensor skew, scaled only by the federated statistics."""

from __future__ import annotations

import numpy as np

from protocol.transport import BrokerSettings
from simulation.datasets import load_dataset, skew_features
from simulation.fleet import SimConfig, Simulation


def test_bundled_sets_come_in_their_own_units():
    raw, standardized = load_dataset("wine", seed=0, raw=True), load_dataset("wine", seed=0)
    assert raw.X_train[:, 12].mean() > 500  # proline
    assert abs(standardized.X_train.mean()) < 1e-9
    rng = np.random.default_rng(0)
    skewed = skew_features(raw.X_train, rng, 3.0)
    ratio = skewed.std(axis=0) / raw.X_train.std(axis=0)
    assert ratio.min() < 0.1 and ratio.max() > 10  # gains over orders of magnitude


def test_raw_skewed_wine_through_mosquitto_learns_with_the_fleet_statistics(mosquitto):
    config = SimConfig(agents=5, duration=6.0, partition="iid", strategy="fedasync", round_time=0.02, seed=2,
                       fleet="simraw", raw_units=True, feature_skew=0.1, target=0.9, stop_at_target=True)
    result = Simulation(config, load_dataset("wine", seed=2, raw=True), BrokerSettings.from_url(mosquitto.url)).run()
    assert result["final_score"] >= 0.9, result["final_score"]
    assert not result["rejected"]
