"""`fedmq-sim`: many virtual agents and a coordinator through a broker on this machine."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from protocol.codec import CodecSpec
from protocol.config import CliParser, add_config_option, optional_extra, parse_layered
from protocol.pace import Steering
from protocol.transport import BrokerError, BrokerSettings, connect, make_client
from simulation.datasets import DATASETS, centralized_baseline, load_dataset
from simulation.fleet import SimConfig, Simulation
from simulation.partition import parse_scheme
from simulation.report import plot, summary_rows
from simulation.stragglers import DROPOUT_MODES, parse_duty_cycle, parse_speed


def build_parser() -> argparse.ArgumentParser:
    d = SimConfig()
    p = CliParser(
        prog="fedmq-sim",
        description="Simulate a fedmq fleet on one machine: the real agents, codec, coordinator and MQTT, "
        "on an embedded broker unless --broker names one.",
    )
    add_config_option(p)
    p.add_argument("--broker", metavar="URL", help="mqtt://HOST:PORT of a broker to use (default: start an embedded one)")
    p.add_argument("--mqtt-version", choices=("3.1.1", "5"), default="3.1.1", help="MQTT protocol version of all clients")
    p.add_argument("--dataset", choices=DATASETS, default=d.dataset, help="training data (sklearn bundled, or synthetic linear)")
    p.add_argument("--raw-units", action="store_true",
                   help="the dataset in its own units (wine's proline near 1,000), scaled only by the federated feature "
                   "statistics the agents send (the coordinator runs as with --feature-stats)")
    p.add_argument("--feature-skew", type=float, default=d.feature_skew, metavar="SPREAD",
                   help="give each agent its own sensor calibration: per-feature gain 10^U(-SPREAD, SPREAD) and offset up "
                   "to SPREAD deviations (implies federated feature statistics)")
    p.add_argument("--agents", type=int, default=d.agents, help="number of virtual agents")
    p.add_argument("--partition", default=d.partition, help="how data is split: iid, dirichlet:ALPHA or shards:K")
    p.add_argument("--strategy", choices=("fedasync", "fedbuff", "fedavg"), default=d.strategy, help="aggregation strategy")
    p.add_argument("--alpha", type=float, default=d.alpha, help="fedasync mixing weight")
    p.add_argument("--staleness", default=d.staleness, help="constant, polynomial:A or hinge:A,B")
    p.add_argument("--buffer-size", type=int, default=d.buffer_size, help="fedbuff K / fedavg clients per round")
    p.add_argument("--server-lr", type=float, default=d.server_lr, help="fedbuff/fedavg server learning rate")
    p.add_argument("--aggregate", default=d.aggregate, help="mean, median or trimmed-mean:FRACTION")
    p.add_argument("--codec", default=d.codec, help="float32, int8, int4 or topk:FRACTION+QUANT")
    p.add_argument("--local-epochs", type=int, default=d.local_epochs, help="local passes per round")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="rows per partial_fit call")
    p.add_argument("--duration", type=float, default=d.duration, help="seconds to run")
    p.add_argument("--target", type=float, help="accuracy (or r2) whose time to reach is reported")
    p.add_argument("--stop-at-target", action="store_true", help="stop as soon as --target is reached")
    p.add_argument("--round-time", type=float, default=d.round_time, help="simulated seconds of compute per local round")
    p.add_argument("--stragglers", type=float, default=d.stragglers, help="fraction of agents that are slow")
    p.add_argument("--straggler-factor", type=float, default=d.straggler_factor, help="how many times slower a straggler is")
    p.add_argument("--dropout", type=float, default=d.dropout, help="chance an agent drops off after a round")
    p.add_argument("--dropout-time", type=float, default=d.dropout_time, help="seconds a dropped agent stays away")
    p.add_argument("--dropout-mode", choices=DROPOUT_MODES, default=d.dropout_mode,
                   help="hold: an agent drops after a round and sends it on return; lose: it drops mid-round and the round is lost")
    p.add_argument("--speed", default=d.speed,
                   help="device speeds: fixed, or lognormal:SIGMA (each agent's round time x exp(N(0, SIGMA^2)), a heavy tail)")
    p.add_argument("--duty-cycle", default=d.duty_cycle, metavar="ON,OFF",
                   help="agents are awake ON seconds, then asleep (offline) OFF seconds, from a random phase")
    p.add_argument("--network-delay", type=float, default=d.network_delay, help="extra seconds before each update is sent")
    p.add_argument("--publish-interval", type=float, default=d.publish_interval, help="coordinator's minimum seconds between models")
    p.add_argument("--target-updates-per-s", type=float, default=d.target_updates_per_s, metavar="RATE",
                   help="pace steering, as fedmq-coordinator's flag: updates a second wanted from the whole fleet "
                        "(each agent reports once per agents online / RATE seconds, randomised); 0: not steered")
    p.add_argument("--pace-min-interval", type=float, default=d.pace_min_interval, metavar="SECONDS",
                   help="with --target-updates-per-s: the shortest report interval asked of an agent")
    p.add_argument("--seed", type=int, default=d.seed, help="seed for data split, stragglers and training")
    p.add_argument("--json", metavar="FILE", help="write the full results (with the timeline) as JSON")
    p.add_argument("--plot", metavar="FILE.png", default="out/fedmq-sim.png", help="where to draw accuracy vs time and version")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (e.g. in CI logs)")
    p.add_argument("--log-level", default="WARNING", choices=("DEBUG", "INFO", "WARNING", "ERROR"), help="logging level")
    say_defaults(p)
    return p


def say_defaults(parser: argparse.ArgumentParser) -> None:
    """End every flag's help with its default, so --help says what a bare run does (20 agents, 30 s, ...)."""
    for action in parser._actions:
        if action.help and action.default not in (None, argparse.SUPPRESS) and action.default is not False \
                and "default" not in action.help:
            action.help += f" (default: {action.default})".replace("%", "%%")  # the value now: parsing swaps in a sentinel (protocol/config.py)


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parse_layered(parser, argv)
    try:
        parse_scheme(args.partition)
        CodecSpec.parse(args.codec)
        if args.agents < 1 or args.duration <= 0:
            raise ValueError("--agents must be >= 1 and --duration > 0")
        if args.feature_skew < 0:
            raise ValueError("--feature-skew must be >= 0")
        if not 0 <= args.stragglers <= 1 or not 0 <= args.dropout <= 1:
            raise ValueError("--stragglers and --dropout are fractions in [0, 1]")
        parse_speed(args.speed)
        parse_duty_cycle(args.duty_cycle)
        if args.target_updates_per_s < 0:
            raise ValueError("--target-updates-per-s must be >= 0 (0: not steered)")
        if args.target_updates_per_s:
            Steering(args.target_updates_per_s, args.pace_min_interval)  # the coordinator's own refusals
        if args.broker:
            BrokerSettings.from_url(args.broker)
    except ValueError as exc:
        parser.error(str(exc))
    return args


