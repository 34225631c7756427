"""Measured figures quoted in README.md and docs/ are the ones in bench/results/*.json.

Each quoted figure is a claim below: a pattern with the figure in its first group, in a given
file, and the value it must show, formatted from its results file. A claim whose phrase is
gone fails too (reword the claim here with the doc). README.md's prose is also swept: a
number with a unit of measure (bytes, KB, MB, updates/s, %, x) that no claim covers fails,
so a new figure cannot be added without its source. Tables of docs/benchmarks.md that are
one row per results entry are checked cell by cell.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def results(name: str) -> dict:
    return json.loads((RESULTS / f"{name}.json").read_text())


def throughput(n_params: int) -> dict:
    return next(r for r in results("throughput")["results"] if r["n_params"] == n_params)


def thousands(x: float) -> str:
    return f"{int(x + 0.5):,}"  # half up, as people round (Python's round(8838.5) is 8838)


def pct(x: float, digits: int = 0) -> str:
    return f"{x * 100:.{digits}f}"


# (file, pattern with the figure as group 1, expected text)
CLAIMS: list[tuple[str, str, callable]] = [
    # README.md, Benchmarks bullet
    ("README.md", r"int8 update of the 650-parameter digits model is ([\d,]+) bytes on the wire",
     lambda: thousands(results("wire")["codecs"]["int8"]["bytes_per_update"])),
    ("README.md", r"with (\d+)% of agents 10x slower", lambda: results("convergence")["stragglers"].split("%")[0]),
    ("README.md", r"fedasync reaches 0\.90\s+accuracy in ([\d.]+)x of synchronous FedAvg's time",
     lambda: f"{results('convergence')['results']['fedasync']['fraction_of_sync_time']:.2f}"),
    ("README.md", r"ends at ([\d.]+)% of centralized SGD",
     lambda: pct(results("convergence")["results"]["fedasync"]["median_final_vs_centralized"], 1)),
    ("README.md", r"aggregates ([\d,]+) int8 updates/s of 10,000 parameters",
     lambda: thousands(throughput(10000)["fedmq_coordinator"]["per_s"])),
    ("README.md", r"\((\d+)% of raw paho\)", lambda: pct(throughput(10000)["ratio"])),
    ("README.md", r"([\d,]+) virtual agents on one 2-core machine", lambda: thousands(results("scale")["agents"])),
    ("README.md", r"2-core machine at (\d+) KB each", lambda: thousands(results("scale")["memory_per_agent_kb"])),
    ("README.md", r"peaks ([\d.]+) MB above the import floor",
     lambda: f"{results('edge-x86_64')['vs_targets']['rss_over_floor_mb']:.1f}"),
    # README.md, the update format
    ("README.md", r"a 650-parameter int8 update is about ([\d,]+) bytes",
     lambda: thousands(results("wire")["codecs"]["int8"]["bytes_per_update"])),
    ("README.md", r"about [\d,]+ bytes, ([\d.]+)x smaller than its float64 parameters",
     lambda: f"{results('wire')['codecs']['int8']['ratio_message_vs_float64_params']:.1f}"),
    # README.md, the fedmq-monitor sample: 650-parameter int8 updates
    ("README.md", r"pi-\d idle 42 0 42 2/15 0s ago (\d+) ",
     lambda: thousands(results("wire")["codecs"]["int8"]["bytes_per_update"])),
    # docs/benchmarks.md, the summary table
    ("docs/benchmarks.md", r"whole message ([\d.]+)x \(delta [\d.]+x\); accuracy \+[\d.]+ pt vs float32",
     lambda: f"{results('wire')['codecs']['int8']['ratio_message_vs_float64_params']:.2f}"),
    ("docs/benchmarks.md", r"`topk:0\.02\+int4`: whole message ([\d.]+)x",
     lambda: f"{results('wire')['codecs']['topk:0.02+int4']['ratio_message_vs_float64_params']:.1f}"),
    ("docs/benchmarks.md", r"fedasync ([\d.]+)x, fedbuff [\d.]+x of fedavg's time",
     lambda: f"{results('convergence')['results']['fedasync']['fraction_of_sync_time']:.2f}"),
    ("docs/benchmarks.md", r"fedasync [\d.]+x, fedbuff ([\d.]+)x of fedavg's time",
     lambda: f"{results('convergence')['results']['fedbuff']['fraction_of_sync_time']:.2f}"),
    ("docs/benchmarks.md", r"\| ([\d,]+) updates/s, \d+% of raw", lambda: thousands(throughput(10000)["fedmq_coordinator"]["per_s"])),
    ("docs/benchmarks.md", r"updates/s, (\d+)% of raw \(", lambda: pct(throughput(10000)["ratio"])),
    ("docs/benchmarks.md", r"% of raw \(([\d,]+) msg/s\)", lambda: thousands(throughput(10000)["raw_paho"]["per_s"])),
    ("docs/benchmarks.md", r"1,000 connected in ([\d.]+) s", lambda: f"{results('scale')['all_connected_after_s']:.2f}"),
    ("docs/benchmarks.md", r"connected in [\d.]+ s, ([\d,]+) updates/s", lambda: thousands(int(results("scale")["updates_per_s"]))),
    ("docs/benchmarks.md", r"updates/s, ([\d.]+) KB per agent", lambda: f"{results('scale')['memory_per_agent_kb']:.1f}"),
    ("docs/benchmarks.md", r"\| \+([\d.]+) MB; \+[\d.]+ s; [\d.]+ ms \| met",
     lambda: f"{results('edge-x86_64')['vs_targets']['rss_over_floor_mb']:.1f}"),
    ("docs/benchmarks.md", r"\| \+([\d.]+) MB; \+[\d.]+ s; [\d.]+ ms \| see below",
     lambda: f"{results('edge-aarch64-emulated')['vs_targets']['rss_over_floor_mb']:.1f}"),
    # docs/raspberry-pi.md, the footprint table (emulated aarch64 | x86_64)
    ("docs/raspberry-pi.md", r"\| (\d+) MB \(\+\d+ over the floor\) \|",
     lambda: f"{results('edge-aarch64-emulated')['agent']['peak_rss_mb']:.0f}"),
    ("docs/raspberry-pi.md", r"over the floor\) \| \d+ MB \(\+([\d.]+)\) \|",
     lambda: f"{results('edge-x86_64')['vs_targets']['rss_over_floor_mb']:.1f}"),
    ("docs/raspberry-pi.md", r"update on the wire \(int8\) \| ([\d,]+) bytes",
     lambda: thousands(results("edge-aarch64-emulated")["agent"]["update_bytes"])),
    ("docs/raspberry-pi.md", r"update on the wire \(int8\) \| [\d,]+ bytes \| ([\d,]+) bytes",
     lambda: thousands(results("edge-x86_64")["agent"]["update_bytes"])),
]


@pytest.mark.parametrize("doc,pattern,expected", CLAIMS, ids=[f"{d}:{p[:40]}" for d, p, _ in CLAIMS])
def test_a_quoted_figure_is_its_results_file(doc, pattern, expected):
    text = " ".join((ROOT / doc).read_text().split())  # wrapped lines read as one
    found = re.findall(pattern, text)
    assert found, f"{doc}: the phrase /{pattern}/ is gone: reword the claim in tests/test_figures.py"
    for figure in found:
        assert figure == expected(), f"{doc} quotes {figure} where bench/results says {expected()} (/{pattern}/)"


_UNIT = re.compile(r"\b\d[\d,.]*\s?(?:bytes|B\b|KB|MB|GB|updates/s|msg/s|%|x\b)")


def prose(text: str) -> str:
    """Markdown without fenced code blocks (command lines, sample output, help texts)."""
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def test_every_figure_in_the_readme_prose_is_a_claim():
    text = " ".join(prose((ROOT / "README.md").read_text()).split())
    covered = []
    for doc, pattern, _ in CLAIMS:
        if doc == "README.md":
            covered += [m.span(1) for m in re.finditer(pattern, text)]
    loose = [m.group(0) for m in _UNIT.finditer(text)
             if not any(a <= m.start() < b or m.start() <= a < m.end() for a, b in covered)]
    # not measurements: sizes the protocol defines, limits, targets and ratios of the spec
    allowed = {"8 MiB", "0.5 pt"}
    loose = [f for f in loose if f not in allowed and not re.fullmatch(r"\d+x", f)]
    assert not loose, f"README.md quotes figures no claim in tests/test_figures.py ties to bench/results: {loose}"


def test_figures_about_other_projects_name_their_source():
    for doc in ["README.md", *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md"))]:
        text = " ".join((ROOT / doc).read_text().split())
        for m in re.finditer(r"(Flower|FedML|PySyft|TensorFlow Federated|NVFlare|OpenFL)[^.\n]*\d[\d,]*", text):
            line = text[max(0, m.start() - 300):m.end() + 300]
            assert re.search(r"https?://", line), f"{doc}: a figure about another project with no source: {m.group(0)!r}"


def test_wire_table_is_the_results_file():
    text = (ROOT / "docs" / "benchmarks.md").read_text()
    for codec, r in results("wire")["codecs"].items():
        row = re.search(rf"^\| {re.escape(codec)} \| ([^|]+) \| ([^|]+) \|", text, re.M)
        assert row, f"docs/benchmarks.md has no wire row for {codec}"
        assert row.group(1).strip() == thousands(r["bytes_per_update"]), (codec, row.group(1))
        assert row.group(2).strip() == thousands(r["encoded_delta_bytes"]), (codec, row.group(2))


def test_throughput_table_is_the_results_file():
    text = (ROOT / "docs" / "benchmarks.md").read_text()
    for r in results("throughput")["results"]:
        row = re.search(rf"^\| {r['n_params']:,} \| ([\d,]+) B \| ([\d,]+) \| ([\d,]+) \| ([\d.]+) \|", text, re.M)
        assert row, f"docs/benchmarks.md has no throughput row for {r['n_params']:,} parameters"
        assert row.groups() == (thousands(r["payload_bytes"]), thousands(r["raw_paho"]["per_s"]),
                                thousands(r["fedmq_coordinator"]["per_s"]), f"{r['ratio']:.2f}"), row.groups()


def test_security_quotes_the_sybil_results_exactly():
    """docs/security.md's Sybil table is bench/results/sybil.json (seen red on a changed cell)."""
    data = results("sybil")
    text = (ROOT / "docs" / "security.md").read_text()
    labels = {"mean": "mean", "trimmed-mean+norm-reject": "trimmed-mean:0.2 + norm-factor 2 (reject)",
              "median+norm-reject": "median + norm-factor 2 (reject)"}
    for name, label in labels.items():
        cells = " | ".join(f"{data['results'][name][k]['accuracy']:.4f}" for k in ("3", "6", "9", "12", "15", "20"))
        assert f"| {label} | {cells} |" in text, name
    assert f"reaches {data['all_honest_accuracy']:.4f}" in text
