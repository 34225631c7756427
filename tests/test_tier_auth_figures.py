"""docs/architecture.md's cost of per-device identity on the tier is bench/results/tier_auth.json (bench/tier_auth.py):
the sentence is rebuilt from the file and must be there word for word, and the run refused every device while the
auth service was down after about the nodes' auth timeout."""

from __future__ import annotations

import json

from fleet import ROOT
from tier.cluster import AUTH_TIMEOUT_S


def sentence(r: dict) -> str:
    callout, shared, storm = r["auth_callout"], r["shared_device_user"], r["storm"]
    down = r["refused_while_auth_down_s"]
    return (f"What it costs (`{r['command']}`, one node, load {r['load_avg_1m_start']:g}): a connect took "
            f"{callout['p50_ms']:g} ms (p50; p90 {callout['p90_ms']:g} ms) through the callout against "
            f"{shared['p50_ms']:g} ms (p90 {shared['p90_ms']:g} ms) as the shared device user; {storm['devices']} "
            f"devices connecting at once were all in within {storm['seconds']:g} s, at "
            f"{storm['auth_cpu_ms_per_connect']:g} ms of the service's CPU per connect; with the service down a "
            f"device's refusal came after {min(down):g}-{max(down):g} s (the auth timeout). In the service an answer "
            f"took {r['answer_cpu_ms']['sealed']:g} ms of CPU with the request and answer sealed (its xkey) against "
            f"{r['answer_cpu_ms']['plain']:g} ms in the clear, the PBKDF2 check in both.")


def test_the_cost_sentence_is_the_results_file():
    r = json.loads((ROOT / "bench" / "results" / "tier_auth.json").read_text())
    assert r["connects"] >= 100 and r["storm"]["devices"] >= 100
    assert all(AUTH_TIMEOUT_S - 0.5 <= s <= AUTH_TIMEOUT_S + 2 for s in r["refused_while_auth_down_s"])
    text = " ".join((ROOT / "docs" / "architecture.md").read_text().split())
    assert sentence(r) in text, sentence(r)
