"""`fedmq-agent`: train on local data, send model deltas to the fleet's coordinator."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from edge_agent.agent import Agent
from edge_agent.data import CallableSource, CSVDirectory, CSVFile, DataSource
from edge_agent.privacy_state import PrivacyStore, StateError
from edge_agent.session import NO_MODEL_WARNING_S, AgentSession
from edge_agent.trainer import DEFAULT_MAX_CLASSES, DEFAULT_MAX_FEATURES, DEFAULT_MAX_MODEL_BYTES, LocalTrainer, ModelLimits
from protocol.chunking import MIN_PACKET_BYTES
from protocol.accounting import check_available
from protocol.codec import CodecSpec
from protocol.config import fleet_tool_parser, parse_layered, require_extra
from protocol.pace import DEFAULT_MAX_INTERVAL
from protocol.privacy import GaussianMechanism
from protocol.stats_privacy import StatsMechanism, parse_bounds
from protocol.stopping import SignalRelay
from protocol.tabular import DataError
from protocol.topics import Topics
from protocol.transport import BrokerError, settings_from_args

log = logging.getLogger("edge_agent")


def build_parser() -> argparse.ArgumentParser:
    p = fleet_tool_parser(
        "fedmq-agent",
        "Train the fleet's model on this device's data and publish compressed updates over MQTT. "
        "The model itself comes from the coordinator.",
        "fleet name: topics live under <prefix>/<fleet>/",
    )
    p.add_argument("--id", metavar="ID", help="this agent's id, unique in the fleet (required)")
    p.add_argument("--allow-other-username", action="store_true",
                   help="let --username differ from --id: only for a broker whose ACL does not tie an agent's topics "
                   "to its username (the shipped broker/acl does, and drops such an agent's updates)")

    d = p.add_argument_group("data (one of --data, --data-dir, --data-source)")
    d.add_argument("--data", metavar="FILE.csv", help="CSV with a header; rows appended later are picked up")
    d.add_argument("--data-dir", metavar="DIR", help="every *.csv file in DIR, new files included")
    d.add_argument("--data-source", metavar="MODULE:FUNCTION", help="a Python callable returning new (X, y) at each poll")
    d.add_argument("--label-column", default="label", metavar="NAME", help="label column of CSV data (default: label)")
    d.add_argument("--unlabeled", action="store_true",
                   help="CSV data has no label column: every column is a feature (for --model sgd-one-class-svm)")
    d.add_argument("--window", type=int, metavar="ROWS", help="keep at most this many newest rows (default: all)")

    t = p.add_argument_group("training")
    t.add_argument("--codec", default="int8",
                   help="update codec: float32, int8, int4 or topk:FRACTION+QUANT, e.g. topk:0.05+int4 (default: int8)")
    t.add_argument("--local-epochs", type=int, default=1, metavar="E", help="passes over the local data per round (default: 1)")
    t.add_argument("--batch-size", type=int, metavar="B",
                   help="rows per partial_fit call; the SGD steps are per row either way (default: all rows in one call)")
    t.add_argument("--train-metrics", action="store_true",
                   help="also score the model after training (train_loss, train_accuracy) and send it with the "
                   "update: a second evaluation per round (default: only the received model's eval_*)")
    t.add_argument("--min-new-samples", type=int, default=0, metavar="N",
                   help="train on a newer model only once this many new rows arrived (default: 0)")
    t.add_argument("--train-every", type=float, metavar="SECONDS",
                   help="also train on this schedule when new rows or a new model exist (default: only on a newer model)")
    t.add_argument("--poll-interval", type=float, default=1.0, metavar="SECONDS",
                   help="seconds between checks for new data (default: 1)")
    t.add_argument("--resend-after", type=float, default=60.0, metavar="SECONDS",
                   help="train again and send a fresh update when no newer model arrived this long (times a "
                   "random 1-1.5) after the last update, in case it was lost; 0: never (default: 60)")
    t.add_argument("--min-model-interval", type=float, default=0.0, metavar="SECONDS",
                   help="take a model at most this often: after one, stop listening and read the newest retained "
                   "model once this long has passed, skipping the versions between (fewer wake-ups and "
                   "downloads); 0: every version (default: 0)")
    t.add_argument("--skip-models-in-rounds", action=argparse.BooleanOptionalAction, default=True,
                   help="when the models a round is expected to download while it trains (the last round's time "
                   "against the time between the models received) outweigh an unsubscribe and a resubscribe, stop "
                   "listening for models while it trains and read the newest retained one after it, instead of "
                   "downloading every version published meanwhile "
                   "(default: on; without --min-model-interval and a pace, which pause on their own)")
    t.add_argument("--max-pace", type=float, default=DEFAULT_MAX_INTERVAL, metavar="SECONDS",
                   help="the longest report interval this device accepts when the coordinator steers the fleet's pace "
                   "(a model message asking for more is capped here); under a pace the device trains and reports "
                   "once per a random wait around the interval, whatever --train-every says, and downloads the model "
                   f"once per round (default: {DEFAULT_MAX_INTERVAL:g})")
    t.add_argument("--seed", type=int, help="random seed for shuffling and stochastic rounding (default: random)")

    lim = p.add_argument_group("limits (what this device accepts from the fleet; a model beyond them is refused, "
                               "said in one line, and the agent waits for another)")
    lim.add_argument("--max-classes", type=int, default=DEFAULT_MAX_CLASSES, metavar="N",
                     help=f"train a model of at most N classes (default: {DEFAULT_MAX_CLASSES})")
    lim.add_argument("--max-features", type=int, default=DEFAULT_MAX_FEATURES, metavar="N",
                     help=f"train a model of at most N features (default: {DEFAULT_MAX_FEATURES})")
    lim.add_argument("--max-model-bytes", type=int, default=DEFAULT_MAX_MODEL_BYTES, metavar="BYTES",
                     help=f"train a model of at most BYTES of float32 parameters (default: {DEFAULT_MAX_MODEL_BYTES}, "
                     "about a million parameters)")
    lim.add_argument("--max-packet-bytes", type=int, metavar="BYTES",
                     help="the broker's packet limit (e.g. 131072 for AWS IoT Core): a larger update is sent as chunks "
                     "on update/<id>/chunk (default: no limit; a chunked model is assembled whatever this says)")
    lim.add_argument("--stop-timeout", type=float, default=10.0, metavar="SECONDS",
                     help="on SIGTERM/SIGINT, exit after this long even in the middle of a round (default: 10)")

    dp = p.add_argument_group("differential privacy (local: clip and noise every update on this device; needs pip install 'fedmq[dp]')")
    dp.add_argument("--dp-clip", type=float, metavar="C", help="clip each update's L2 norm to C before noise (with --dp-noise)")
    dp.add_argument("--dp-noise", type=float, metavar="SIGMA",
                    help="add Gaussian noise of standard deviation SIGMA x C to each coordinate (with --dp-clip)")
    dp.add_argument("--dp-delta", type=float, default=1e-5, metavar="DELTA",
                    help="report epsilon at this delta in the status (default: 1e-5)")
    dp.add_argument("--dp-epsilon-budget", type=float, metavar="EPSILON",
                    help="stop sending (state budget_spent) once the next update would take epsilon above this (default: none)")
    dp.add_argument("--dp-neighbours", choices=("add-remove", "replace-one"), default="replace-one",
                    help="the neighbour relation of the epsilon (status privacy.neighbours) and the budget: replace-one "
                    "(sensitivity 2C: this device's data swapped for any other; its participation is public to the "
                    "broker) or add-remove (sensitivity C) (default: replace-one)")

    dp.add_argument("--feature-stats", action=argparse.BooleanOptionalAction, default=True,
                    help="publish the data window's per-feature statistics (count, sum, sum of squares, min, max) on "
                    "stats/<id> for the coordinator's scaling; --no-feature-stats sends none (the coordinator then "
                    "needs --no-feature-stats or other agents' statistics). Under local DP only with --stats-noise "
                    "(default: on)")
    dp.add_argument("--stats-noise", type=float, metavar="SIGMA",
                    help="send the feature statistics noised (Gaussian, noise multiplier SIGMA, per row of the "
                         "window; min and max not sent), also under local DP (with --stats-clip)")
    dp.add_argument("--stats-clip", metavar="B|LO:HI,...",
                    help="clip every value to [-B, B], or feature i to LO_i:HI_i, before --stats-noise")
    dp.add_argument("--private", action="store_true",
                    help="publish nothing exact about the data, as under local DP and --secure-aggregation: no "
                    "statistics unless --stats-noise, no row or missing-cell count in the status, no label set in the "
                    "schema (the coordinator's --classes gives them); for fleets under central DP")
    dp.add_argument("--state-file", metavar="FILE",
                    help="the privacy ledger across restarts (needed with local DP or --stats-noise): the updates and "
                    "statistics released so far and the last noised statistics, written and fsync'd before each release")
    dp.add_argument("--reset-privacy-state", action="store_true",
                    help="start a new ledger (epsilon 0, said in the status as reset_at) when --state-file is missing or "
                    "corrupt; without it the agent refuses to start. A valid file is always continued")
    sec = p.add_argument_group("secure aggregation (needs pip install 'fedmq[secagg]')")
    sec.add_argument("--secure-aggregation", action="store_true",
                     help="never send an update in the clear: mask it in a cohort (the coordinator needs --secure-aggregation)")

    r = p.add_argument_group("reporting")
    r.add_argument("--status-interval", type=float, default=60.0, metavar="SECONDS",
                   help="republish the retained status as a heartbeat this often; it is published anyway on "
                   "every change of state (connected, first update, error, unheard, budget spent, offline) and "
                   "within 5 s of every new base version (at most one per 5 s), not per round: the update "
                   "itself says that; 0: no heartbeat (default: 60)")
    r.add_argument("--unheard-after", type=float, default=120.0, metavar="SECONDS",
                   help="say state unheard (with the reason) when no model came this long, or an update sent was "
                   "not acknowledged by the coordinator this long (on fedmq/<fleet>/ack/<id>, when its model says "
                   "it sends acks; else: no model newer than the last update's base came): its updates may never "
                   "reach the coordinator; with --mqtt-version 5 a refused update says so at once; 0: never "
                   "(default: 120)")
    r.add_argument("--no-model-warning", type=float, default=NO_MODEL_WARNING_S, metavar="SECONDS",
                   help="log a WARNING when no model came this long after connecting (wrong --fleet, no coordinator "
                   "running, an ACL hiding the model), again after twice as long and so on up to 10 min apart; "
                   f"0: never (default: {NO_MODEL_WARNING_S:g})")
    r.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                   help="logging level (default: INFO)")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parse_layered(parser, argv, required=("broker", "fleet", "id"))
    if sum(bool(x) for x in (args.data, args.data_dir, args.data_source)) != 1:
        parser.error("give exactly one of --data, --data-dir or --data-source")
    if args.username and args.username != args.id and not args.allow_other_username:
        parser.error(f"--id {args.id!r} and --username {args.username!r} differ: the broker's ACL lets an agent publish "
                     "only under its own username, so every update would be dropped (give the same, or "
                     "--allow-other-username for a broker whose ACL does not tie them)")
    try:
        args.topics = Topics(args.fleet, args.topic_prefix)
        args.topics.update(args.id)  # validates the id
        CodecSpec.parse(args.codec)
        args.settings = settings_from_args(args)
        if args.local_epochs < 1 or (args.batch_size is not None and args.batch_size < 1):
            raise ValueError("--local-epochs and --batch-size must be >= 1")
        if args.min_new_samples < 0 or args.status_interval < 0 or (args.window is not None and args.window < 1):
            raise ValueError("--min-new-samples and --status-interval must be >= 0, --window >= 1")
        if args.unheard_after < 0 or args.no_model_warning < 0:
            raise ValueError("--unheard-after and --no-model-warning must be >= 0 (0: never)")
        if not args.max_pace >= 0:
            raise ValueError("--max-pace must be >= 0 (0: ignore the coordinator's pace)")
        if args.resend_after < 0 or args.min_model_interval < 0:
            raise ValueError("--resend-after and --min-model-interval must be >= 0 (0: never, every version)")
        if args.poll_interval <= 0 or args.connect_timeout <= 0 or (args.train_every is not None and args.train_every <= 0):
            raise ValueError("--poll-interval, --connect-timeout and --train-every must be > 0")
        if min(args.max_classes - 2, args.max_features - 1, args.max_model_bytes - 12) < 0 or not args.stop_timeout > 0:
            raise ValueError("--max-classes must be >= 2, --max-features >= 1, --max-model-bytes >= 12, --stop-timeout > 0")
        if args.max_packet_bytes is not None and args.max_packet_bytes < MIN_PACKET_BYTES:
            raise ValueError(f"--max-packet-bytes must be at least {MIN_PACKET_BYTES}")
        args.limits = ModelLimits(args.max_classes, args.max_features, args.max_model_bytes)
        args.dp = parse_dp(args)
        args.stats_noise_mechanism = parse_stats_noise(args)
        if (args.dp is not None or args.stats_noise_mechanism is not None) and not args.state_file:
            raise ValueError("local DP and --stats-noise need --state-file: the privacy ledger must survive a restart")
        if args.dp is None and args.stats_noise_mechanism is None and (args.state_file or args.reset_privacy_state):
            raise ValueError("--state-file and --reset-privacy-state go with local DP (--dp-clip, --dp-noise) or --stats-noise")
        if args.secure_aggregation:
            require_extra("cryptography", "secagg", "--secure-aggregation")
    except ValueError as exc:
        parser.error(str(exc))
    return args


def parse_dp(args: argparse.Namespace) -> GaussianMechanism | None:
    """The local DP mechanism the --dp-* flags ask for (None without them); ValueError on a half-given one."""
    if args.dp_clip is None and args.dp_noise is None:
        if args.dp_epsilon_budget is not None:
            raise ValueError("--dp-epsilon-budget needs --dp-clip and --dp-noise")
        return None
    if args.dp_clip is None or args.dp_noise is None:
        raise ValueError("local DP needs both --dp-clip (C) and --dp-noise (sigma): clipping without noise protects nothing")
    mechanism = GaussianMechanism(args.dp_clip, args.dp_noise)
    if not 0 < args.dp_delta < 1 or (args.dp_epsilon_budget is not None and not args.dp_epsilon_budget > 0):
        raise ValueError("--dp-delta must be in (0, 1) and --dp-epsilon-budget > 0")
    require_accounting()
    return mechanism


def require_accounting() -> None:
    """ValueError (one line, naming the extra) when dp-accounting is not installed."""
    try:
        check_available()
    except ImportError as exc:
        raise ValueError(str(exc)) from None


def parse_stats_noise(args: argparse.Namespace) -> StatsMechanism | None:
    """The statistics' Gaussian mechanism --stats-noise and --stats-clip ask for (None without them)."""
    if args.stats_noise is None and args.stats_clip is None:
        return None
    if args.stats_noise is None or args.stats_clip is None:
        raise ValueError("noised statistics need both --stats-noise (sigma) and --stats-clip (the bounds)")
    mechanism = StatsMechanism(args.stats_noise, parse_bounds(str(args.stats_clip)))
    if not 0 < args.dp_delta < 1:
        raise ValueError("--dp-delta must be in (0, 1)")
    require_accounting()
    return mechanism


