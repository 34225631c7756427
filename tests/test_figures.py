"""Measured figures quoted in README.md and docs/ are the ones in bench/results/*.json.

Each quoted figure is a claim below: a pattern with the figure in its first group, in a given
file, and the value it must show, formatted from its results file. A claim whose phrase is
gone fails too (reword the claim here with the doc). README.md's prose is also swept: a
number with a unit of measure (bytes, KB, MB, updates/s, %, x) that no claim covers fails,
so a new figure cannot be added without its source. A figure about another project needs a
link, or our own measurement of it (a bench/ script or results file) next to it. Tables of docs/benchmarks.md that are
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


KILL_KINDS = ("worker", "root", "nats")


def kill_row(i: int) -> str:
    """The summary row's kill figures, 'worst W s / R s / N s (medians W / R / N s)', the i-th of them captured."""
    fields = [r"[\d.]+"] * 6
    fields[i] = r"([\d.]+)"
    return r"\| worst {} s / {} s / {} s \(medians {} / {} / {} s\)".format(*fields)


def sustained() -> dict:
    return results("scale_out")["sustained"]


CORE = "core NATS"  # bench/scale_out.py AGENT_ACKS: the runs with the workers' acks as core NATS messages


def old_sustained() -> dict:
    """The 10-minute run made while the acks were retained QoS 1 messages (kept among the probes)."""
    return probe(400, 100_000, seconds=600.0)


def probe(rate: float, devices: int, acks: str = "retained QoS 1", seconds: float = 60.0) -> dict:
    return next(p for p in results("scale_out")["sustained_probes"] if p["rate_asked"] == rate and p["devices"] == devices
                and p.get("agent_acks", "retained QoS 1") == acks and p["seconds_asked"] == seconds)


def throughput(n_params: int) -> dict:
    return next(r for r in results("throughput")["results"] if r["n_params"] == n_params)


def thousands(x: float) -> str:
    return f"{int(x + 0.5):,}"  # half up, as people round (Python's round(8838.5) is 8838)


def pct(x: float, digits: int = 0) -> str:
    return f"{x * 100:.{digits}f}"


# the small-device profile of docs/architecture.md, as bench/async_advantage.py names it
PROFILE = "fedbuff memory lr2 int4 ack5"


