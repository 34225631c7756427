"""docs/benchmarks.md section 16 quotes bench/results/async_advantage.json (and the runs before: before int4
updates, async_advantage-before-int4-updates.json; before the agents' skip rule, async_advantage-before-skip-rule.json; before the byte and CPU cuts, async_advantage-before.json;
before fedbuff's memory, async_advantage-before-memory.json; and the sensors regression,
async_advantage_sensors.json), the sweep rows and the per-device rows exactly."""

from __future__ import annotations

import json
import statistics

import pytest

from fleet import ROOT

RESULTS = ROOT / "bench/results/async_advantage.json"
BEFORE_INT4 = ROOT / "bench/results/async_advantage-before-int4-updates.json"  # int8 and top-k updates
BEFORE_SKIP = ROOT / "bench/results/async_advantage-before-skip-rule.json"  # before the agents' skip rule (0696ea5)
BEFORE = ROOT / "bench/results/async_advantage-before.json"
BEFORE_MEMORY = ROOT / "bench/results/async_advantage-before-memory.json"
SENSORS = ROOT / "bench/results/async_advantage_sensors.json"  # the regression: every "accuracy" is r2


def cell(s: dict, unit: str = "", digits: int = 1, scale: float = 1.0) -> str:
    """Median (min-max) over the seeds; how many seeds got there when not all did."""
    if s["median"] is None:
        return f"not reached ({s['reached']} of the seeds did)" if s["reached"] else "not reached"
    f = lambda v: f"{v * scale:,.{digits}f}"  # noqa: E731
    return f"{f(s['median'])}{unit} ({f(s['min'])}-{f(s['max'])})"


def ratio(x) -> str:
    return "-" if x is None else f"{x:.2f}x"


