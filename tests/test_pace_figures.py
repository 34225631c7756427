"""docs/benchmarks.md section 14 quotes bench/results/pace.json (one coordinator) and bench/results/pace_tier.json
(the scale-out tier's root steering) exactly, and the steering held in those runs."""

from __future__ import annotations

import json

from fleet import ROOT


def table(runs: list[dict], tier: bool = False) -> str:
    """The section's table, one row per fleet size, as docs/benchmarks.md shows it (the tier's adds the
    agents heard from unsteered, the root's count of agents online steered, and the machine's load)."""
    extra = " unsteered agents heard | steered agents online (root's count) | load (1 min) unsteered / steered |"
    lines = ["| agents | unsteered updates/s | unsteered model downloads/s | steered interval | steered updates/s "
             "| steered model downloads/s | steered model KiB/s |" + extra * tier, "|---|---|---|---|---|---|---|"
             + "---|---|---|" * tier]
    for n in sorted({r["agents"] for r in runs}):
        free = next(r for r in runs if r["agents"] == n and not r["steered"])
        paced = next(r for r in runs if r["agents"] == n and r["steered"])
        lines.append(f"| {n} | {free['updates_per_s']:g} | {free['model_downloads_per_s']:g} | "
                     f"{paced['report_interval_s']:g} s | {paced['updates_per_s']:g} | "
                     f"{paced['model_downloads_per_s']:g} | {paced['model_kib_per_s']:g} |"
                     + (f" {free['agents_folded']} | {paced['agents_online']} | {free['load_avg_1m']:g} / "
                        f"{paced['load_avg_1m']:g} |" if tier else ""))
    return "\n".join(lines)


def test_the_pace_table_is_the_results_file_and_the_rate_held():
    r = json.loads((ROOT / "bench/results/pace.json").read_text())
    md = (ROOT / "docs/benchmarks.md").read_text()
    assert f"`{r['command']} --out bench/results/pace.json`" in md or f"`{r['command']}`" in md
    assert table(r["runs"]) in md
    steered = [x for x in r["runs"] if x["steered"]]
    assert len(steered) >= 3
    for x in steered:  # what the section claims: near the target at every size
        assert 0.7 * x["target_updates_per_s"] <= x["updates_per_s"] <= 1.4 * x["target_updates_per_s"], x


def summary_row(r: dict, what: str = "pace steering", free_downloads: bool = False) -> str:
    """The row of the summary table at the top of docs/benchmarks.md (the tier's also gives the unsteered
    downloads/s: there the unsteered updates/s are bounded by the machine, the downloads are not)."""
    steered = sorted((x for x in r["runs"] if x["steered"]), key=lambda x: x["agents"])
    free = sorted((x for x in r["runs"] if not x["steered"]), key=lambda x: x["agents"])
    sizes = " / ".join(str(x["agents"]) for x in steered)
    return (f"| 14 | {what}, {sizes} agents | `{r['command']}` | updates/s and model downloads/s near "
            f"`--target-updates-per-s {steered[0]['target_updates_per_s']:g}` as the fleet grows | steered "
            + " / ".join(f"{x['updates_per_s']:g}" for x in steered) + " updates/s, "
            + " / ".join(f"{x['model_downloads_per_s']:g}" for x in steered) + " downloads/s; unsteered "
            + " / ".join(f"{x['updates_per_s']:g}" for x in free) + " updates/s"
            + (", " + " / ".join(f"{x['model_downloads_per_s']:g}" for x in free) + " downloads/s" if free_downloads
               else "") + " | met |")


def test_the_summary_row_is_the_results_file():
    r = json.loads((ROOT / "bench/results/pace.json").read_text())
    assert summary_row(r) in (ROOT / "docs/benchmarks.md").read_text()


def test_the_tier_table_is_the_results_file_and_the_root_steered():
    r = json.loads((ROOT / "bench/results/pace_tier.json").read_text())
    md = (ROOT / "docs/benchmarks.md").read_text()
    assert f"`{r['command']}`" in md
    assert table(r["runs"], tier=True) in md
    steered = [x for x in r["runs"] if x["steered"]]
    assert len(steered) >= 3 and max(x["agents"] for x in steered) >= 100
    for x in steered:  # what the section claims: the root counted the whole fleet, the rates near the target
        assert x["agents_online"] == x["agents"], x
        assert 0.7 * x["target_updates_per_s"] <= x["updates_per_s"] <= 1.4 * x["target_updates_per_s"], x
        assert x["model_downloads_per_s"] <= 1.5 * x["target_updates_per_s"], x


def test_the_tier_summary_row_is_the_results_file():
    r = json.loads((ROOT / "bench/results/pace_tier.json").read_text())
    assert summary_row(r, "pace steering through the scale-out tier's root", free_downloads=True) \
        in (ROOT / "docs/benchmarks.md").read_text()
