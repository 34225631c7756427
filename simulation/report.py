"""Presenting a simulation: the summary table and the accuracy plots."""

from __future__ import annotations

from pathlib import Path


def summary_rows(result: dict) -> list[tuple[str, str]]:
    """(label, value) pairs for the end-of-run table."""
    metric = result["metric"]
    baseline = result.get("baseline")
    final = result["final_score"]
    rows = [
        ("dataset / model parameters", f"{result['dataset']} / {result['n_params']}"),
        ("agents / strategy / codec", f"{result['config']['agents']} / {result['config']['strategy']} / {result['config']['codec']}"),
        (f"final {metric}", "-" if final is None else f"{final:.4f}"),
    ]
    if baseline is not None:
        ratio = f" ({100 * final / baseline:.1f}% of it)" if final is not None and baseline else ""
        rows.append((f"centralized {metric}", f"{baseline:.4f}{ratio}"))
    rows += [
        ("global versions", str(result["version"])),
        ("updates sent / accepted", f"{result['updates_sent']} / {result['accepted']}"),
        ("updates rejected", ", ".join(f"{k} {v}" for k, v in result["rejected"].items()) or "0"),
        ("staleness mean / max", f"{result['staleness']['mean']:.2f} / {result['staleness']['max']}"),
        ("bytes up (per update)", f"{result['bytes_up']:,} ({result['bytes_per_update']:.0f})"),
        ("bytes down", f"{result['bytes_down']:,}"),
        ("wall time", f"{result['wall_time_s']:.1f} s"),
    ]
    if result.get("time_to_target_s") is not None:
        rows.append(("time to target", f"{result['time_to_target_s']:.1f} s"))
    return rows


def plot(result: dict, path: str | Path) -> Path:
    """Accuracy (or r2) against wall time and against global version, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    points = [p for p in result["timeline"] if p["score"] is not None]
    metric = result["metric"]
    fig, (by_time, by_version) = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    by_time.plot([p["t"] for p in points], [p["score"] for p in points], marker=".")
    by_version.plot([p["version"] for p in points], [p["score"] for p in points], marker=".")
    for ax, label in ((by_time, "wall time (s)"), (by_version, "global model version")):
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
        if result.get("baseline") is not None:
            ax.axhline(result["baseline"], color="gray", linestyle="--", label="centralized")
    by_time.set_ylabel(f"held-out {metric}")
    by_version.legend(loc="lower right")
    c = result["config"]
    fig.suptitle(f"fedmq: {c['agents']} agents on {result['dataset']}, {c['strategy']}, {c['codec']}, {c['partition']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