def profile_vs_flower(key: str) -> float:
    """The profile's median `key` over Flower FedAvg's, in bench/results/async_advantage.json."""
    summary = results("async_advantage")["summary"]
    return summary[PROFILE][key]["median"] / summary["Flower FedAvg"][key]["median"]


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
    ("README.md", r"reached (\d+)% of the centralized ceiling in",
     lambda: pct(max(results("async_advantage")["fractions_of_ceiling"]))),
    ("README.md", r"95% of the centralized ceiling in ([\d.]+)x Flower FedAvg's time",
     lambda: f"{profile_vs_flower('time_to_95_s'):.2f}"),
    ("README.md", r"Flower FedAvg's time at ([\d.]+)x its device\s+bytes",
     lambda: f"{profile_vs_flower('device_bytes_to_95'):.2f}"),
    ("README.md", r"final accuracy ([\d.]+) against [\d.]+ \(medians of 3 seeds",
     lambda: f"{results('async_advantage')['summary'][PROFILE]['final_accuracy']['median']:.4f}"),
    ("README.md", r"final accuracy [\d.]+ against ([\d.]+) \(medians of 3 seeds",
     lambda: f"{results('async_advantage')['summary']['Flower FedAvg']['final_accuracy']['median']:.4f}"),
    # docs/protocol.md, the update format (moved from README.md)
    ("docs/protocol.md", r"a 650-parameter int8 update is about ([\d,]+) bytes",
     lambda: thousands(results("wire")["codecs"]["int8"]["bytes_per_update"])),
    ("docs/protocol.md", r"about [\d,]+ bytes, ([\d.]+)x smaller than its float64 parameters",
     lambda: f"{results('wire')['codecs']['int8']['ratio_message_vs_float64_params']:.1f}"),
    # docs/models-and-data.md, the model codecs (moved from README.md)
    ("docs/models-and-data.md", r"digits: ([\d,]+) -> [\d,]+ bytes per model",
     lambda: thousands(results("model_codec")["results"]["digits"]["float32"]["model_bytes"])),
    ("docs/models-and-data.md", r"digits: [\d,]+ -> ([\d,]+) bytes per model",
     lambda: thousands(results("model_codec")["results"]["digits"]["int8"]["model_bytes"])),
    # docs/monitoring.md, the fedmq-monitor sample: 650-parameter int8 updates
    ("docs/monitoring.md", r"pi-\d idle 42 0 42 2/15 0s ago (\d+) ",
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
    # the scale-out tier's kill recoveries (bench/scale_out.py --only kills): worst and median per kind
    *[("docs/benchmarks.md", kill_row(i), lambda i=i: str(results("scale_out")["kills"][KILL_KINDS[i % 3]][
        ("max_s", "median_s")[i // 3]])) for i in range(6)],
    # the scale-out tier's sustained rate (bench/scale_out.py --only sustained): the summary row and section 13's prose
    ("docs/benchmarks.md", r"\| ([\d,]+) updates/s for 600 s from 100,000 device ids",
     lambda: thousands(int(sustained()["rate_asked"]))),
    ("docs/benchmarks.md", r"for 600 s from 100,000 device ids: ([\d,]+) sent, 0 lost, 0 counted twice, 0 sessions cut",
     lambda: thousands(sustained()["sent"])),
    ("docs/benchmarks.md", r"The tier sustained ([\d,]+) updates/s from 100,000", lambda: thousands(int(sustained()["rate_asked"]))),
    ("docs/benchmarks.md", r"device ids for 600 s: ([\d,]+) sent, every one folded", lambda: thousands(sustained()["sent"])),
    ("docs/benchmarks.md", r"no partition session cut, the backlog at the end ([\d.]+) s", lambda: str(sustained()["drain_s"])),
    ("docs/benchmarks.md", r"The 10-minute run's p99 of (\d+) s", lambda: str(round(sustained()["latency_p99_s"]))),
    ("docs/benchmarks.md", r"device connections NATS cut in that run \(([\d,]+), at load up to [\d.]+\)",
     lambda: thousands(sustained()["device_reconnects"])),
    ("docs/benchmarks.md", r"device connections NATS cut in that run \([\d,]+, at load up to ([\d.]+)\)",
     lambda: f"{sustained()['load_avg_1m_end']:.0f}"),
    ("docs/benchmarks.md", r"at 800/s from 100,000 ids the folds fell\s+behind \(the backlog ([\d.]+) s after 60 s",
     lambda: str(probe(800, 100_000)["drain_s"])),
    ("docs/benchmarks.md", r"at 1,200/s asked NATS took ([\d,]+)/s", lambda: thousands(round(probe(1200, 100_000)["sent_per_s"]))),
    ("docs/benchmarks.md", r"NATS took [\d,]+/s and cut ([\d,]+)\s+device connections",
     lambda: thousands(probe(1200, 100_000)["device_reconnects"])),
    ("docs/benchmarks.md", r"the same 800/s from 200 ids kept up \(backlog ([\d.]+) s", lambda: str(probe(800, 200)["drain_s"])),
    # the acks as core NATS messages (docs/architecture.md, "Acks on the tier") against the retained 10-minute run
    ("docs/benchmarks.md", r"at a\s+lower load, had ([\d,]+) device connections cut", lambda: thousands(old_sustained()["device_reconnects"])),
    ("docs/benchmarks.md", r"store timeout against ([\d,]+), a p50", lambda: thousands(sustained()["device_reconnects"])),
    ("docs/benchmarks.md", r"a p50 send-to-fold of\s+([\d.]+) s against", lambda: str(old_sustained()["latency_p50_s"])),
    ("docs/benchmarks.md", r"s against ([\d.]+) s, and the tier's memory", lambda: str(sustained()["latency_p50_s"])),
    ("docs/benchmarks.md", r"the tier's memory at ([\d,]+) MiB against", lambda: thousands(old_sustained()["tier_rss_mib"])),
    ("docs/benchmarks.md", r"MiB against ([\d,]+) MiB \(the retained", lambda: thousands(sustained()["tier_rss_mib"])),
    ("docs/benchmarks.md", r"With core NATS acks \(load up to (\d+), other",
     lambda: f"{max(probe(r, 100_000, CORE)['load_avg_1m_end'] for r in (800, 1667)):.0f}"),
    ("docs/benchmarks.md", r"at 800/s the tier took ([\d,]+)/s", lambda: thousands(round(probe(800, 100_000, CORE)["sent_per_s"]))),
    ("docs/benchmarks.md", r"at 1,667/s it took ([\d,]+)/s", lambda: thousands(round(probe(1667, 100_000, CORE)["sent_per_s"]))),
    ("docs/benchmarks.md", r"1,667/s not reached: ([\d,]+)/s taken", lambda: thousands(round(probe(1667, 100_000, CORE)["sent_per_s"]))),
    ("docs/benchmarks.md", r"/s taken at load up to (\d+), the acks now core NATS",
     lambda: f"{max(probe(r, 100_000, CORE)['load_avg_1m_end'] for r in (800, 1667)):.0f}"),
    ("docs/benchmarks.md", r"from 200 ids kept up \(backlog [\d.]+ s, p99 ([\d.]+) s\)",
     lambda: f"{probe(800, 200)['latency_p99_s']:.1f}"),
    ("docs/architecture.md", r"advancing again at most ([\d.]+) s after a node kill",
     lambda: str(results("scale_out")["kills"]["nats"]["max_s"])),
    ("docs/architecture.md", r"after a node kill \(root kills ([\d.]+) s",
     lambda: str(results("scale_out")["kills"]["root"]["max_s"])),
    ("docs/architecture.md", r", worker kills ([\d.]+) s\); with all but",
     lambda: str(results("scale_out")["kills"]["worker"]["max_s"])),
    # docs/models-and-data.md, the int4 model codec (bench/results/model_codec.json)
    ("docs/models-and-data.md", r"and so does int4 \(([\d,]+)\s+bytes\)",
     lambda: thousands(results("model_codec")["results"]["digits"]["int4"]["model_bytes"])),
    ("docs/models-and-data.md", r"as a device holds them score ([\d.]+) points below",
     lambda: f"{100 * (results('model_codec')['results']['digits']['int4']['mean_accuracy'] - results('model_codec')['results']['digits']['int4']['mean_device_accuracy']):.2f}"),
    # docs/models-and-data.md, device bytes beside Flower (bench/results/device_bytes.json, the best row within a point)
    ("docs/models-and-data.md", r"a device pays ([\d,]+) bytes per round on digits",
     lambda: thousands(best_device_row()["total_bytes_per_round"])),
    ("docs/models-and-data.md", r"bytes per round on digits against Flower 1\.41's ([\d,]+)",
     lambda: thousands(results("device_bytes")["flower"]["total_bytes_per_round"])),
    ("docs/models-and-data.md", r"against Flower 1\.41's [\d,]+ \(([\d.]+)x fewer",
     lambda: f"{best_device_row()['bytes_ratio_vs_flower']:.1f}"),
    ("docs/models-and-data.md", r"within a point of Flower's accuracy; ([\d.]+)x fewer than\s+Flower cast to float32",
     lambda: f"{best_device_row()['bytes_ratio_vs_flower_float32']:.1f}"),
    ("docs/models-and-data.md", r"Flower cast to float32, whose ([\d,]+) bytes per round",
     lambda: thousands(results("device_bytes")["flower_float32"]["total_bytes_per_round"])),
    # docs/models-and-data.md, the 1,000,100-parameter rows of bench/results/device_bytes.json
    ("docs/models-and-data.md", r"a device pays ([\d,]+) bytes per round at that size",
     lambda: thousands(results("device_bytes")["large"]["fedmq"][1]["total_bytes_per_round"])),
    ("docs/models-and-data.md", r"bytes per round at that size against Flower 1\.41's ([\d,]+)",
     lambda: thousands(results("device_bytes")["large"]["flower"]["total_bytes_per_round"])),
    ("docs/models-and-data.md", r"and ([\d,]+) with `--min-model-interval 2`",
     lambda: thousands(results("device_bytes")["large"]["fedmq"][2]["total_bytes_per_round"])),
    # docs/models-and-data.md, the model codec paragraph
    ("docs/models-and-data.md", r"digits: ([\d,]+) -> [\d,]+\s+bytes per model",
     lambda: thousands(results("model_codec")["results"]["digits"]["float32"]["model_bytes"])),
    ("docs/models-and-data.md", r"digits: [\d,]+ -> ([\d,]+)\s+bytes per model",
     lambda: thousands(results("model_codec")["results"]["digits"]["int8"]["model_bytes"])),
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


# README.md and the pages that took its text when it was cut down (issue 22): swept alike
SWEPT = ["README.md", "docs/protocol.md", "docs/models-and-data.md", "docs/monitoring.md", "docs/hardening.md",
         "docs/cli.md"]


@pytest.mark.parametrize("doc", SWEPT)
def test_every_figure_in_the_readme_prose_is_a_claim(doc):
    text = " ".join(prose((ROOT / doc).read_text()).split())
    covered = []
    for claimed, pattern, _ in CLAIMS:
        if claimed == doc:
            covered += [m.span(1) for m in re.finditer(pattern, text)]
    loose = [m.group(0) for m in _UNIT.finditer(text)
             if not any(a <= m.start() < b or m.start() <= a < m.end() for a, b in covered)]
    # not measurements: sizes the protocol defines (the broker's packet limit, an ack's bound), limits,
    # targets a test asserts (one message's memory, tests/test_hostile_topics.py) and ratios of the spec
    allowed = {"8 MiB", "0.5 pt", "256 bytes", "32 MB"}
    loose = [f for f in loose if f not in allowed and not re.fullmatch(r"\d+x", f)]
    assert not loose, f"{doc} quotes figures no claim in tests/test_figures.py ties to bench/results: {loose}"


def test_figures_about_other_projects_name_their_source():
    for doc in ["README.md", *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md"))]:
        text = " ".join((ROOT / doc).read_text().split())
        for m in re.finditer(r"(Flower|FedML|PySyft|TensorFlow Federated|NVFlare|OpenFL)[^.\n]*\d[\d,]*", text):
            line = text[max(0, m.start() - 300):m.end() + 300]
            # a source: a link, or our own measurement of it (a bench/ script or its results file)
            assert re.search(r"https?://|bench/(results/)?[\w-]+\.(json|py)", line), \
                f"{doc}: a figure about another project with no source: {m.group(0)!r}"


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


POISONING_LABELS = {"mean": "`mean` (plain averaging)", "median": "`median`", "trimmed-mean": "`trimmed-mean:0.2`",
                    "mean+norm-clip": "`mean`, norm bound, clip", "mean+norm-reject": "`mean`, norm bound, reject",
                    "median+norm-reject": "`median`, norm bound, reject",
                    "trimmed-mean+norm-reject": "**`trimmed-mean:0.2`, norm bound, reject**"}


def poisoning_rows(name: str = "poisoning") -> list[str]:
    """docs/security.md's defence x attack table from bench/results/<name>.json: accuracy and points against
    the all-honest plain mean (`python -c "import tests.test_figures as t; print(*t.poisoning_rows(), sep=chr(10))"`)."""
    data = results(name)
    rows = []
    for defence, label in POISONING_LABELS.items():
        cells = []
        for attack in ("none", *data["attacks"]):
            c = data["results"][attack][defence]
            reference = attack == "none" and defence == "mean"
            cells.append(f"{c['accuracy']:.3f}" + ("" if reference else f" ({c['points_vs_all_honest_mean']:+.1f})"))
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    return rows


def test_security_poisoning_table_is_the_results_file():
    """docs/security.md's poisoning table is bench/results/poisoning.json, cell by cell (seen red on a changed cell)."""
    text = (ROOT / "docs" / "security.md").read_text()
    data = results("poisoning")
    assert f"against the all-honest plain mean ({data['all_honest_mean_accuracy']:.3f})" in text
    for row in poisoning_rows():
        assert row in text, f"docs/security.md lacks the row bench/results/poisoning.json gives: {row!r}"


def norm_lockout_rows() -> list[str]:
    """docs/security.md's lock-out table from bench/results/norm_lockout.json, one row per (fleet, rule)
    (`python -c "import tests.test_figures as t; print(*t.norm_lockout_rows(), sep=chr(10))"`)."""
    data = results("norm_lockout")
    rows = []
    for fleet, cells in data["results"].items():
        for rule, c in cells.items():
            sent = c["attack_accepted"] + c["attack_refused"]
            attack = f"{c['attack_accepted']} of {sent}" if sent else "-"
            rows.append(f"| {fleet} | {rule} | {c['honest_refused']:,} of {c['honest_updates']:,} | "
                        f"{c['runs_with_an_agent_locked_out']} of {data['seeds']} | {c['shrunk']} | {attack} | {c['accuracy']:.3f} |")
    return rows


def test_security_lockout_table_is_the_results_file():
    """docs/security.md's honest-outlier table is bench/results/norm_lockout.json, row by row."""
    text = (ROOT / "docs" / "security.md").read_text()
    for row in norm_lockout_rows():
        assert row in text, f"docs/security.md lacks the row bench/results/norm_lockout.json gives: {row!r}"


def pi_footprint_rows() -> list[str]:
    """docs/raspberry-pi.md's footprint table, row by row, from bench/results/edge-*.json
    (`python -c "import tests.test_figures as t; print(*t.pi_footprint_rows(), sep=chr(10))"`)."""
    arm, x86 = results("edge-aarch64-emulated"), results("edge-x86_64")
    disk = arm["install"]

    def ms(x: float) -> str:
        return f"{x:.0f}" if x >= 10 else f"{x:.1f}" if x >= 1 else f"{x:.2f}"

    return [
        f"| venv on disk (numpy, scipy, scikit-learn, paho-mqtt, msgpack, fedmq) | {disk['venv_mb']:.0f} MB, of which "
        f"scipy {disk['scipy_mb']:.0f}, numpy {disk['numpy_mb']:.0f}, scikit-learn {disk['scikit_learn_mb']:.0f}, "
        f"fedmq {disk['fedmq_mb']:.1f} | |",
        f"| `scripts/pi-root install`: pip install fedmq into a venv that has the dependencies | "
        f"{disk['pip_install_fedmq_s']:.1f} s | |",
        f"| `python -c pass` (the interpreter; emulated: with qemu) | {arm['floor']['bare_python_rss_mb']:.0f} MB | "
        f"{x86['floor']['bare_python_rss_mb']:.1f} MB |",
        f"| import floor: numpy + sklearn.linear_model + paho + msgpack | {arm['floor']['peak_rss_mb']:.0f} MB, "
        f"{arm['floor']['import_s']:.1f} s | {x86['floor']['peak_rss_mb']:.1f} MB, {x86['floor']['import_s']:.2f} s |",
        f"| `fedmq-agent` peak RSS, 10,000-parameter model, 500 rows x 999 features | {arm['agent']['peak_rss_mb']:.0f} MB "
        f"(+{arm['vs_targets']['rss_over_floor_mb']:.1f} over the floor) | {x86['agent']['peak_rss_mb']:.0f} MB "
        f"(+{x86['vs_targets']['rss_over_floor_mb']:.1f}) |",
        f"| start to first update at the broker (model already retained) | {arm['agent']['first_update_s']:.1f} s | "
        f"{x86['agent']['first_update_s']:.2f} s |",
        f"| one local round: partial_fit epoch over 500 rows, 10,000 parameters | {ms(arm['per_update']['train_ms_median'])} ms | "
        f"{ms(x86['per_update']['train_ms_median'])} ms |",
        f"| int8 encode with error feedback, 10,000 parameters | {ms(arm['per_update']['encode_ms_median'])} ms | "
        f"{ms(x86['per_update']['encode_ms_median'])} ms |",
        f"| update on the wire (int8) | {thousands(arm['agent']['update_bytes'])} bytes | "
        f"{thousands(x86['agent']['update_bytes'])} bytes |",
    ]


INSTALL_LABELS = {None: "`pip install fedmq` (the agent)",
                  "dp": "`pip install 'fedmq[dp]'` (`--dp-*`, `--stats-noise`)",
                  "secagg": "`pip install 'fedmq[secagg]'` (`--secure-aggregation`)"}


def pi_extras_rows() -> list[str]:
    """docs/raspberry-pi.md's table of what each extra costs, from bench/results/install-x86_64.json."""
    data = results("install-x86_64")
    base = data["base"]
    rows = [f"| {INSTALL_LABELS[None]} | {base['venv_mb']:.1f} MB | | {', '.join(base['added'])} |"]
    for extra, cell in data["extras"].items():
        rows.append(f"| {INSTALL_LABELS[extra]} | {cell['venv_mb']:.1f} MB | +{cell['extra_mb']:.1f} MB | "
                    f"{', '.join(cell['extra_packages'])} |")
    return rows


def test_pi_extras_table_is_the_results_file():
    text = (ROOT / "docs" / "raspberry-pi.md").read_text()
    for row in pi_extras_rows():
        assert row in text.splitlines(), f"docs/raspberry-pi.md lacks, from bench/results/install-x86_64.json:\n{row}"


def test_pi_footprint_table_is_the_results_files():
    text = (ROOT / "docs" / "raspberry-pi.md").read_text()
    table = [l for l in text.splitlines() if l.startswith("| ") and not l.startswith("| |")]
    for row in pi_footprint_rows():
        label = row.split(" | ")[0]
        quoted = next((l for l in table if l.split(" | ")[0] == label), None)
        assert quoted == row, f"docs/raspberry-pi.md: {quoted!r}\nbench/results says: {row!r}"


def test_every_figure_in_the_pi_page_prose_is_in_the_table():
    """Outside its table and code blocks docs/raspberry-pi.md quotes no measured figure."""
    text = prose((ROOT / "docs" / "raspberry-pi.md").read_text())
    text = "\n".join(l for l in text.splitlines() if not l.startswith("|"))
    loose = [m.group(0) for m in _UNIT.finditer(" ".join(text.split()))]
    assert not loose, f"docs/raspberry-pi.md quotes figures outside its results table: {loose}"


def _ms(x: float) -> str:
    return f"{x:.0f}" if x >= 10 else f"{x:.1f}" if x >= 1 else f"{x:.2f}"


def edge_verdict(r: dict) -> str:
    t = r["vs_targets"]
    missed = [name for name, over in (("RSS", t["rss_over_floor_mb"] > t["rss_target_mb"]),
                                      ("first update", t["first_update_over_import_floor_s"] > t["first_update_target_s"]),
                                      ("encode", t["encode_ms"] > t["encode_target_ms"])) if over]
    return "met" if not missed else "missed: " + ", ".join(missed) + " (see below)"


def edge_benchmark_rows() -> list[str]:
    """docs/benchmarks.md's edge rows (summary and section 5), from bench/results/edge-*.json."""
    x, a = results("edge-x86_64"), results("edge-aarch64-emulated")

    def summary(r: dict) -> str:
        t = r["vs_targets"]
        return (f"+{t['rss_over_floor_mb']:.1f} MB; +{t['first_update_over_import_floor_s']:.2f} s; "
                f"{_ms(t['encode_ms'])} ms | {edge_verdict(r)} |")

    return [
        "| 5 | edge footprint (x86_64) | `python bench/edge.py --repeats 3` | RSS <= floor + 20 MB; first update <= "
        f"import floor + 1 s; encode <= 10 ms | {summary(x)}",
        "| 5 | edge footprint (emulated aarch64) | `python bench/edge.py --pi-root \"$(scripts/pi-root path)\" --repeats 2` "
        f"| same | {summary(a)}",
        f"| import floor: peak RSS / time | {x['floor']['peak_rss_mb']:.1f} MB / {x['floor']['import_s']:.2f} s | "
        f"{a['floor']['peak_rss_mb']:.1f} MB / {a['floor']['import_s']:.1f} s |",
        f"| agent peak RSS (over the floor) | {x['agent']['peak_rss_mb']:.1f} MB (+{x['vs_targets']['rss_over_floor_mb']:.1f}) | "
        f"{a['agent']['peak_rss_mb']:.1f} MB (+{a['vs_targets']['rss_over_floor_mb']:.1f}) |",
        f"| start to first update (over the import floor) | {x['agent']['first_update_s']:.2f} s "
        f"(+{x['vs_targets']['first_update_over_import_floor_s']:.2f}) | {a['agent']['first_update_s']:.1f} s "
        f"(+{a['vs_targets']['first_update_over_import_floor_s']:.1f}) |",
        f"| train one round / encode int8 | {_ms(x['per_update']['train_ms_median'])} ms / "
        f"{_ms(x['per_update']['encode_ms_median'])} ms | {_ms(a['per_update']['train_ms_median'])} ms / "
        f"{_ms(a['per_update']['encode_ms_median'])} ms |",
        f"| `python -c pass` peak RSS (the interpreter; emulated: with qemu) | {x['floor']['bare_python_rss_mb']:.1f} MB | "
        f"{a['floor']['bare_python_rss_mb']:.1f} MB |",
    ]


def test_edge_rows_of_the_benchmarks_page_are_the_results_files():
    lines = (ROOT / "docs" / "benchmarks.md").read_text().splitlines()
    for row in edge_benchmark_rows():
        key = " | ".join(row.split(" | ")[:2]) if row.startswith("| 5 |") else row.split(" | ")[0]
        quoted = next((l for l in lines if l.startswith(key + " |") or l.startswith(key + " | ")), None)
        assert quoted == row, f"docs/benchmarks.md: {quoted!r}\nbench/results says: {row!r}"


def device_bytes_rows(data: dict | None = None) -> list[str]:
    """docs/benchmarks.md's device table (section 9), row by row, from bench/results/device_bytes.json
    (`data`: its "large" entry for the 1,000,100-parameter table): bytes against Flower sending
    float64 and float32, CPU per update over the same two windows for every row."""
    data = data or results("device_bytes")

    def cpu(r: dict) -> str:
        return " | ".join(f"{r['cpu_ms_per_update'][w]:.1f} ms" for w in ("first_to_last", "second_to_last"))

    rows = []
    for r in data["fedmq"]:
        rows.append(f"| fedmq, model {r['model_codec']}, update {r['codec']}, --min-model-interval {r['min_model_interval']:g} "
                    f"| {thousands(r['up_bytes_per_round'])} | {thousands(r['down_bytes_per_round'])} "
                    f"| {thousands(r['total_bytes_per_round'])} | {r['bytes_ratio_vs_flower']:.1f}x "
                    f"| {r['bytes_ratio_vs_flower_float32']:.1f}x | {cpu(r)} | {r['rss_mb']:.0f} MB | {r['accuracy']:.3f} |")
    for key in ("flower", "flower_float32"):
        f = data[key]
        rows.append(f"| Flower {f['flwr']} (bench/flower_baseline.py), FedAvg, {f['dtype']} | {thousands(f['up_bytes_per_round'])} "
                    f"| {thousands(f['down_bytes_per_round'])} | {thousands(f['total_bytes_per_round'])} "
                    f"| {data['flower']['total_bytes_per_round'] / f['total_bytes_per_round']:.1f}x "
                    f"| {data['flower_float32']['total_bytes_per_round'] / f['total_bytes_per_round']:.1f}x "
                    f"| {cpu(f)} | {f['rss_mb']:.0f} MB | {f['accuracy']:.3f} |")
    return rows


def test_device_bytes_table_is_the_results_file():
    text = (ROOT / "docs" / "benchmarks.md").read_text()
    for row in device_bytes_rows():
        assert row in text, f"docs/benchmarks.md lacks the row bench/results/device_bytes.json gives: {row!r}"
    first = results("device_bytes")["fedmq"][0]
    assert f"{first['status_messages_per_round']:.3f} status messages per round" in text
    assert f"{thousands(first['status_bytes_per_message'])} bytes each" in text


def best_device_row() -> dict:
    """The digits row with the fewest bytes per round within a point of Flower's accuracy."""
    rows = [r for r in results("device_bytes")["fedmq"] if r["accuracy_points_vs_flower"] >= -1.0]
    return min(rows, key=lambda r: r["total_bytes_per_round"])


def device_breakdown_rows() -> list[str]:
    """docs/benchmarks.md's where-the-bytes-go table (section 9): the best row's and Flower's breakdown."""
    best, flower = best_device_row(), results("device_bytes")["flower"]
    rows = []
    for who, r in (("fedmq", best), ("Flower (bench/flower_baseline.py)", flower)):
        for kind, v in r["breakdown"].items():
            rows.append(f"| {who} | {kind} | {v['bytes_per_round']:,.1f} | {v['packets_per_round']:.2f} |")
    return rows


def test_device_bytes_large_and_breakdown_tables_are_the_results_file():
    """The 1,000,100-parameter rows and the byte breakdown of section 9, cell by cell (seen red on a changed figure)."""
    text = (ROOT / "docs" / "benchmarks.md").read_text()
    for row in device_bytes_rows(results("device_bytes")["large"]) + device_breakdown_rows():
        assert row in text, f"docs/benchmarks.md lacks the row bench/results/device_bytes.json gives: {row!r}"
    best = best_device_row()
    flat = " ".join(text.split())
    assert (f"{thousands(best['total_bytes_per_round'])} bytes per round against Flower's "
            f"{thousands(results('device_bytes')['flower']['total_bytes_per_round'])}, "
            f"{best['bytes_ratio_vs_flower']:.1f}x") in flat


def test_benchmarks_quote_the_repeat_throughput_runs_exactly():
    """docs/benchmarks.md's run-to-run figures at 1e4 are the JSON's repeat runs (seen red on a changed one)."""
    text = " ".join((ROOT / "docs" / "benchmarks.md").read_text().split())
    runs = results("throughput")["repeat_runs_1e4"]["runs"]
    quoted = ", ".join(f"{thousands(r['fedmq_per_s'])} / {thousands(r['raw_paho_per_s'])}" for r in runs[:-1])
    assert f"{quoted} and {thousands(runs[-1]['fedmq_per_s'])} / {thousands(runs[-1]['raw_paho_per_s'])} updates/s" in text
    ratios = [r["ratio"] for r in runs]
    assert f"moved between {min(ratios):.2f} and {max(ratios):.2f} over three runs" in text


def secagg_rows() -> list[str]:
    """docs/benchmarks.md's secure-aggregation tables, row by row, from bench/results/secagg.json:
    in-process costs, over mosquitto (bench/secagg_mqtt.py), on the emulated aarch64 root."""
    data = results("secagg")
    x86 = {r["k"]: r for r in data["costs"]}
    rows = [f"| {r['k']} | {r['threshold']} | {r['agent_bytes_sent']} | {r['agent_bytes_received']} | {r['agent_cpu_ms']} "
            f"| {r['coordinator_cpu_ms']} | {r['round_ms']} |" for r in data["costs"]]
    rows += [f"| {r['k']} | {r['threshold']} | {r['round_ms']} | {r['round_ms_max']} | {r['coordinator_round_ms']} "
             f"| {thousands(r['agent_ip_bytes_up'])} | {thousands(r['agent_ip_bytes_down'])} "
             f"| {thousands(r['agent_payload_bytes_sent'])} | {thousands(r['agent_payload_bytes_received'])} "
             f"| {r['agent_cpu_ms']} |" for r in data["mqtt"]["results"]]
    rows += [f"| {r['k']} | {r['threshold']} | {r['agent_cpu_ms']} | {x86[r['k']]['agent_cpu_ms']} | {r['coordinator_cpu_ms']} |"
             for r in data["aarch64_emulated"]["costs"]]
    reasons = lambda d: ", ".join(f"{k} {v}" for k, v in sorted(d.items())) or "none"  # noqa: E731
    rows += [f"| {r['attack']} | {r['completed']} | {r['vs_honest'] * 100:.0f}% | "
             f"{'' if r['cohorts_with_attacker'] is None else r['cohorts_with_attacker']} | {reasons(r['excluded'])} | "
             f"{reasons(r['aborted'])} |" for r in data["hostile"]["results"]]
    return rows


def test_secagg_tables_are_the_results_file():
    text = (ROOT / "docs" / "benchmarks.md").read_text()
    for row in secagg_rows():
        assert row in text.splitlines(), f"docs/benchmarks.md lacks the row bench/results/secagg.json gives: {row!r}"
    data = results("secagg")
    prose = " ".join(text.split())
    assert f"{data['machine']}, {data['method']}" in prose
    assert f"by the root's {data['aarch64_emulated']['machine']} under qemu-user" in prose
    assert f"bench/results/secagg.json, about 30 s), {data['mqtt']['machine']}." in prose
    assert f"`hostile` entry, {data['hostile']['machine']}): {data['hostile']['method']}." in prose
    assert f"at K = 50 that alone is about 50 x {next(r for r in data['mqtt']['results'] if r['k'] == 50)['agent_cpu_ms']} ms" in prose
    acc = data["accuracy"]
    cell = lambda c: f"{c['median']:.4f} [{c['min']:.4f}, {c['max']:.4f}]"  # noqa: E731
    pc = lambda x: f"{100 * x:.1f}%"  # noqa: E731
    secure, fixed = acc["secure"], acc["secure_fixed_10"]
    assert f"(no clip, no quantization) {cell(acc['plain'])}" in prose
    assert f"the CLI defaults) {cell(secure)}, where the first round clipped {pc(secure['median_first_round_clipped'])}" in prose
    assert f"and the median round {pc(secure['median_clipped'])}, the clip ending near " \
        f"{round(sorted(r['final_clip'] for r in secure['runs'])[len(secure['runs']) // 2])}" in prose
    assert f"(the old default) {cell(fixed)}, where the first round clipped {pc(fixed['median_first_round_clipped'])} " \
        f"and the median round {pc(fixed['median_clipped'])}." in prose
    for kind in ("masked", "reveal"):
        for r in (d for d in data["dropouts"] if d["vanish_before"] == kind):
            assert f"{r['vanished']}: {'exact' if r['exact'] else 'NOT exact'} ({r['summed']} summed)" in prose


def test_model_codec_table_is_the_results_file():
    """docs/benchmarks.md section 10's codec table, cell by cell, from bench/results/model_codec.json."""
    text = (ROOT / "docs" / "benchmarks.md").read_text()
    data = results("model_codec")["results"]
    codecs = ("float32", "float16", "int8", "int4")
    for name, r in data.items():
        cells = " | ".join(f"{r[c]['mean_accuracy']:.4f} +- {r[c]['stdev_accuracy']:.4f}" for c in codecs)
        row = (f"| {name} | {cells} | {r['int8']['mean_diff_vs_float32']:+.4f} | {r['int4']['mean_diff_vs_float32']:+.4f} "
               f"| {r['int4']['mean_device_accuracy']:.4f} | " + " / ".join(thousands(r[c]["model_bytes"]) for c in codecs) + " |")
        assert row in text, f"docs/benchmarks.md lacks the row bench/results/model_codec.json gives: {row!r}"


def test_privacy_tables_show_the_spread_of_the_seeds():
    """Issue 19.11: bench/privacy.py's cells are medians of 5 seeds with their min and max, and both
    docs show the spread beside each median (test_privacy.py checks the medians and epsilons)."""
    data = results("privacy")
    assert data["config"]["seeds"] >= 5
    span = lambda c, m: f"[{c[f'min_{m}']:.4f}, {c[f'max_{m}']:.4f}]"  # noqa: E731
    for doc in ("docs/benchmarks.md", "docs/security.md"):
        text = (ROOT / doc).read_text()
        for name in ("digits", "linear"):
            m, nd = data[name]["metric"], data[name]["no_dp"]
            assert f"median [min, max] of {data['config']['seeds']} seeds; no DP: {nd[f'median_{m}']} {span(nd, m)})" in text
            for eps in ("1", "3", "8"):
                local, central = data[name]["local"][f"epsilon_{eps}"], data[name]["central"][f"epsilon_{eps}"]
                assert f"| {local['epsilon_replace_one']:.4f} | {span(local, m)} | {span(central, m)} |" in text, (doc, name, eps)
    security = (ROOT / "docs/security.md").read_text()
    for k, c in data["central_buffer_sweep_linear_epsilon_3"].items():
        assert f"| {k} | {c['median_r2']} | ({c['epsilon']:.4f}, {c['delta']:g}) | {c['noise_std_per_coordinate_of_step']} |" in security


def test_benchmarks_quote_the_1e5_profile_exactly():
    """docs/benchmarks.md's 1e5 paragraph is bench/results/throughput_1e5.json: the sweeps' ratios and
    rates, the stage costs and the serial bound (seen red on a changed ratio)."""
    text = " ".join((ROOT / "docs" / "benchmarks.md").read_text().split())
    data = results("throughput_1e5")
    runs, row = data["repeat_runs"]["by_params"]["100000"], data["results"][0]
    st = row["stages_us"]
    ratios = ", ".join(format(r["ratio"], ".2f") for r in runs[:-1])
    assert f"gave {ratios} and {runs[-1]['ratio']:.2f} of raw paho" in text
    assert (f"({', '.join(thousands(r['fedmq_per_s']) for r in runs[:-1])} and {thousands(runs[-1]['fedmq_per_s'])} updates/s "
            f"against {', '.join(thousands(r['raw_paho_per_s']) for r in runs[:-1])} and "
            f"{thousands(runs[-1]['raw_paho_per_s'])} msg/s raw)") in text
    assert sum(r["ratio"] >= 0.7 for r in runs) == 2 and "at or above 0.7 in two of the three" in text
    for quoted in (f"{thousands(st['norm_numpy_linalg_mean'])} us per call", f"against {thousands(st['norm_chunked_mean'])} us taken",
                   f"{thousands(st['fedasync_add_before'])} us (best of 5), against {thousands(st['fedasync_add'])} us in place",
                   f"decode int8 {st['codec_decode_int8']:.0f} us", f"float64 copy {st['to_float64']:.0f} us",
                   f"range check {st['finite_on_the_wire']:.0f} us", f"msgpack {st['msgpack_decode_update']:.0f} us",
                   f"{thousands(st['handle_update_whole'])} us for the whole", f"({thousands(st['checkpoint_per_commit'])} us per group commit",
                   f"caps the ratio at {row['serial_bound_ratio']:.2f} of raw"):
        assert quoted in text, quoted


def test_scale_table_is_the_results_file_and_5000_agents_converge():
    """docs/benchmarks.md section 4's rows are bench/results/scale.json, staleness beside r2; the
    5,000-agent r2 is within 0.01 of the 1,000-agent run's and the unbounded run is the divergent
    one (seen red on a changed staleness cell)."""
    text = (ROOT / "docs" / "benchmarks.md").read_text()
    data = results("scale")
    for label, r in (("1,000", data["runs"][0]), ("5,000", data["runs"][1]), ("5,000, before", data["before"])):
        row = (f"| {label} | {r['max_staleness']} | {thousands(r['accepted'])} | {thousands(r['rejected'].get('too_stale', 0))} "
               f"| {r['updates_per_s']:.1f} | {r['staleness_mean']:.1f} / {r['staleness_max']} | {r['final_r2']:.4f} |")
        assert row in text, row
    small, large = data["runs"]
    assert (small["agents"], large["agents"]) == (1000, 5000)
    assert abs(large["final_r2"] - small["final_r2"]) <= 0.01
    assert data["before"]["final_r2"] < 0.9 and data["before"]["staleness_max"] > large["staleness_max"]



def test_paced_scale_table_is_the_results_file():
    """docs/benchmarks.md section 4's pace-steered rows are bench/results/scale.json's `paced` and
    `paced_fleet_floor` runs (seen red on a changed cell), each within 0.01 of the unpaced 1,000 run's r2."""
    text = (ROOT / "docs" / "benchmarks.md").read_text()
    data = results("scale")
    for section in ("paced", "paced_fleet_floor"):
        small, large = data[section]
        assert (small["agents"], large["agents"]) == (1000, 5000)
        for r in (small, large):
            row = (f"| {thousands(r['agents'])} | {r.get('pace_min_interval', 1.0):g} s | {r['pace']['interval']:g} s "
                   f"| {thousands(r['updates_sent'])} | {thousands(r['accepted'])} | {thousands(r['rejected'].get('too_stale', 0))} "
                   f"| {r['updates_per_s']:.1f} | {r['staleness_mean']:.1f} / {r['staleness_max']} | {r['final_r2']:.4f} |")
            assert row in text, row
            assert r["pace"]["agents_online"] == r["agents"] and r["target_updates_per_s"] == 100
            assert abs(r["final_r2"] - data["runs"][0]["final_r2"]) <= 0.01
    small, large = data["paced_fleet_floor"]
    unpaced = data["runs"][0]
    assert (f"({small['updates_per_s']:.1f} accepted a second for a target of 100, {thousands(small['accepted'])} of "
            f"{thousands(small['updates_sent'])} sent\naccepted against {thousands(unpaced['accepted'])} of "
            f"{thousands(unpaced['updates_sent'])} unpaced)") in text
    assert f"falls from {unpaced['staleness_mean']:.1f} to\n{small['staleness_mean']:.1f} versions" in text
    assert f"the {thousands(data['paced'][1]['updates_sent'])} updates sent" in text
    assert f"{thousands(large['updates_sent'])} sent, and the {thousands(large['rejected']['too_stale'])} refused match" in text