def privacy_identity(args: argparse.Namespace) -> dict:
    """What a state file must match: this agent, and the mechanisms its epsilon was counted under."""
    stats = args.stats_noise_mechanism
    return {
        "agent": args.id, "fleet": args.fleet,
        "dp": None if args.dp is None else [args.dp.noise_multiplier, args.dp_delta, args.dp_neighbours],
        "stats": None if stats is None else [stats.noise_multiplier, args.dp_delta, str(args.stats_clip)],
    }


def open_source(args: argparse.Namespace) -> DataSource:
    """The data source the flags name (DataError if it does not exist); not read yet."""
    if args.data:
        source = CSVFile(args.data, None if args.unlabeled else args.label_column, args.window)
    elif args.data_dir:
        source = CSVDirectory(args.data_dir, None if args.unlabeled else args.label_column, args.window)
    else:
        source = CallableSource(args.data_source, args.window)
    return source


def main(argv: list[str] | None = None) -> int:
    """Run the agent until SIGINT/SIGTERM; the exit status: 0 stopped, 1 broker error,
    2 usage, configuration or data error (one line on stderr, no traceback)."""
    try:
        args = parse_args(argv)
    except SystemExit as exc:  # argparse has printed usage and the error (or --help)
        return exc.code if isinstance(exc.code, int) else 2
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = threading.Event()
    sessions: list[AgentSession] = []  # the session once built, for the relay to wake
    watchdog: list[threading.Timer] = []

    def request_stop(signum: int) -> None:  # the relay thread (protocol/stopping.py), never the signal handler
        stop.set()
        for session in sessions:
            session.wake.set()
        if not watchdog:  # a round in progress is not interrupted; it gets --stop-timeout to finish
            watchdog.append(threading.Timer(args.stop_timeout, exit_now, (signal.Signals(signum).name,)))
            watchdog[0].daemon = True
            watchdog[0].start()

    def exit_now(name: str) -> None:
        log.warning("%s: still busy after %g s (--stop-timeout), exiting in the middle of a round", name, args.stop_timeout)
        logging.shutdown()
        os._exit(0)  # the broker publishes the last will (offline)

    with SignalRelay(request_stop):  # from here on, also while loading data and state: a stop is never lost
        return _run(args, stop, sessions)


