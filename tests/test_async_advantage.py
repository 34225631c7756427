"""bench/async_advantage.py's arithmetic, without processes: when a run reached a target, what it
had spent by then, the spread over seeds; and the padding of a slow device's round."""

from __future__ import annotations

import struct
import time

import pytest

import sys

from fleet import ROOT  # puts the repository on the path
from bench.async_advantage import bytes_until, cpu_at, first_at, flower_timeline, packet_times, spread, summarize
from bench.padding import padded
from protocol.tabular import write_csv


def test_first_at_is_the_first_point_at_or_above_the_target():
    timeline = [(0.0, 0.05, 0), (3.0, 0.80, 10), (6.0, 0.86, 20), (9.0, 0.84, 30), (12.0, 0.90, 40)]
    assert first_at(timeline, 0.86) == (6.0, 20)
    assert first_at(timeline, 0.95) is None


def test_spend_by_a_time_counts_only_what_came_before_it():
    series = [(10.0, 1.0), (11.0, 1.5), (12.0, 2.5)]
    assert (cpu_at(series, 9.0), cpu_at(series, 11.5), cpu_at(series, 99)) == (0.0, 1.5, 2.5)
    packets = [(1.0, 5000, 100), (2.0, 5001, 60), (3.0, 5000, 40), (4.0, 7777, 999)]
    assert bytes_until(packets, {5000, 5001}, 2.0) == 160
    assert bytes_until(packets, {5000, 5001}, 10.0) == 200  # port 7777 (the watcher) never counts


def test_packet_times_reads_a_pcap(tmp_path):
    def packet(ts: float, sport: int, dport: int, payload: int) -> bytes:
        ip = bytes([0x45]) + bytes(19) + struct.pack(">HH", sport, dport) + bytes(16) + bytes(payload)
        frame = bytes(14) + ip
        return struct.pack("<IIII", int(ts), int(ts % 1 * 1e6), len(frame), len(frame)) + frame

    header = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)
    path = tmp_path / "c.pcap"
    path.write_bytes(header + packet(5.5, 40000, 1883, 10) + packet(6.0, 1883, 40000, 0) + packet(7.0, 1, 2, 5))
    assert packet_times(path, 1883) == [(5.5, 40000, 50), (6.0, 40000, 40)]


def test_spread_and_the_ratio_to_flower_fedavg():
    assert spread([3, 1, 2]) == {"median": 2, "min": 1, "max": 3, "reached": 3}
    assert spread([3, None])["median"] is None and spread([3, None])["reached"] == 1
    rows = [{"system": s, "seed": k, "ceiling": 0.9, "final_accuracy": 0.9, "updates": 1, "device_bytes": 1,
             "device_cpu_s": 1, "time_to_90_s": 1, "time_to_95_s": t, "updates_to_95": 1,
             "device_bytes_to_95": b, "device_cpu_s_to_95": 1}
            for s, t, b in (("Flower FedAvg", 30.0, 800), ("fedmq fedbuff", 10.0, 100)) for k in range(3)]
    out = summarize(rows, ["Flower FedAvg", "fedmq fedbuff"])
    assert out["fedmq fedbuff"]["time_to_95_s_vs_flower_fedavg"] == pytest.approx(1 / 3, abs=1e-3)
    assert out["fedmq fedbuff"]["device_bytes_to_95_vs_flower_fedavg"] == 0.125


def test_a_padded_round_lasts_at_least_the_pad_and_says_when_it_started(capsys):
    fast = padded(lambda x: x + 1, 0.2)
    started = time.monotonic()
    assert fast(1) == 2
    assert time.monotonic() - started >= 0.2
    assert capsys.readouterr().out.startswith("round start ")
    slow = padded(lambda: time.sleep(0.3), 0.1)  # a round longer than its pad is not padded further
    started = time.monotonic()
    slow()
    assert time.monotonic() - started < 0.3 + 0.09


def test_the_flower_side_of_the_sensors_regression(tmp_path):
    """--dataset sensors: Flower's clients fit an SGDRegressor on float targets, its server logs r2, which
    can be negative before the model is any good; the classifier's log reads as before."""
    import numpy as np

    sys.path.insert(0, str(ROOT / "bench"))  # Flower's side runs as a script from bench/, in Flower's venv
    from flower_baseline import estimator, load

    write_csv(tmp_path / "agent0.csv", np.ones((3, 16)), np.array([0.25, -1.5, 2.0]))
    X, y = load(tmp_path / "agent0.csv", 0)
    assert X.shape == (3, 16) and list(y) == [0.25, -1.5, 2.0]
    est = estimator(0, 16, 0)
    assert type(est).__name__ == "SGDRegressor" and not est.coef_.any() and est.coef_.shape == (16,)
    assert type(estimator(0, 16, 3)).__name__ == "SGDClassifier"
    log = "round 1 r2 -0.4210 time 100.500\nround 2 r2 0.8100 time 101.000\n"
    assert flower_timeline(log, 10) == [(100.5, -0.421, 10), (101.0, 0.81, 20)]
    assert flower_timeline("round 3 accuracy 0.9000 time 5.000\n", 4) == [(5.0, 0.9, 12)]
