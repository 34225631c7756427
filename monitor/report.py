"""Plots of a coordinator's ``--metrics-log``: score, federated evaluation and staleness over time.

Every line of the log is one published coordinator status document (JSON). Reading is
separate from drawing so the series are tested without matplotlib.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from monitor.values import mapping, number


class ReportError(Exception):
    """The log cannot be reported on; the message is one line for the user."""


@dataclass(frozen=True)
class Series:
    """Per-status columns of a metrics log, None where a status had no value."""

    fleet: str
    metric: str  # "accuracy" or "r2"
    seconds: list[float]  # since the first coordinator start in the log
    versions: list[int]
    score: list[float | None]  # held-out, on the coordinator's --eval-csv
    fleet_score: list[float | None]  # sample-weighted mean the agents report
    fleet_loss: list[float | None]
    staleness_mean: list[float | None]
    staleness_max: list[float | None]


def read_log(path: str | Path) -> tuple[list[dict], int]:
    """The status documents of a metrics log and how many non-empty lines were not one."""
    path = Path(path)
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        raise ReportError(f"{path}: no such file") from None
    except OSError as exc:
        raise ReportError(f"cannot read {path}: {exc.strerror or exc}") from None
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise ReportError(f"{path} is empty: the coordinator appends a line per published model (--metrics-log)")
    statuses = [doc for doc in map(_status, lines) if doc is not None]
    if not statuses:
        raise ReportError(f"{path}: none of its {len(lines)} lines is a coordinator status as JSON")
    return statuses, len(lines) - len(statuses)


def _status(line: str) -> dict | None:
    """A parsed status line, or None if it is not JSON or not a status (no version or time)."""
    try:
        doc = json.loads(line)
    except (ValueError, RecursionError):
        return None
    if not isinstance(doc, dict) or number(doc, "updated_at") is None or not isinstance(doc.get("version"), int):
        return None
    return doc


def series(statuses: list[dict]) -> Series:
    """Columns to plot; the metric is r2 when the log has r2 values, else accuracy."""
    evals = [mapping(s, "fleet_eval") for s in statuses]
    has_r2 = any(number(s, "r2") is not None for s in statuses) or any("r2" in e for e in evals)
    metric = "r2" if has_r2 else "accuracy"
    starts = [t for s in statuses if (t := number(s, "started_at")) is not None]
    t0 = min(starts + [statuses[0]["updated_at"]])
    stale = [mapping(s, "staleness") for s in statuses]
    return Series(
        fleet=str(statuses[-1].get("fleet", "?")),
        metric=metric,
        seconds=[s["updated_at"] - t0 for s in statuses],
        versions=[s["version"] for s in statuses],
        score=[number(s, metric) for s in statuses],
        fleet_score=[number(e, metric) for e in evals],
        fleet_loss=[number(e, "loss") for e in evals],
        staleness_mean=[number(st, "mean") for st in stale],
        staleness_max=[number(st, "max") for st in stale],
    )


def plot(data: Series, out: str | Path, *, x: str = "time") -> Path:
    """Draw score, fleet evaluation loss and staleness against time (or version) into a PNG."""
    try:
        import matplotlib
    except ImportError:
        raise ReportError("matplotlib is missing: pip install 'fedmq[monitor]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    xs = data.seconds if x == "time" else data.versions
    fig, (score, loss, stale) = plt.subplots(3, 1, sharex=True, figsize=(8, 9))
    _line(score, xs, data.score, f"held-out {data.metric} (--eval-csv)")
    _line(score, xs, data.fleet_score, f"fleet eval {data.metric} (agents' data)")
    score.set_ylabel(data.metric)
    _line(loss, xs, data.fleet_loss, "fleet eval loss")
    loss.set_ylabel("loss")
    _line(stale, xs, data.staleness_mean, "mean")
    _line(stale, xs, data.staleness_max, "max")
    stale.set_ylabel("staleness (versions)")
    stale.set_xlabel("seconds since start" if x == "time" else "global model version")
    for ax in (score, loss, stale):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(loc="best")
        else:
            ax.text(0.5, 0.5, "no values in the log", ha="center", va="center", transform=ax.transAxes, color="gray")
    fig.suptitle(f"fedmq fleet {data.fleet}: {len(xs)} statuses, versions {data.versions[0]}-{data.versions[-1]}")
    fig.tight_layout()
    try:
        fig.savefig(out, dpi=100, format="png")
    except OSError as exc:
        raise ReportError(f"cannot write {out}: {exc.strerror or exc}") from None
    finally:
        plt.close(fig)
    return out


def _line(ax, xs: list, ys: list, label: str) -> None:
    """Plot the points that have a value (dots only while they are few); a series with none is left out."""
    points = [(x, y) for x, y in zip(xs, ys) if y is not None]
    if points:
        ax.plot(*zip(*points), marker="." if len(points) <= 60 else None, label=label)

