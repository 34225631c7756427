"""`fedmq-monitor` (watch a fleet live) and `fedmq-report` (plot a coordinator's metrics log)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

from monitor.report import ReportError, plot, read_log, series
from protocol.config import CliParser, fleet_tool_parser, optional_extra, parse_layered
from protocol.topics import Topics
from protocol.transport import BrokerError, settings_from_args

log = logging.getLogger("monitor")


def build_parser() -> argparse.ArgumentParser:
    p = fleet_tool_parser(
        "fedmq-monitor",
        "Watch a fedmq fleet live: global version, scores, accepted and rejected updates, and each "
        "agent's state, base version and staleness, decoded from the fleet's MQTT topics. Reads only.",
        "fleet name: watches <prefix>/<fleet>/#",
    )
    o = p.add_argument_group("output")
    o.add_argument("--once", action="store_true",
                   help="collect for --wait seconds, print one snapshot and exit (works without a terminal)")
    o.add_argument("--wait", type=float, default=2.0, metavar="SECONDS",
                   help="with --once: how long to collect; retained statuses and the model come at once, "
                   "updates only as agents send them (default: 2)")
    o.add_argument("--json", action="store_true",
                   help="print snapshots as JSON (one line each) instead of tables; without --once, one per --refresh")
    o.add_argument("--refresh", type=float, default=1.0, metavar="SECONDS", help="seconds between redraws (default: 1)")
    o.add_argument("--log-level", default="WARNING", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                   help="logging level, on stderr (default: WARNING)")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Layered arguments (flags > FEDMQ_* > --config); exits 2 with one line on bad config."""
    parser = build_parser()
    args = parse_layered(parser, argv, required=("broker", "fleet"))
    try:
        args.topics = Topics(args.fleet, args.topic_prefix)
        args.settings = settings_from_args(args)
        for name in ("wait", "refresh", "connect_timeout"):
            if not getattr(args, name) > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0")
    except ValueError as exc:
        parser.error(str(exc))
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the monitor; 0 when stopped (or after --once), 1 broker unreachable, 2 bad configuration."""
    try:
        args = parse_args(argv)
    except SystemExit as exc:  # the parser printed its one-line error, or --help
        return exc.code if isinstance(exc.code, int) else 2
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        from monitor import live
    except ImportError as exc:  # rich is an extra
        print(f"fedmq-monitor: error: {exc.name} is missing: pip install 'fedmq[monitor]'", file=sys.stderr)
        return 2
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    session = live.MonitorSession(args.topics, args.settings)
    try:
        session.start(args.connect_timeout)
    except BrokerError as exc:
        print(f"fedmq-monitor: error: {exc}", file=sys.stderr)
        return 1
    try:
        if args.once:
            live.print_once(session, args.wait, stop, as_json=args.json, out=sys.stdout)
        elif args.json:
            live.stream_json(session, args.refresh, stop, sys.stdout)
        else:
            live.show_live(session, args.refresh, stop)
    except BrokenPipeError:  # `fedmq-monitor --json | head`
        pass
    finally:
        session.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def build_report_parser() -> argparse.ArgumentParser:
    p = CliParser(
        prog="fedmq-report",
        description="Plot a coordinator's --metrics-log (one JSON status per line): held-out and fleet-evaluated "
        "accuracy or r2, fleet evaluation loss and update staleness, over time or model versions, into a PNG.",
    )
    p.add_argument("log", metavar="LOG.jsonl", help="the file given to fedmq-coordinator --metrics-log")
    p.add_argument("-o", "--output", metavar="OUT.png", help="where to write the plot (default: LOG with .png)")
    p.add_argument("--x", choices=("time", "version"), default="time",
                   help="horizontal axis: seconds since the coordinator started, or global model version (default: time)")
    return p


@optional_extra("fedmq-report", "monitor")
def report_main(argv: list[str] | None = None) -> int:
    """Write the plot; 0 on success, 2 for a missing, empty or unreadable log or an unwritable output."""
    args = build_report_parser().parse_args(argv)
    out = Path(args.output) if args.output else Path(args.log).with_suffix(".png")
    try:
        statuses, skipped = read_log(args.log)
        if skipped:
            print(f"fedmq-report: warning: skipped {skipped} line(s) of {args.log} that are not status JSON",
                  file=sys.stderr)
        plot(series(statuses), out, x=args.x)
    except ReportError as exc:
        print(f"fedmq-report: error: {exc}", file=sys.stderr)
        return 2
    print(f"{out}: {len(statuses)} statuses, versions {statuses[0]['version']} to {statuses[-1]['version']}")
    return 0
