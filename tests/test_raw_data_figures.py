"""docs/benchmarks.md quotes bench/results/raw_data.json exactly (summary row, section 8 table, prose)."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATASETS = ("wine", "breast_cancer", "digits")


def _data() -> tuple[dict, str]:
    return json.loads((ROOT / "bench/results/raw_data.json").read_text()), (ROOT / "docs/benchmarks.md").read_text()


def test_the_raw_data_table_is_the_results_file():
    r, md = _data()
    for name in DATASETS:
        c = r["datasets"][name]
        cells = [f"{c[k]['accuracy']:.4f}" for k in ("ceiling", "federated", "late_joiners", "raw_no_statistics",
                                                     "per_agent_skew")]
        assert f"| {name} | {' | '.join(cells)} | {c['gap_points']:.2f} |" in md, name
        assert abs(c["gap_points"]) <= 2 or c["gap_points"] < 0, f"{name}: more than 2 points below the ceiling"


def test_the_summary_row_and_prose_are_the_results_file():
    r, md = _data()
    d = r["datasets"]
    row = "; ".join(f"{n}: {d[n]['federated']['accuracy']:.4f} vs {d[n]['ceiling']['accuracy']:.4f}" for n in DATASETS)
    assert row in md
    losses = [100 * (d[n]["federated"]["accuracy"] - d[n]["raw_no_statistics"]["accuracy"]) for n in DATASETS]
    low, high = re.search(r"the same fleet loses (\d+) to (\d+) points", md).groups()
    assert (int(low), int(high)) == (round(min(losses)), round(max(losses)))
    assert f"means of {r['seeds']} seeds" in md
