"""docs/benchmarks.md section 15 quotes bench/results/first_aggregation*.json exactly (issue 23 points 5, 6)."""

from __future__ import annotations

import json

from fleet import ROOT

FILES = (("before (main at 31aac50: the 1 s publish clock)", "first_aggregation-before.json"),
         ("after (--publish-policy change)", "first_aggregation.json"),
         ("after the byte and CPU cuts (main at 5d22046: edge_agent/ovr.py)", "first_aggregation-cuts.json"))


def _spread(cell: dict | None, unit: str) -> str:
    if cell is None:
        return "not reached"
    return f"{cell['median']:g}{unit} ({cell['min']:g}-{cell['max']:g})"


def table() -> str:
    """One row per system of each results file: medians over the seeds (min-max)."""
    lines = ["| run | system | s from the first aggregation to the 400th update | s from it to 0.90 "
             "| model downloads per update | device CPU per update, 2nd to last |", "|---|---|---|---|---|---|"]
    for label, name in FILES:
        r = json.loads((ROOT / "bench" / "results" / name).read_text())
        for system, row in r["rows"].items():
            m = row["median"]
            lines.append(f"| {label}, load {r['load']:.0f} | {'Flower 1.41 FedAvg (bench/flower_baseline.py)' if system == 'flower' else 'fedmq fedasync'} "
                         f"| {_spread(m['updates_after_first_s'], ' s')} | {_spread(m['to_target_after_first_s'], ' s')} "
                         f"| {_spread(m['model_downloads_per_update'], '')} "
                         f"| {_spread(m['cpu_ms_per_update_second_to_last'], ' ms')} |")
    return "\n".join(lines)


def test_the_first_aggregation_table_is_the_results_files():
    md = (ROOT / "docs" / "benchmarks.md").read_text()
    assert table() in md
    for _, name in FILES:
        r = json.loads((ROOT / "bench" / "results" / name).read_text())
        assert r["seeds"] >= 3 and all(len(row["runs"]) == r["seeds"] for row in r["rows"].values())


def test_the_change_policy_is_faster_after_the_first_aggregation_and_the_device_cheaper_than_flower():
    """What section 15 claims: fewer seconds to the 400th update than the clock, CPU per update below Flower's."""
    before = json.loads((ROOT / "bench/results/first_aggregation-before.json").read_text())["rows"]
    after = json.loads((ROOT / "bench/results/first_aggregation.json").read_text())["rows"]["coordinator defaults"]["median"]
    clock = before["coordinator defaults"]["median"]
    assert after["updates_after_first_s"]["median"] < clock["updates_after_first_s"]["median"] / 2
    assert after["cpu_ms_per_update_second_to_last"]["median"] < before["flower"]["median"]["cpu_ms_per_update_second_to_last"]["median"]
