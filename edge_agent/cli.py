"""`fedmq-agent`: train on local data, send model deltas to the fleet's coordinator."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from edge_agent.agent import Agent
from edge_agent.data import CallableSource, CSVDirectory, CSVFile, DataSource
from edge_agent.session import AgentSession
from edge_agent.trainer import LocalTrainer
from protocol.codec import CodecSpec
from protocol.config import add_config_option, parse_layered
from protocol.tabular import DataError
from protocol.topics import Topics
from protocol.transport import BrokerError, add_broker_options, settings_from_args

log = logging.getLogger("edge_agent")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fedmq-agent",
        description="Train the fleet's model on this device's data and publish compressed updates over MQTT. "
        "The model itself comes from the coordinator. Every option can also be set as FEDMQ_<OPTION> "
        "in the environment or in a --config TOML file.",
    )
    add_config_option(p)
    add_broker_options(p)
    p.add_argument("--fleet", help="fleet name: topics live under fedmq/<fleet>/ (required)")
    p.add_argument("--id", dest="agent_id", metavar="ID", help="this agent's id, unique in the fleet (required)")
    p.add_argument("--topic-prefix", default="fedmq", help="first topic level")

    d = p.add_argument_group("data (one of --data, --data-dir, --data-source)")
    d.add_argument("--data", metavar="FILE.csv", help="CSV with a header; rows appended later are picked up")
    d.add_argument("--data-dir", metavar="DIR", help="every *.csv file in DIR, new files included")
    d.add_argument("--data-source", metavar="MODULE:FUNCTION", help="a Python callable returning new (X, y) at each poll")
    d.add_argument("--label-column", default="label", help="name of the label column in CSV data")
    d.add_argument("--window", type=int, help="keep at most this many newest rows (default: all)")

    t = p.add_argument_group("training")
    t.add_argument("--codec", default="int8", help="update codec: float32, int8, int4 or topk:FRACTION+QUANT (e.g. topk:0.05+int4)")
    t.add_argument("--local-epochs", type=int, default=1, help="passes over the local data per round")
    t.add_argument("--batch-size", type=int, default=32, help="rows per partial_fit call")
    t.add_argument("--min-new-samples", type=int, default=0, help="train on a newer model only once this many new rows arrived")
    t.add_argument("--train-every", type=float, metavar="SECONDS", help="also train on this schedule when new rows or a new model exist")
    t.add_argument("--poll-interval", type=float, default=1.0, help="seconds between checks for new data")
    t.add_argument("--seed", type=int, help="random seed for shuffling and stochastic rounding")
    p.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"), help="logging level")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parse_layered(parser, argv)
    for name, flag in (("broker", "--broker"), ("fleet", "--fleet"), ("agent_id", "--id")):
        if not getattr(args, name):
            parser.error(f"{flag} is required (or FEDMQ_{name.upper()} / {name} in --config)")
    if sum(bool(x) for x in (args.data, args.data_dir, args.data_source)) != 1:
        parser.error("give exactly one of --data, --data-dir or --data-source")
    try:
        args.topics = Topics(args.fleet, args.topic_prefix)
        Topics(args.fleet).update(args.agent_id)  # validates the id
        CodecSpec.parse(args.codec)
        args.settings = settings_from_args(args)
        if args.local_epochs < 1 or args.batch_size < 1 or args.min_new_samples < 0 or args.poll_interval <= 0:
            raise ValueError("--local-epochs and --batch-size must be >= 1, --min-new-samples >= 0, --poll-interval > 0")
    except ValueError as exc:
        parser.error(str(exc))
    return args


def open_source(args: argparse.Namespace) -> DataSource:
    """The data source the flags name, with its first rows read (so bad data fails at start)."""
    if args.data:
        source = CSVFile(args.data, args.label_column, args.window)
    elif args.data_dir:
        source = CSVDirectory(args.data_dir, args.label_column, args.window)
    else:
        source = CallableSource(args.data_source, args.window)
    return source


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        source = open_source(args)
        rows = source.poll()
    except DataError as exc:
        print(f"fedmq-agent: error: {exc}", file=sys.stderr)
        return 2
    trainer = LocalTrainer(args.local_epochs, args.batch_size, random_state=args.seed)
    agent = Agent(args.agent_id, args.topics, source, trainer, args.codec,
                  min_new_samples=args.min_new_samples, train_every=args.train_every, seed=args.seed)
    agent.new_samples_ = rows
    session = AgentSession(agent, args.settings, connect_timeout=args.connect_timeout, poll_interval=args.poll_interval)
    stop = threading.Event()

    def request_stop(*_):
        stop.set()
        session.wake.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, request_stop)
    log.info("agent %s in fleet %s: %d rows, codec %s; waiting for the global model", args.agent_id, args.fleet, rows, args.codec)
    try:
        session.run(stop)
    except BrokerError as exc:
        print(f"fedmq-agent: error: {exc}", file=sys.stderr)
        return 1
    except DataError as exc:
        print(f"fedmq-agent: error: {exc}", file=sys.stderr)
        return 2
    log.info("stopped after %d updates", agent.updates_sent_)
    return 0
