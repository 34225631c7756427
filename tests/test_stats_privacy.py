"""Issue 12 item 1: noised federated feature statistics (--stats-noise, protocol/stats_privacy.py)."""

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from dp_accounting import GaussianDpEvent, rdp
from sklearn.datasets import load_wine

from bench.raw_data import raw_dataset
from bench.stats_noise import declared_ranges, federated
from edge_agent.agent import Agent
from edge_agent.cli import parse_args as agent_args
from edge_agent.data import ArraySource
from edge_agent.trainer import LocalTrainer
from protocol.privacy import GaussianMechanism
from protocol.statistics import describe, merge_all, scaling_of
from protocol.stats_message import decode_stats
from protocol.stats_privacy import StatsMechanism, parse_bounds
from protocol.topics import Topics

ROOT = Path(__file__).resolve().parent.parent
X, Y = load_wine(return_X_y=True)
D = X.shape[1]
RANGES = tuple((float(lo), float(hi)) for lo, hi in zip(X.min(axis=0), X.max(axis=0)))
DELTA = 1e-5


def bounded(sums, bound):
    """(count, sum / B, sumsq / B^2) as one vector: the space the sensitivity is measured in."""
    count, total, squares = sums
    return np.concatenate([count, total / bound, squares / bound ** 2])


def test_noise_scale_is_sigma_times_sensitivity_over_many_draws():
    m = StatsMechanism(0.7, RANGES)
    bound = np.maximum(np.abs(X.min(axis=0)), np.abs(X.max(axis=0)))
    exact = describe(m.clip(X)).sums()
    rng = np.random.default_rng(0)
    draws = np.array([np.concatenate(m.noised_sums(X, rng)) - np.concatenate(exact) for _ in range(4000)])
    unit = 0.7 * math.sqrt(3 * D)
    expected = np.concatenate([np.full(D, unit), unit * bound, unit * bound ** 2])
    assert m.sensitivity(D) == math.sqrt(3 * D)
    np.testing.assert_allclose(draws.std(axis=0), expected, rtol=0.06)  # 4000 draws: ~1.1% standard error
    np.testing.assert_allclose(draws.mean(axis=0) / expected, 0, atol=0.06)


def test_clipping_bounds_every_rows_contribution():
    m = StatsMechanism(1.0, 2.5)
    rng = np.random.default_rng(1)
    base = rng.normal(0, 3, size=(50, 6))
    base[rng.random(base.shape) < 0.1] = np.nan
    clipped = m.clip(base)
    assert np.nanmax(np.abs(clipped)) <= 2.5 and np.isnan(clipped).sum() == np.isnan(base).sum()
    worst = 0.0
    for row in (np.full(6, 1e9), np.full(6, -1e9), rng.normal(0, 100, 6), np.array([np.nan, 1e6, 0, 0, -3, 7.0])):
        with_row = bounded(describe(m.clip(np.vstack([base, row]))).sums(), 2.5)
        without = bounded(describe(m.clip(base)).sums(), 2.5)
        worst = max(worst, float(np.linalg.norm(with_row - without)))
    assert worst <= m.sensitivity(6) + 1e-9
    assert worst == pytest.approx(m.sensitivity(6))  # a row at the bound on every feature reaches it


def test_release_min_max_are_the_declared_bounds_and_the_wire_accepts_it():
    m = StatsMechanism(1.0, RANGES)
    stats = m.release(X[:20], np.random.default_rng(2))
    np.testing.assert_array_equal(stats.min, [lo for lo, _ in RANGES])
    np.testing.assert_array_equal(stats.max, [hi for _, hi in RANGES])
    assert (stats.count == np.round(stats.count)).all() and (stats.count >= 0).all() and (stats.m2 >= 0).all()


def test_epsilon_is_dp_accounting_called_directly():
    m = StatsMechanism(1.3, 4.0)
    for releases in (1, 3):
        accountant = rdp.RdpAccountant()
        accountant.compose(GaussianDpEvent(1.3), releases)
        assert m.report(releases, DELTA)["epsilon"] == accountant.get_epsilon(DELTA)
    assert m.report(0, DELTA)["epsilon"] == 0.0


