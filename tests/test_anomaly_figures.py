"""docs/benchmarks.md quotes bench/results/anomaly.json exactly (summary row, section 11 table and prose)."""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _data() -> tuple[dict, str]:
    return json.loads((ROOT / "bench/results/anomaly.json").read_text()), (ROOT / "docs/benchmarks.md").read_text()


def test_the_anomaly_table_and_summary_row_are_the_results_file():
    r, md = _data()
    fed, central = r["federated"], r["centralized"]
    assert f"federated {fed['roc_auc']:.4f} vs centralized {central['roc_auc']:.4f} (means of {r['seeds']} seeds)" in md
    for name, row in (("centralized twin", central), ("federated, unlabeled agents", fed)):
        cells = ", ".join(f"{x:.4f}" for x in row["per_seed"])
        assert f"| {name} | {row['roc_auc']:.4f} | {cells} |" in md, name
    assert len(central["per_seed"]) == len(fed["per_seed"]) == r["seeds"]


def test_the_anomaly_prose_is_the_results_file_and_the_target_holds():
    r, md = _data()
    fed, central = r["federated"], r["centralized"]
    gap = round(central["roc_auc"] - fed["roc_auc"], 4)
    assert gap == r["gap_roc_auc"] and f"The gap (centralized minus federated) is {gap}:" in md
    assert gap <= 0.03, "the federated one-class model is more than 0.03 ROC AUC below its centralized twin"
    above = all(f > c for f, c in zip(fed["per_seed"], central["per_seed"]))
    assert ("above its twin on every seed" in md) == above
    assert f"flags {fed['flagged_eval']:.4f} of the test rows ({fed['flagged_agents']:.4f} of the" in md


def test_the_unshifted_twin_is_quoted_from_the_results_file():
    r, md = _data()
    seeds = ", ".join(f"{x:.4f}" for x in r["centralized_no_shift"]["per_seed"])
    assert f"(`centralized_no_shift` in the JSON) scores {seeds} on the five seeds".replace(" ", "") in \
        md.replace("\n", "").replace(" ", "")
