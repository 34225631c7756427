"""docs/benchmarks.md quotes bench/results/schema_fleet.json exactly (summary row, section 12 table)."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATASETS = ("wine", "breast_cancer", "digits")


def test_the_schema_fleet_table_and_summary_are_the_results_file():
    r = json.loads((ROOT / "bench/results/schema_fleet.json").read_text())
    md = (ROOT / "docs/benchmarks.md").read_text()
    d = r["datasets"]
    summary = "; ".join(f"{n}: {d[n]['schema_fleet']['accuracy']:.4f} vs {d[n]['ceiling']['accuracy']:.4f}"
                        for n in DATASETS)
    assert f"{summary} (means of {r['seeds']} seeds)" in md
    for n in DATASETS:
        c = d[n]
        seeds = ", ".join(f"{x:.4f}" for x in c["schema_fleet"]["per_seed"])
        assert f"| {n} | {c['ceiling']['accuracy']:.4f} | {c['schema_fleet']['accuracy']:.4f} | " \
               f"{c['gap_points']:.2f} | {seeds} |" in md, n
        assert c["gap_points"] <= 2, f"{n}: more than 2 points below the ceiling"
    wine = re.search(r"Wine is above it \((\S+) against (\S+):", md).groups()
    assert wine == (f"{d['wine']['schema_fleet']['accuracy']:.4f}", f"{d['wine']['ceiling']['accuracy']:.4f}")
    assert d["wine"]["gap_points"] < 0
