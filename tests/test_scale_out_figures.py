"""Issue 20, point 6: the scale-out figures in docs/benchmarks.md are bench/results/scale_out.json's,
rendered by bench/scale_out.py's own `markdown` (so a rerun that changes a figure fails here until
the page is regenerated)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_benchmarks_page_shows_the_scale_out_results():
    sys.path.insert(0, str(ROOT / "bench"))
    from scale_out import markdown

    result = json.loads((ROOT / "bench" / "results" / "scale_out.json").read_text())
    page = (ROOT / "docs" / "benchmarks.md").read_text()
    assert markdown(result) in page
    assert all(c["connections_held"] > 0 for c in result["connections"])
    assert all(r["folded"] == r["updates"] for r in result["tier"])
    if "sustained" in result:
        s = result["sustained"]
        assert s["lost"] == 0 and s["counted_twice"] == 0, "the sustained run's figures are of a run that lost updates"
        assert s["slow_consumer_session_closes"] == 0 and s["store_timeout_session_closes"] == 0, \
            "the sustained run's partition sessions were cut"
    for p in result.get("sustained_probes", []):
        assert p["lost"] == 0 and p["counted_twice"] == 0, f"the {p['rate_asked']:g}/s probe lost updates"
    if "kills" in result:
        k = result["kills"]
        for victim in ("worker", "root", "nats"):
            r = k[victim]
            assert len(r["recovery_s"]) == k["kills_per_kind"] and r["max_s"] == max(r["recovery_s"]), victim
            assert r["lost"] == 0 and r["counted_twice"] == 0, f"the {victim} kill figures are of a run that lost updates"