def reach(settings: BrokerSettings) -> None:
    """Connect once to --broker and leave: BrokerError (one line) when it does not answer, rather than a traceback
    from every simulated client and a summary of zeros."""
    client = make_client(settings, "fedmq-sim-probe", persistent=False)
    try:
        connect(client, settings)
    finally:
        client.disconnect()
        client.loop_stop()


def config_from_args(args: argparse.Namespace) -> SimConfig:
    fields = SimConfig.__dataclass_fields__
    return SimConfig(**{k: v for k, v in vars(args).items() if k in fields})


@optional_extra("fedmq-sim", "sim")
def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    console = Console(stderr=not sys.stdout.isatty())
    config = config_from_args(args)
    try:
        dataset = load_dataset(config.dataset, seed=config.seed, raw=config.raw_units)
        ceiling = load_dataset(config.dataset, seed=config.seed, raw=False)  # standardized pooled: the reference
    except ValueError as exc:
        print(f"fedmq-sim: error: {exc}", file=sys.stderr)
        return 2
    broker = None
    if args.broker:
        url = args.broker
    else:
        from simulation.embedded_broker import EmbeddedBroker

        broker = EmbeddedBroker()
        broker.start()
        url = broker.url
    settings = BrokerSettings.from_url(url, mqtt_version=args.mqtt_version)
    if not broker:
        try:
            reach(settings)
        except BrokerError as exc:
            print(f"fedmq-sim: error: {exc}", file=sys.stderr)
            return 1
    console.print(f"fedmq-sim: {config.agents} agents on {config.dataset} ({config.partition}), "
                  f"{config.strategy}, codec {config.codec}, broker {url}{' (embedded)' if broker else ''}")
    sim = Simulation(config, dataset, settings)
    try:
        if args.no_progress:
            result = sim.run()
        else:
            with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=console) as bar:
                task = bar.add_task("starting", total=config.duration)

                def show(s: Simulation) -> None:
                    last = s.timeline[-1] if s.timeline else None
                    text = "waiting for updates" if not last else (
                        f"version {last['version']:>5}  {dataset.metric} "
                        f"{(last['score'] or 0):.3f}  updates {s.traffic.updates_sent}")
                    bar.update(task, completed=min(config.duration, last["t"] if last else 0), description=text)

                result = sim.run(progress=show)
    except Exception as exc:  # broker unreachable, etc.: one line
        print(f"fedmq-sim: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        if broker:
            broker.stop()
    result["baseline"] = centralized_baseline(ceiling, seed=config.seed, hyperparameters=config.hyperparameters)
    table = Table(title="fedmq simulation")
    table.add_column("")
    table.add_column("", justify="right")
    for label, value in summary_rows(result):
        table.add_row(label, value)
    console.print(table)
    if args.plot:
        console.print(f"plot: {plot(result, args.plot)}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1, default=float))
        console.print(f"results: {args.json}")
    return 0
