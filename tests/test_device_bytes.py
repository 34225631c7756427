"""bench/device_bytes.py counts every system's device CPU over the same windows.

Flower's client spends about half a second after its last update waiting for and tearing down
its run; counting that into a per-update figure made fedmq look six times cheaper than it is.
The windows run from an update to the last update, for fedmq and Flower alike, and the results
file carries them side by side.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "device_bytes.json"


def bench():
    spec = importlib.util.spec_from_file_location("device_bytes", ROOT / "bench" / "device_bytes.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["device_bytes"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_cpu_window_leaves_out_what_follows_the_last_update():
    """A device at 6 ms per update that then spends 480 ms winding down is 6 ms per update
    in both windows, and the wind-down is reported apart (seen red counting to cpu_end)."""
    db = bench()
    marks = {0: 0.5, **{n: 0.5 + 0.006 * n for n in range(1, 21)}}
    device = db.Device(proc=None, log=Path("unused"), pattern="fit ", marks=marks, cpu_end=marks[20] + 0.48)
    figures = db.cpu_figures([device])
    assert figures["cpu_ms_per_update"] == {"first_to_last": 6.0, "second_to_last": 6.0}
    assert figures["cpu_ms_after_last_update"] == 480.0
    assert db.cpu_window(marks, 2) == (marks[20] - marks[2], 18)
    assert db.cpu_window({0: 0.1, 1: 0.2}, 2) == (0.0, 0)  # too few updates: no window, not a wrong one
    assert db.cpu_window({0: 0.1, 2: 0.3, 5: 0.6}, 1) == (0.6 - 0.3, 3)  # updates 1 and 2 seen in one sample


def test_the_results_count_fedmq_and_flower_over_the_same_windows():
    """Every row of bench/results/device_bytes.json, fedmq's and both of Flower's, has its CPU per
    update over exactly the benchmark's windows (seen red with Flower's row holding one window
    less), and Flower ran in both dtypes."""
    windows = list(bench().CPU_WINDOWS)
    data = json.loads(RESULTS.read_text())
    assert data["cpu_windows"] == windows
    for section in (data, data["large"]):
        rows = [section["flower"], section["flower_float32"], *section["fedmq"]]
        assert [section["flower"]["dtype"], section["flower_float32"]["dtype"]] == ["float64", "float32"]
        for row in rows:
            assert list(row["cpu_ms_per_update"]) == windows, row.get("codec", row.get("dtype"))
            assert all(v is not None and v > 0 for v in row["cpu_ms_per_update"].values())
        for row in section["fedmq"]:
            assert list(row["cpu_ratio_vs_flower"]) == windows
            assert row["accuracy_of"].startswith("the retained model as devices decode it")
