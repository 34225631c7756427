"""A `FleetView` snapshot as rich tables: the fleet summary and one row per agent.

Pure functions of the snapshot dict, so the live view, `--once` and the tests draw the same
thing. Every string from the wire goes in as `Text`, never as console markup.
"""

from __future__ import annotations

from rich import box
from rich.console import Group
from rich.table import Table
from rich.text import Text

LEGEND = ("base: model version of the agent's newest update; stale: version - base; model: newest model its last status names (a status lags by up to 5 s: model < base is no fault); "
          "upd: updates seen here/sent in all; last: its newest update; rows: local samples; "
          "eval: its score of the global model on its own data")
STATE_STYLES = {"online": "cyan", "training": "yellow", "idle": "green", "offline": "red", "error": "bold red",
                "unheard": "bold magenta", "budget_spent": "yellow"}


def render(snapshot: dict) -> Group:
    """The whole screen: the fleet summary above the agents table."""
    return Group(summary(snapshot), agents_table(snapshot))


def summary(snapshot: dict) -> Table:
    """Fleet-wide figures: version, coordinator counters, scores, model size, bad payloads."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    coord = snapshot["coordinator"]
    model = snapshot["model"]
    version = _fmt(snapshot["version"])
    if coord and coord["published_version"] is not None:
        version += f" (published {coord['published_version']})"
    grid.add_row("fleet", Text(f"{snapshot['fleet']}   version {version}"))
    broker = snapshot.get("broker")
    if broker and not broker["connected"]:
        grid.add_row(Text("broker", style="bold red"), Text(f"{broker['url']} lost: reconnecting; figures may be old"))
    if coord is None:
        grid.add_row("coordinator", Text("no status seen", style="dim"))
    else:
        rejected = coord["rejected"]
        reasons = ", ".join(f"{k} {v}" for k, v in rejected.items())
        grid.add_row("updates", Text(
            f"accepted {_fmt(coord['accepted'])}   rejected {sum(rejected.values())}"
            + (f" ({reasons})" if reasons else "") + f"   clipped {_fmt(coord['clipped'])}   pending {_fmt(coord['pending'])}"))
        grid.add_row("staleness", Text(f"mean {_fmt(coord['staleness']['mean'])}   max {_fmt(coord['staleness']['max'])}"))
        grid.add_row("held-out", Text(scores(coord)))
        grid.add_row("fleet eval", Text(" ".join(f"{k} {_fmt(v)}" for k, v in coord["fleet_eval"].items()) or "-"))
        tier = (f"tier root {coord['root']}   {_fmt(coord['partitions'])} partitions   {_fmt(coord['partials'])} partials"
                if "root" in coord else f"{coord['strategy'] or '?'}")  # the scale-out tier's root, or a coordinator
        grid.add_row("coordinator", Text(
            f"{tier}   {_fmt(coord['agents'])} agents   up {_duration(coord['uptime_s'])}"
            f"   status {_ago(coord['updated_at'], snapshot['time'])}"))
    if model is not None:
        grid.add_row("model", Text(f"{model['estimator']}   {model['n_params']} params   {model['bytes']:,} bytes"
                                   f"   sent {_ago(model['time'], snapshot['time'])}"))
    bad = snapshot["bad"]
    if bad["count"]:
        reasons = ", ".join(f"{k} {v}" for k, v in bad["reasons"].items())
        grid.add_row(Text("bad payloads", style="bold red"), Text(f"{bad['count']} ({reasons})\nlast: {bad['last']}"))
    return grid


def scores(coord: dict) -> str:
    """Held-out accuracy or r2 of the global model, or why there is none."""
    shown = [f"{k} {coord[k]:.4f}" for k in ("accuracy", "r2") if coord[k] is not None]
    return "   ".join(shown) or "- (coordinator has no --eval-csv, or no score yet)"


def agents_table(snapshot: dict) -> Table:
    """One row per agent: state, base version and staleness, updates seen/sent, last update."""
    agents = snapshot["agents"]
    show_bad = any(a["bad"] for a in agents)  # a column only when there is something in it
    show_reason = any(a.get("reason") for a in agents)
    table = Table(title=f"{len(agents)} agents", title_justify="left", box=box.SIMPLE_HEAD, collapse_padding=True,
                  caption=LEGEND, caption_justify="left")
    for name in ("agent", "state", "base", "stale", "model", "upd", "last", "bytes", "rows", "eval") \
            + (("bad",) if show_bad else ()):
        table.add_column(name, justify="left" if name in ("agent", "state") else "right", no_wrap=True)
    if show_reason:  # why an agent in error or unheard does not train or is not heard
        table.add_column("reason", justify="left", overflow="fold", min_width=20)
    now = snapshot["time"]
    for a in agents:
        state = a["state"] or "?"
        row = [
            Text(a["agent"]), Text(state, style=STATE_STYLES.get(state, "dim")), _fmt(a["base_version"]),
            _fmt(a["staleness"]), _fmt(a["model_version"]), f"{a['updates_seen']}/{_fmt(a['updates_sent'])}",
            _ago(a["last_update_time"], now), _fmt(a["last_update_bytes"]), _fmt(a["samples"]),
            Text(agent_eval(a["metrics"])),
        ]
        table.add_row(*row, *([Text(str(a["bad"]), style="red")] if show_bad else []),
                      *([Text(a.get("reason") or "")] if show_reason else []))
    return table


def agent_eval(metrics: dict) -> str:
    """The agent's score of the global model on its own data (federated evaluation)."""
    for key, short in (("eval_accuracy", "acc"), ("eval_r2", "r2")):
        if key in metrics:
            return f"{short} {metrics[key]:.3f}"
    return "-"


def _fmt(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10000 else str(value)
    return str(value)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _ago(then: float | None, now: float) -> str:
    return "-" if then is None else f"{_duration(max(0.0, now - then))} ago"
