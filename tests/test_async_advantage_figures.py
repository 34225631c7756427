"""docs/benchmarks.md section 16 quotes bench/results/async_advantage.json exactly."""

from __future__ import annotations

import json

from fleet import ROOT

RESULTS = ROOT / "bench/results/async_advantage.json"


def cell(s: dict, unit: str = "", digits: int = 1, scale: float = 1.0) -> str:
    """Median (min-max) over the seeds; how many seeds got there when not all did."""
    if s["median"] is None:
        return f"not reached ({s['reached']} of the seeds did)" if s["reached"] else "not reached"
    f = lambda v: f"{v * scale:,.{digits}f}"  # noqa: E731
    return f"{f(s['median'])}{unit} ({f(s['min'])}-{f(s['max'])})"


def ratio(x) -> str:
    return "-" if x is None else f"{x:.2f}x"


def table(r: dict) -> str:
    """One row per system, as the section shows it."""
    lines = ["| system | seeds | time to 90% | time to 95% | updates to 95% | device KB to 95% | device CPU to 95% "
             "| final accuracy | final / ceiling | time, KB, CPU to 95% vs Flower FedAvg (bench/results/async_advantage.json) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, s in r["summary"].items():
        vs = " / ".join(ratio(s.get(f"{k}_vs_flower_fedavg")) for k in ("time_to_95_s", "device_bytes_to_95",
                                                                          "device_cpu_s_to_95"))
        lines.append(f"| {name} | {s['seeds']} | {cell(s['time_to_90_s'], ' s')} | {cell(s['time_to_95_s'], ' s')} | "
                     f"{cell(s['updates_to_95'], digits=0)} | {cell(s['device_bytes_to_95'], digits=0, scale=1e-3)} | "
                     f"{cell(s['device_cpu_s_to_95'], ' s', digits=2)} | {cell(s['final_accuracy'], digits=4)} | "
                     f"{cell(s['final_vs_ceiling'], digits=3)} | {vs if name != 'Flower FedAvg' else '1x'} |")
    return "\n".join(lines)


def test_the_async_advantage_table_is_the_results_file():
    r = json.loads(RESULTS.read_text())
    md = (ROOT / "docs/benchmarks.md").read_text()
    assert table(r) in md, table(r)
    assert sum(s["seeds"] for s in r["summary"].values()) == len(r["runs"])
    ceilings = sorted({run["ceiling"] for run in r["runs"]})
    assert f"ceilings {', '.join(f'{c:.4f}' for c in ceilings)}" in md


def summary_row(r: dict) -> str:
    """The row of the summary table at the top of docs/benchmarks.md, and whether the target was met."""
    fb, fl = r["summary"]["fedmq fedbuff"], r["summary"]["Flower FedAvg"]
    t, b = fb["time_to_95_s_vs_flower_fedavg"], fb["device_bytes_to_95_vs_flower_fedavg"]
    final_ok = fb["final_accuracy"]["median"] >= fl["final_accuracy"]["median"]
    met = t is not None and b is not None and t <= 1 / 3 and b <= 1 / 8 and final_ok
    return (f"| 16 | asynchronous advantage: many_classes shards:4, 10 devices, log-normal(1) stragglers, beside "
            f"Flower 1.41 | see section 16 | fedbuff reaches 95% of the ceiling in <= 1/3 of Flower FedAvg's time at "
            f"<= 1/8 of its device bytes, final accuracy not lower | fedbuff {ratio(t)} of the time, {ratio(b)} of the "
            f"bytes; final {fb['final_accuracy']['median']:.4f} vs {fl['final_accuracy']['median']:.4f} (medians of "
            f"{fb['seeds']} seeds) | {'met' if met else 'missed'} |")


def test_the_summary_row_is_the_results_file():
    assert summary_row(json.loads(RESULTS.read_text())) in (ROOT / "docs/benchmarks.md").read_text()