def _run(args: argparse.Namespace, stop: threading.Event, sessions: list) -> int:
    """Build the agent from `args` and run its session until `stop`; main's exit status."""
    try:
        source = open_source(args)
        rows = source.poll()
    except DataError as exc:
        print(f"fedmq-agent: error: {exc}", file=sys.stderr)
        return 2
    if rows == 0:  # not an error (a device may log later), but said: it trains on nothing until rows come
        log.warning("%s has no data rows yet: waiting for rows to be appended before training",
                    args.data or args.data_dir or args.data_source)
    store = None
    if args.state_file:  # edge_agent/privacy_state.py
        store = PrivacyStore(args.state_file, privacy_identity(args))
        try:
            store.load_or_reset(args.reset_privacy_state)
        except (StateError, OSError) as exc:
            print(f"fedmq-agent: error: {exc}", file=sys.stderr)
            return 2
    trainer = LocalTrainer(args.local_epochs, args.batch_size, random_state=args.seed, limits=args.limits,
                           train_metrics=args.train_metrics)
    agent = Agent(args.id, args.topics, source, trainer, args.codec,
                  min_new_samples=args.min_new_samples, train_every=args.train_every, seed=args.seed,
                  resend_after=args.resend_after or None,
                  dp=args.dp, dp_delta=args.dp_delta, dp_epsilon_budget=args.dp_epsilon_budget,
                  dp_neighbours=args.dp_neighbours, stats_noise=args.stats_noise_mechanism, privacy_store=store,
                  private=args.private, max_pace=args.max_pace,
                  share_statistics=args.feature_stats)
    agent.new_samples_ = rows
    if args.secure_aggregation:  # edge_agent/secagg.py
        if args.dp is not None:
            print("fedmq-agent: error: --secure-aggregation with local DP is not supported", file=sys.stderr)
            return 2
        from edge_agent.secagg import SecAggClient  # cryptography: imported only when asked for

        agent.secure = SecAggClient(agent.agent_id, args.topics)
    session = AgentSession(agent, args.settings, connect_timeout=args.connect_timeout,
                           poll_interval=args.poll_interval, status_interval=args.status_interval,
                           min_model_interval=args.min_model_interval, max_packet_bytes=args.max_packet_bytes,
                           skip_models_in_rounds=args.skip_models_in_rounds,
                           unheard_after=args.unheard_after, no_model_warning=args.no_model_warning)
    sessions.append(session)
    try:
        session.run(stop)
    except BrokerError as exc:
        print(f"fedmq-agent: error: {exc}", file=sys.stderr)
        return 1
    log.info("stopped after %d updates", agent.updates_sent_)
    return 0