def test_merged_noised_statistics_still_standardize_a_fleet_well_enough_to_learn():
    ds = raw_dataset("wine", 0)
    m = StatsMechanism(1.0, declared_ranges(ds))
    parts = np.array_split(ds.X_train, 5)
    rng = np.random.default_rng(3)
    noised = scaling_of(merge_all(m.release(p, rng) for p in parts))
    exact = scaling_of(describe(ds.X_train))
    off = np.abs(noised.mean - exact.mean) / exact.scale  # in deviations; proline (0..1680, B = 1680) is the worst
    assert np.median(off) < 0.5 and off.max() < 2
    assert federated(ds, m, agents=5, epochs=20, seed=0) >= 0.9


def test_local_dp_agent_sends_noised_statistics_and_reports_their_epsilon():
    topics = Topics("sn")
    agent = Agent("a1", topics, ArraySource(X, Y), LocalTrainer(random_state=0), "float32", seed=0,
                  dp=GaussianMechanism(1.0, 1.0), dp_delta=DELTA, stats_noise=StatsMechanism(2.0, RANGES))
    payload = agent.statistics_payload()
    assert payload is not None
    stats = decode_stats(payload, D)
    assert not np.array_equal(stats.count, describe(X).count) or not np.allclose(stats.mean, describe(X).mean)
    np.testing.assert_array_equal(stats.max, [hi for _, hi in RANGES])
    agent.statistics.resend()  # the broker lost the retained copy: the same noise, not fresh noise
    assert agent.statistics_payload() == payload
    assert agent.statistics_payload() is None
    report = agent.status()["stats_privacy"]
    assert report["releases"] == 1 and report["unit"] == "row" and report["delta"] == DELTA
    accountant = rdp.RdpAccountant()
    accountant.compose(GaussianDpEvent(2.0), 1)
    assert report["epsilon"] == accountant.get_epsilon(DELTA)
    json.dumps(agent.status())
    plain = Agent("a2", topics, ArraySource(X, Y), LocalTrainer(random_state=0), "float32", seed=0,
                  dp=GaussianMechanism(1.0, 1.0), dp_delta=DELTA)
    assert plain.statistics_payload() is None and "stats_privacy" not in plain.status()


def test_agent_cli_stats_noise():
    base = ["--broker", "mqtt://127.0.0.1:1", "--fleet", "f", "--id", "a", "--data", "x.csv"]
    for extra in (["--stats-noise", "1"], ["--stats-clip", "3"], ["--stats-noise", "0", "--stats-clip", "3"],
                  ["--stats-noise", "1", "--stats-clip", "-3"], ["--stats-noise", "1", "--stats-clip", "2:1"]):
        with pytest.raises(SystemExit):
            agent_args(base + extra)
    args = agent_args(base + ["--stats-noise", "1.5", "--stats-clip", "0:1,-2:3", "--state-file", "s"])
    assert args.stats_noise_mechanism == StatsMechanism(1.5, ((0.0, 1.0), (-2.0, 3.0)))
    assert agent_args(base).stats_noise_mechanism is None
    assert parse_bounds("4") == 4.0


def test_docs_security_quotes_the_stats_noise_results_file():
    r = json.loads((ROOT / "bench/results/stats_noise.json").read_text())
    md = (ROOT / "docs/security.md").read_text()
    d = r["datasets"]
    for name in ("wine", "breast_cancer"):
        cells = " | ".join(f"{d[name][k]['accuracy']:.4f}" for k in ("exact", "sigma_1", "sigma_4", "sigma_16"))
        assert f"| {name} | {d[name]['n_features']} | {cells} |" in md, name
    eps = " | ".join(f"{r['epsilon'][s]:.2f}" for s in ("1", "4", "16"))
    assert f"| epsilon (delta {r['delta']:g}) | | | {eps} |" in md
    assert re.search(rf"means of {r['seeds']} seeds", md)
    drop = 100 * (d["breast_cancer"]["exact"]["accuracy"] - d["breast_cancer"]["sigma_1"]["accuracy"])
    assert f"costs breast_cancer {drop:.2f} points" in md
