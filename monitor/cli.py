"""`fedmq-monitor` (watch a fleet live) and `fedmq-report` (plot a coordinator's metrics log)."""

from __future__ import annotations

import argparse
import logging
import sys
import threading
from pathlib import Path
from urllib.parse import urlsplit

from monitor.fleet_view import DEFAULT_MAX_CLASSES, DEFAULT_MAX_MODEL_BYTES
from monitor.report import ReportError, plot, read_log, series
from protocol.config import CliParser, fleet_tool_parser, optional_extra, parse_layered
from protocol.stopping import stop_event_on_signals
from protocol.topics import Topics
from protocol.transport import BrokerError, read_password, settings_from_args

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
    o.add_argument("--max-model-bytes", type=int, default=DEFAULT_MAX_MODEL_BYTES, metavar="BYTES",
                   help="the largest model decoded, as float32 parameter bytes (4 per parameter), judged on its spec "
                   "before its parameters: a larger one counts as a bad payload (model:limits) and is not shown "
                   f"(default: {DEFAULT_MAX_MODEL_BYTES}, 4Mi parameters)")
    o.add_argument("--max-classes", type=int, default=DEFAULT_MAX_CLASSES, metavar="N",
                   help="the most classes of a model shown, judged on its class count before any class is built: a "
                   f"larger one counts as a bad payload (model:limits) (default: {DEFAULT_MAX_CLASSES}, as fedmq-agent's)")
    w = p.add_argument_group("web view (docs/web-view.md)")
    w.add_argument("--web", type=int, metavar="PORT",
                   help="serve the web fleet view on this port instead of the terminal view: a page that connects "
                   "to the broker itself over MQTT over WebSockets and draws the fleet live (--broker is not used)")
    w.add_argument("--web-host", default="127.0.0.1", metavar="HOST",
                   help="address the web view listens on (default: 127.0.0.1, this machine only)")
    w.add_argument("--ws-url", metavar="URL",
                   help="the broker's MQTT-over-WebSocket listener as the browser reaches it, ws://HOST:PORT or "
                   "wss://HOST:PORT (default: port 9001 of the host the page was loaded from)")
    w.add_argument("--web-share-login", action="store_true",
                   help="hand --username and the --password-file password to the page so it connects at once; "
                   "without it the page asks. Anyone who can load the page gets that login: use the read-only monitor user")
    o.add_argument("--log-level", default="WARNING", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                   help="logging level, on stderr (default: WARNING)")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Layered arguments (flags > FEDMQ_* > --config); exits 2 with one line on bad config."""
    parser = build_parser()
    args = parse_layered(parser, argv)
    for name in ("broker", "fleet"):  # --web needs no broker: the page connects to it, not this process
        if not getattr(args, name) and not (name == "broker" and args.web is not None):
            parser.error(f"--{name} is required (or FEDMQ_{name.upper()} / {name} in --config)"
                         + (", unless --web" if name == "broker" else ""))
    try:
        args.topics = Topics(args.fleet, args.topic_prefix)
        if args.web is not None:
            check_web_args(args)
        else:
            args.settings = settings_from_args(args)
        for name in ("wait", "refresh", "connect_timeout", "max_model_bytes"):
            if not getattr(args, name) > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0")
        if args.max_classes < 2:
            raise ValueError(f"--max-classes must be >= 2, got {args.max_classes}")
    except ValueError as exc:
        parser.error(str(exc))
    return args


def check_web_args(args: argparse.Namespace) -> None:
    """ValueError (one line) for a bad --web, --ws-url or shared login."""
    if not 0 < args.web < 65536:
        raise ValueError(f"--web must be a port in 1-65535, got {args.web}")
    if args.ws_url is not None:
        parts = urlsplit(args.ws_url)
        if parts.scheme not in ("ws", "wss") or not parts.hostname or parts.password:
            raise ValueError(f"--ws-url {args.ws_url!r} must look like ws://HOST:PORT or wss://HOST:PORT (no password)")
    args.web_password = read_password(args.password_file) if args.web_share_login else None
    if args.web_share_login and args.web_password is None:
        raise ValueError("--web-share-login needs the password: --password-file or FEDMQ_PASSWORD")


def run_web(args: argparse.Namespace, stop: threading.Event) -> int:
    """Serve the web view until SIGINT/SIGTERM; 1 if the port cannot be bound."""
    from monitor.web_server import make_server, page_config, serve_until

    config = page_config(args.topics, ws_url=args.ws_url, username=args.username, password=args.web_password)
    try:
        server = make_server(args.web_host, args.web, config)
    except OSError as exc:
        print(f"fedmq-monitor: error: cannot serve the web view on {args.web_host}:{args.web}: {exc.strerror or exc}",
              file=sys.stderr)
        return 1
    host, port = server.server_address[:2]
    broker = args.ws_url or f"ws://<this host>:{config['ws_port']}"
    print(f"fedmq-monitor: the web view of fleet {args.fleet} is on http://{host}:{port}/ (broker {broker})", flush=True)
    serve_until(server, stop)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the monitor; 0 when stopped (or after --once), 1 broker unreachable, 2 bad configuration."""
    try:
        args = parse_args(argv)
    except SystemExit as exc:  # the parser printed its one-line error, or --help
        return exc.code if isinstance(exc.code, int) else 2
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.web is not None:  # the stdlib alone: no extra needed
        stop, relay = stop_event_on_signals()  # protocol/stopping.py
        with relay:
            return run_web(args, stop)
    try:
        from monitor import live
    except ImportError as exc:  # rich is an extra
        print(f"fedmq-monitor: error: {exc.name} is missing: pip install 'fedmq[monitor]'", file=sys.stderr)
        return 2
    stop, relay = stop_event_on_signals()
    session = live.MonitorSession(args.topics, args.settings, max_model_bytes=args.max_model_bytes,
                                   max_classes=args.max_classes)
    try:
        session.start(args.connect_timeout)
    except BrokerError as exc:
        relay.close()
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
        relay.close()
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