def table(r: dict, source: str) -> str:
    """One row per system, as the section shows it."""
    lines = ["| system | seeds | time to 90% | time to 95% | updates to 95% | device KB to 95% | device CPU to 95% "
             f"| final {r.get('metric', 'accuracy')} | final / ceiling | time, KB, CPU to 95% vs Flower FedAvg (bench/results/{source}) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, s in r["summary"].items():
        vs = " / ".join(ratio(s.get(f"{k}_vs_flower_fedavg")) for k in ("time_to_95_s", "device_bytes_to_95",
                                                                          "device_cpu_s_to_95"))
        lines.append(f"| {name} | {s['seeds']} | {cell(s['time_to_90_s'], ' s')} | {cell(s['time_to_95_s'], ' s')} | "
                     f"{cell(s['updates_to_95'], digits=0)} | {cell(s['device_bytes_to_95'], digits=0, scale=1e-3)} | "
                     f"{cell(s['device_cpu_s_to_95'], ' s', digits=2)} | {cell(s['final_accuracy'], digits=4)} | "
                     f"{cell(s['final_vs_ceiling'], digits=3)} | {vs if name != 'Flower FedAvg' else '1x'} |")
    return "\n".join(lines)


@pytest.mark.parametrize("results", [RESULTS, BEFORE_INT4, BEFORE_SKIP, BEFORE, BEFORE_MEMORY, SENSORS], ids=lambda p: p.name)
def test_the_async_advantage_table_is_the_results_file(results):
    r = json.loads(results.read_text())
    md = (ROOT / "docs/benchmarks.md").read_text()
    assert table(r, results.name) in md, table(r, results.name)
    assert sum(s["seeds"] for s in r["summary"].values()) == len(r["runs"])
    ceilings = sorted({run["ceiling"] for run in r["runs"]})
    assert f"ceilings {', '.join(f'{c:.4f}' for c in ceilings)}" in md


PROFILE = "fedbuff memory lr2 int4 ack5"  # section 16's setting for small devices (docs/architecture.md)


def summary_row(r: dict) -> str:
    """The row of the summary table at the top of docs/benchmarks.md, and whether the target was met: by fedbuff at
    its defaults, and by the profile of int4 models and updates with fedbuff's memory (when the run has it)."""
    fl = r["summary"]["Flower FedAvg"]

    def verdict(name: str) -> tuple[str, bool]:
        fb = r["summary"][name]
        t, b = fb["time_to_95_s_vs_flower_fedavg"], fb["device_bytes_to_95_vs_flower_fedavg"]
        met = t is not None and b is not None and t <= 1 / 3 and b <= 1 / 8 and \
            fb["final_accuracy"]["median"] >= fl["final_accuracy"]["median"]
        return f"{ratio(t)} of the time, {ratio(b)} of the bytes; final {fb['final_accuracy']['median']:.4f}", met

    said, met = verdict("fedmq fedbuff")
    cells = f"fedbuff at its defaults {said}"
    result = "met" if met else "missed"
    if PROFILE in r["summary"]:
        said_p, met_p = verdict(PROFILE)
        cells += f"; `{PROFILE}` {said_p}"
        result = f"{'met' if met_p else 'missed'} with `{PROFILE}`, {'met' if met else 'missed'} at the defaults"
    return (f"| 16 | asynchronous advantage: many_classes shards:4, 10 devices, log-normal(1) stragglers, beside "
            f"Flower 1.41 | `nice python bench/async_advantage.py`, section 16 | fedbuff reaches 95% of the ceiling in <= 1/3 of Flower FedAvg's time at "
            f"<= 1/8 of its device bytes, final accuracy not lower | {cells}; Flower FedAvg "
            f"{fl['final_accuracy']['median']:.4f} (medians of {fl['seeds']} seeds) | {result} |")


def test_the_summary_row_is_the_results_file():
    assert summary_row(json.loads(RESULTS.read_text())) in (ROOT / "docs/benchmarks.md").read_text()


SWEEP = ROOT / "bench/results/async_advantage_sweep.jsonl"
BYTES_BEFORE = "bytes before (main d5630eb): fedbuff memory lr2 int4 topk"
BYTES_AFTER = "bytes after (0788855): fedbuff memory lr2 int4 topk"


def sweep_rows() -> dict:
    return {r["system"]: r for r in map(json.loads, SWEEP.read_text().splitlines()) if "breakdown" in r}


def bytes_table(before: dict, after: dict) -> str:
    """Section 16's breakdown: bytes and packets per update the devices sent, by kind, before and after."""
    kb, ka = before["breakdown"]["kinds"], after["breakdown"]["kinds"]
    lines = ["| per update the devices sent | before: bytes | before: packets | after: bytes | after: packets |",
             "|---|---|---|---|---|"]
    zero = {"bytes_per_update": 0.0, "packets_per_update": 0.0}
    for kind in sorted(set(kb) | set(ka), key=lambda k: (-kb.get(k, zero)["bytes_per_update"], k)):
        b, a = kb.get(kind, zero), ka.get(kind, zero)
        lines.append(f"| {kind} | {b['bytes_per_update']:,.1f} | {b['packets_per_update']:.3f} | "
                     f"{a['bytes_per_update']:,.1f} | {a['packets_per_update']:.3f} |")
    lines.append(f"| all | {before['breakdown']['bytes_per_update']:,.1f} | | {after['breakdown']['bytes_per_update']:,.1f} | |")
    return "\n".join(lines)


def test_the_bytes_breakdown_is_the_sweep_rows():
    rows = sweep_rows()
    md = (ROOT / "docs/benchmarks.md").read_text()
    assert bytes_table(rows[BYTES_BEFORE], rows[BYTES_AFTER]) in md, bytes_table(rows[BYTES_BEFORE], rows[BYTES_AFTER])
    for name, row in rows.items():  # every breakdown row the section quotes, by its bytes per update
        if name.startswith("bytes "):
            assert f"{row['breakdown']['bytes_per_update']:,.0f} B per update" in md, name


CUTS_BEFORE, CUTS_AFTER = "main 3e28503 int4+topk", "h-bytes 09bd461 int4+topk"  # the protocol's byte cuts
CUTS_BETWEEN = ("h-bytes daea4b3 int4+topk", "h-bytes 7d10ba4 int4+topk", "h-bytes 73dee30 int4+topk")  # each landing


def message_table(before: dict, after: dict) -> str:
    """Section 16's protocol cuts: per kind, bytes per update the devices sent and bytes per message, before and after."""
    kb, ka = before["breakdown"]["kinds"], after["breakdown"]["kinds"]
    lines = ["| per update the devices sent | before: bytes | before: bytes per message | after: bytes | "
             "after: bytes per message |", "|---|---|---|---|---|"]
    zero = {"bytes_per_update": 0.0, "packets_per_update": 0.0}
    each = lambda k: f"{k['bytes_per_update'] / k['packets_per_update']:,.1f}" if k["packets_per_update"] else "-"  # noqa: E731
    for kind in sorted(set(kb) | set(ka), key=lambda k: (-kb.get(k, zero)["bytes_per_update"], k)):
        b, a = kb.get(kind, zero), ka.get(kind, zero)
        if b["bytes_per_update"] >= 1 or a["bytes_per_update"] >= 1:
            lines.append(f"| {kind} | {b['bytes_per_update']:,.1f} | {each(b)} | {a['bytes_per_update']:,.1f} | {each(a)} |")
    lines.append(f"| all | {before['breakdown']['bytes_per_update']:,.1f} | | {after['breakdown']['bytes_per_update']:,.1f} | |")
    return "\n".join(lines)


def test_the_protocol_cuts_table_is_the_sweep_rows():
    rows = sweep_rows()
    md = (ROOT / "docs/benchmarks.md").read_text()
    table = message_table(rows[CUTS_BEFORE], rows[CUTS_AFTER])
    assert table in md, table
    runs = [rows[name] for name in (CUTS_BEFORE, *CUTS_BETWEEN, CUTS_AFTER)]
    for row in runs:
        assert f"{row['breakdown']['bytes_per_update']:,.0f} B per update" in md, row["system"]
    times = ", ".join(f"{r['time_to_95_s']:.1f}" for r in runs[:-1]) + f" and {runs[-1]['time_to_95_s']:.1f} s"
    finals = ", ".join(f"{r['final_accuracy']:.4f}" for r in runs[:-1]) + f" and {runs[-1]['final_accuracy']:.4f}"
    sentence = (f"The runs reached 95% of the ceiling ({runs[0]['ceiling']:.4f}) in turn at {times} (final {finals} at "
                f"{runs[0]['seconds']:.0f} s)")
    assert sentence in " ".join(md.split()), sentence


def per_update_table(r: dict) -> str:
    """Section 16's per-update costs of the newest run: medians over the seeds of each run's whole-run figures."""
    lines = ["| system | bytes per update | model downloads per update | acks per update | device CPU per update |",
             "|---|---|---|---|---|"]
    names = list(r["summary"])
    for name in names:
        runs = [x for x in r["runs"] if x["system"] == name]
        med = lambda f: statistics.median(f(x) for x in runs)  # noqa: E731
        kinds = lambda x: x["breakdown"]["kinds"]  # noqa: E731
        packets = lambda x, k: kinds(x).get(k, {}).get("packets_per_update", 0.0)  # noqa: E731
        flower = name.startswith("Flower")
        lines.append(f"| {name} | {med(lambda x: x['breakdown']['bytes_per_update']):,.0f} | "
                     f"{'1 (one per fit)' if flower else format(med(lambda x: packets(x, 'down PUBLISH model')), '.2f')} | "
                     f"{'-' if flower else format(med(lambda x: packets(x, 'down PUBLISH ack')), '.2f')} | "
                     f"{med(lambda x: 1000 * x['device_cpu_s'] / x['breakdown']['updates_sent']):.2f} ms |")
    return "\n".join(lines)


@pytest.mark.parametrize("results", [RESULTS, BEFORE_INT4, BEFORE_SKIP], ids=lambda p: p.name)
def test_the_per_update_costs_are_the_results_file(results):
    r = json.loads(results.read_text())
    assert per_update_table(r) in (ROOT / "docs/benchmarks.md").read_text(), per_update_table(r)



SETTINGS = "sweep "  # the sweep rows of the settings that need the fewest updates to 95% at small bytes per update


def settings_table(rows: list[dict]) -> str:
    """Section 16's sweep of settings: per row (its name, its flags after --strategy fedbuff) and seed, the updates, device
    KB and seconds to 95% of the ceiling, and the bytes per update over the whole run."""
    names = list(dict.fromkeys(r["system"] for r in rows))
    lines = ["| row | flags after `--strategy fedbuff` | seed 0: updates / KB / s to 95% | "
             "seed 1: updates / KB / s to 95% | seed 2: updates / KB / s to 95% | bytes per update (seeds 0, 1, 2) |",
             "|---|---|---|---|---|---|"]
    for name in names:
        mine = {r["seed"]: r for r in rows if r["system"] == name}
        assert len(mine) == sum(r["system"] == name for r in rows), f"{name}: a seed ran twice"
        flags = next(iter(mine.values()))["flags"].replace("--strategy fedbuff ", "", 1)

        def cell(seed: int) -> str:
            r = mine.get(seed)
            if r is None:
                return "-"
            if r["time_to_95_s"] is None:
                return f"not reached (final {r['final_accuracy']:.4f})"
            return f"{r['updates_to_95']} / {r['device_bytes_to_95'] / 1e3:,.0f} / {r['time_to_95_s']:.1f}"

        per = ", ".join(f"{mine[s]['breakdown']['bytes_per_update']:,.0f}" if s in mine else "-" for s in (0, 1, 2))
        lines.append(f"| {name} | `{flags}` | {cell(0)} | {cell(1)} | {cell(2)} | {per} |")
    return "\n".join(lines)


def test_the_settings_sweep_is_the_sweep_rows():
    rows = [r for r in map(json.loads, SWEEP.read_text().splitlines()) if r["system"].startswith(SETTINGS)]
    assert len(rows) >= 20
    table = settings_table(rows)
    assert table in (ROOT / "docs/benchmarks.md").read_text(), table


REGRESSION = "main 5334ee6 "  # the sweep rows of issue 23's plain-fedbuff regression: NAME after the prefix
REGRESSION_SETTINGS = (("defaults", "defaults (`--ack-interval 1`, `--skip-models-in-rounds`)"),
                       ("--ack-interval 0", "`--ack-interval 0`"),
                       ("--no-skip-models-in-rounds", "`--no-skip-models-in-rounds`"),
                       ("--ack-interval 0 --no-skip-models-in-rounds", "both"))


def regression_table(runs: list[dict]) -> str:
    """Section 16's sweep of the two protocol defaults under plain fedbuff: per setting and seed, the time to 95%
    of the ceiling and the final accuracy, and the model downloads per update."""
    lines = ["| plain fedbuff, main 5334ee6, 60 s | seed 0: 95% / final | seed 1: 95% / final | seed 2: 95% / final "
             "| model downloads per update (seeds 0, 1, 2) |", "|---|---|---|---|---|"]
    for key, label in REGRESSION_SETTINGS:
        mine = sorted((r for r in runs if r["system"] == REGRESSION + key), key=lambda r: r["seed"])
        assert [r["seed"] for r in mine] == [0, 1, 2], key
        reach = lambda r: "not reached" if r["time_to_95_s"] is None else f"{r['time_to_95_s']:.1f} s"  # noqa: E731
        cells = [f"{reach(r)} / {r['final_accuracy']:.4f}" for r in mine]
        downloads = ", ".join(f"{r['breakdown']['kinds']['down PUBLISH model']['packets_per_update']:.2f}" for r in mine)
        lines.append(f"| {label} | {' | '.join(cells)} | {downloads} |")
    return "\n".join(lines)


def test_the_regression_sweep_is_the_sweep_rows():
    runs = [r for r in map(json.loads, SWEEP.read_text().splitlines()) if r["system"].startswith(REGRESSION)]
    assert len(runs) == 12  # 4 settings x 3 seeds, each once
    table = regression_table(runs)
    assert table in (ROOT / "docs/benchmarks.md").read_text(), table


DEVICES = ROOT / "bench/results/async_advantage_devices.jsonl"
PLAIN = "plain fedbuff, main 548c17a: "


def slow_devices(row: dict) -> str:
    """The devices padded beyond 2 s: 'pad s: acked / sent' each (the coordinator acks accepted updates only)."""
    return "; ".join(f"{a['pad']:.2f} s: {a['acks']} / {a['updates']}" for a in row["agents"] if a["pad"] > 2)


def norm_table(rows: list[dict], title: str = "plain fedbuff, main 548c17a, 60 s", prefix: str = PLAIN) -> str:
    """Section 16's per-device view of plain fedbuff: what the slowest devices got accepted, with the relative norm
    bound at its default, off, and clipping instead of refusing (or before and after the slow-device fix)."""
    lines = [f"| {title} | seed | slowest devices (pad): updates acked / sent | rejected as norm "
             "| time to 95% | final (best) accuracy |", "|---|---|---|---|---|---|"]
    for r in rows:
        t95 = "not reached" if r["t95"] is None else f"{r['t95']:.1f} s"
        lines.append(f"| {r['name'][len(prefix):]} | {r['seed']} | {slow_devices(r)} | {r['rejected_log'].get('norm', 0)} | "
                     f"{t95} | {r['final']:.4f} ({r['best']:.4f}) |")
    return "\n".join(lines)


FIX = "norm fix: "


def test_the_slow_device_fix_table_is_the_device_rows():
    """Section 16's before and after of the slow-device fix (main 07e3c39): the slowest devices' acks, row by row."""
    rows = [r for r in map(json.loads, DEVICES.read_text().splitlines()) if r["name"].startswith(FIX)]
    assert len(rows) == 8 and {r["seed"] for r in rows} == {0, 2}
    table = norm_table(rows, "plain fedbuff defaults, 60 s", FIX)
    assert table in (ROOT / "docs/benchmarks.md").read_text(), table


def device_download_table(row: dict) -> str:
    """Section 16's model downloads per update of each device, one run."""
    lines = ["| device pad | updates sent | models downloaded per update | subscribes per update |", "|---|---|---|---|"]
    for a in sorted(row["agents"], key=lambda a: a["pad"]):
        lines.append(f"| {a['pad']:.2f} s | {a['updates']} | {a['models'] / a['updates']:.2f} | "
                     f"{a['subscribes'] / a['updates']:.2f} |")
    return "\n".join(lines)


def test_the_per_device_tables_are_the_device_rows():
    rows = [json.loads(line) for line in DEVICES.read_text().splitlines()]
    plain = [r for r in rows if r["name"].startswith(PLAIN)]
    assert len(plain) == 5 and all(slow_devices(r) for r in plain)
    md = (ROOT / "docs/benchmarks.md").read_text()
    assert norm_table(plain) in md, norm_table(plain)
    before = next(r for r in rows if r["name"] == "skip rule before (main 548c17a): fedbuff memory lr2")
    assert device_download_table(before) in md, device_download_table(before)
