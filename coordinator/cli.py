"""`fedmq-coordinator`: owns the model spec, aggregates updates, republishes the global model."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from coordinator.aggregation import parse_aggregate
from coordinator.acks import ACK_INTERVAL_S
from coordinator.chunks import MAX_HELD, TIMEOUT_S
from coordinator.evaluation import load_eval_set
from coordinator.privacy import PrivateCoordinator, guard, make_policy
from coordinator.rate_limit import RateLimit
from coordinator.presence import Presence
from coordinator.publish_policy import CHANGE, POLICIES, PublishPolicy
from protocol.pace import DEFAULT_JITTER, DEFAULT_MAX_INTERVAL, MAX_JITTER, Steering
from coordinator.schema import FleetSchema, SchemaDiscovery, discover
from coordinator.server import Coordinator
from coordinator.session import CoordinatorSession
from coordinator.staleness import parse_staleness
from coordinator.statistics import FleetStatistics
from coordinator.store import CheckpointError, load_checkpoint
from coordinator.strategies import DEFAULT_ALPHA, make_strategy
from coordinator.validation import (BYTES_PER_AGENT, DEFAULT_MAX_AGENTS, DEFAULT_MAX_NORM, DEFAULT_NORM_FACTOR,
                                   DEFAULT_SAMPLE_FACTOR, NORM_WARMUP, REACH, STANDING,
                                   REPLAY_BUDGET_BYTES, NormBound, UpdateValidator)
from protocol.chunking import MIN_PACKET_BYTES
from protocol.codec import MODEL_CODECS
from protocol.config import fleet_tool_parser, parse_layered, require_extra
from protocol.model_spec import ESTIMATORS, HYPERPARAMETERS, ModelSpec, build_estimator
from protocol.privacy import GaussianMechanism
from protocol.stats_message import unnamed_stats_bytes
from protocol.stopping import stop_event_on_signals
from protocol.tabular import DataError
from protocol.topics import Topics
from protocol.transport import BrokerError, settings_from_args

log = logging.getLogger("coordinator")


def build_parser() -> argparse.ArgumentParser:
    p = fleet_tool_parser(
        "fedmq-coordinator",
        "Aggregate model updates from a fleet of fedmq agents over MQTT and republish the global model.",
        "fleet name: topics live under <prefix>/<fleet>/",
    )

    m = p.add_argument_group("model (the coordinator owns the spec; agents learn it from the model topic)")
    m.add_argument("--model", choices=sorted(ESTIMATORS), help="estimator kind (required)")
    m.add_argument("--n-features", type=int,
                   help="number of input features (default: the columns the first agents announce on schema/<agent>)")
    m.add_argument("--classes",
                   help="comma-separated class labels, e.g. 0,1,2 (classifiers; default: the labels of the first agents)")
    _defaulted(m, "--schema-agents", type=int, default=1,
               help="without --n-features (or a classifier's --classes): fix the spec once a column set is held "
               "by this many agents and by more than half of those that announced; a discovered spec another "
               "column set out-votes is discovered again")
    m.add_argument("--schema-wait", type=float, metavar="SECONDS",
                   help="fix the spec this many seconds after the first announcement even if fewer than "
                   "--schema-agents came (default: wait for them)")
    m.add_argument(
        "--hyperparameters", default="{}",
        help='SGD hyperparameters as a JSON object (\'{"alpha": 1e-4, "loss": "log_loss"}\') or as '
        "k=v pairs (alpha=1e-4,loss=log_loss); settable: " + ", ".join(sorted(HYPERPARAMETERS))
        + " (default: none, scikit-learn's own values)",
    )

    a = p.add_argument_group("aggregation")
    _defaulted(a, "--strategy", choices=("fedasync", "fedbuff", "fedavg"), default="fedasync",
               help="fedasync: mix each update as it arrives; fedbuff: buffer K, then step; fedavg: synchronous rounds of K")
    _defaulted(a, "--alpha", type=float, default=DEFAULT_ALPHA, help="fedasync mixing weight in (0, 1], times the staleness weight")
    _defaulted(a, "--staleness", default="polynomial:0.5",
               help="staleness weight w(s): constant, polynomial:A = (1+s)^-A, or hinge:A,B = 1 up to s=B, then 1/(A(s-B)+1)")
    _defaulted(a, "--buffer-size", type=int, default=5, help="K: updates per step (fedbuff) or per round (fedavg); while fewer agents are online "
               "(by their retained statuses) K is their number")
    _defaulted(a, "--buffer-timeout", type=float, default=30.0,
               help="fedbuff/fedavg: step with the updates buffered so far once the oldest waited this many "
               "seconds, so fewer live agents than K never stall the fleet; 0: wait for K")
    _defaulted(a, "--buffer-memory", type=int, default=0, metavar="AGENTS",
               help="fedbuff: remember the newest update of up to this many agents and aggregate all of them at "
               "every step (MIFA), so a slow device's update is not washed out by the fast ones' between its "
               "rounds; costs AGENTS x the model's float64 size in memory and in each checkpoint; 0: off")
    _defaulted(a, "--server-lr", type=float, default=1.0, help="server learning rate of fedbuff/fedavg steps")
    _defaulted(a, "--aggregate", default="mean",
               help="buffered rule: mean (sample-weighted, no row above the buffer's median count), or the "
               "coordinate-wise median or trimmed-mean:FRACTION that resist poisoned updates")
    _defaulted(a, "--max-staleness", type=int, default=1000,
               help="reject (too_stale) updates whose base is more than this many versions old")

    v = p.add_argument_group("validation")
    _defaulted(v, "--max-update-norm", type=float, default=DEFAULT_MAX_NORM,
               help="absolute L2 bound on a decoded update")
    v.add_argument("--norm-factor", type=float,
                   help="relative L2 bound on how far an update's model (its base + delta) lies from the current "
                   "model (under fedbuff/fedavg the smaller of that and the delta's norm: what the step adds): this "
                   "many times the median of that measure for the newest update of each of the other "
                   f"agents among the last 50, once {NORM_WARMUP} were seen; 0: off (default {DEFAULT_NORM_FACTOR:g}; off "
                   "under --secure-aggregation, which sees no single update, and --dp-mode central, which refuses the flag)")
    _defaulted(v, "--sample-factor", type=float, default=DEFAULT_SAMPLE_FACTOR,
               help="weigh an update (in the mean and the fleet evaluation) by at most this many times the "
               "median sample count of the other agents among the last 50, once 10 were seen, whatever it claims")
    _defaulted(v, "--norm-action", choices=("reject", "clip"), default="reject",
               help="an update above the bound is rejected (norm) or scaled down to it (counted as clipped); "
               f"under reject, one above the relative bound (at most {REACH:g}x it) that agrees with the recent accepted "
               f"deltas, from an agent not refused {STANDING} times in a row, is taken at the others' median norm (clipped)")
    _defaulted(v, "--max-message-bytes", type=int, default=4 * 1024 * 1024, help="refuse larger update payloads (oversize)")
    _defaulted(v, "--max-agents", type=int, default=DEFAULT_MAX_AGENTS,
               help="refuse (too_many_agents) updates of agents beyond this many: the replay state (each "
               f"agent's newest seq) is never forgotten; the default is a {REPLAY_BUDGET_BYTES // 2**20} MiB budget "
               f"at {BYTES_PER_AGENT} bytes per agent")
    v.add_argument("--max-agent-rate", type=float, metavar="PER_MINUTE",
                   help="at most this many updates per agent per minute, in bursts of up to as many; more are "
                   "refused (rate) before decoding, so one flooding agent cannot own the model (default: none)")

    add_dp_arguments(p)

    add_secagg_arguments(p)

    add_pace_arguments(p)

    o = p.add_argument_group("publishing, durability, evaluation")
    _defaulted(o, "--publish-interval", type=float, default=1.0,
               help="the longest a changed model waits to be published, in seconds (under --publish-policy clock: "
               "publish at most once per this many seconds, so bursts of updates are coalesced); also the status's "
               "cadence when only rejections happen")
    _defaulted(o, "--publish-policy", choices=POLICIES, default=CHANGE,
               help="change: publish a changed model at once when a step moved it by --publish-min-change or "
               "--publish-waiting-share of the active agents wait for a newer one, never within "
               "--publish-min-interval of the last publish, and at the latest after --publish-interval; "
               "clock: only on the --publish-interval clock")
    _defaulted(o, "--publish-min-interval", type=float, default=PublishPolicy.min_interval,
               help="seconds between two model publishes at least (bounds every device's downloads; at most "
               "--publish-interval)")
    _defaulted(o, "--publish-min-change", type=float, default=PublishPolicy.min_change,
               help="relative L2 change of the parameters since the last published model that publishes at once")
    _defaulted(o, "--publish-waiting-share", type=float, default=PublishPolicy.waiting_share,
               help="share of the active agents (those whose newest update was trained on the published model or "
               "the one before) waiting, their update folded and nothing newer to train on, that publishes at once")
    _defaulted(o, "--model-codec", choices=MODEL_CODECS, default="float32",
               help="how the model travels: float16 halves it, int8 (one scale per row) quarters it, int4 (two per "
               "byte) an eighth; the "
               "coordinator keeps float64 and takes updates against exactly what agents received")
    add_max_packet_argument(o)
    _defaulted(o, "--max-held-chunks", type=int, default=MAX_HELD,
               help="acknowledgements of chunked updates' chunks held back until their update is committed, in "
               "total (one agent: half); keep it below the broker's max_inflight_messages, or one agent's partial "
               "update stalls every other (past it, acks go out at once and the chunks are kept)")
    _defaulted(o, "--chunk-timeout", type=float, default=TIMEOUT_S, metavar="SECONDS",
               help="drop a chunked update not complete this many seconds after its first chunk (counted)")
    _defaulted(o, "--ack-interval", type=float, default=ACK_INTERVAL_S, metavar="SECONDS",
               help="an agent's ack (ack/<agent>, its highest durably accepted seq) at most once per this many "
               "seconds, the newest seq (0: with every commit that accepted its updates)")
    o.add_argument("--checkpoint-dir",
                   help="checkpoint the model, its version and the replay state here before each publish and resume "
                   "from it on start (a newer retained model of the same spec on the broker wins: versions never go back)")
    o.add_argument("--eval-csv", help="held-out CSV scored at each publish (accuracy or r2 in the status)")
    _defaulted(o, "--label-column", default="label", help="label column of --eval-csv")
    o.add_argument("--metrics-log", metavar="FILE.jsonl", help="append every published status as a JSON line (plot it with fedmq-report)")
    o.add_argument("--audit-log", metavar="FILE.jsonl",
                   help="append one line per received update: agent, seq and accepted or the rejection reason")
    add_metrics_argument(o)
    s = p.add_argument_group("feature statistics (federated standardization)")
    s.add_argument("--feature-stats", action=argparse.BooleanOptionalAction,
                   help="merge the agents' per-feature statistics (stats/<agent>) and publish mean and scale with the "
                   "model; agents and --eval-csv standardize with them and missing values take the fleet mean. The "
                   "first model waits for --stats-min-agents agents' statistics. Default: on for the linear models, "
                   "off under --dp-mode or --secure-aggregation, or when an agent's statistics (40 bytes a feature) "
                   "exceed --max-packet-bytes (what the statistics reveal: docs/security.md)")
    _defaulted(s, "--stats-min-agents", type=int, default=1,
               help="with --feature-stats: agents whose statistics the first model waits for (later ones refine it)")
    p.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                   help="logging level (default: INFO)")
    return p


def add_secagg_arguments(parser: argparse.ArgumentParser) -> None:
    """The --secure-aggregation and --secagg-* flags (the coordinator's, and the scale-out tier root's, which
    forms each cohort inside one partition, under the same names)."""
    sec = parser.add_argument_group("secure aggregation (fedbuff: the coordinator learns only the sum of each cohort; needs pip install 'fedmq[secagg]'; docs/security.md)")
    sec.add_argument("--secure-aggregation", action="store_true",
                     help="run fedbuff over masked cohorts of --buffer-size agents; updates in the clear are refused "
                     "(the agents need --secure-aggregation too)")
    sec.add_argument("--secagg-threshold", type=int, metavar="T",
                     help="shares needed to unmask; fewer surviving agents abort the round (default: K // 2 + 1)")
    _defaulted(sec, "--secagg-clip", type=float, default=10.0,
               help="agents clip each coordinate to [-CLIP, CLIP] before quantizing: the first cohort's clip, then "
               "adapted (--secagg-clip-target); with --dp-mode central it is --dp-clip, fixed")
    _defaulted(sec, "--secagg-clip-target", type=float, default=0.01,
               help="after each round the clip moves towards leaving this fraction of coordinates clipped, from the "
               "cohort's count of clipped coordinates summed inside the mask; 0 keeps --secagg-clip fixed")
    _defaulted(sec, "--secagg-timeout", type=float, default=10.0, help="seconds at most each stage of a round waits for answers")
    _defaulted(sec, "--secagg-grace", type=float, default=2.0,
               help="once T members have answered a stage, seconds it waits for the rest (at once if they are offline)")
    _defaulted(sec, "--secagg-backoff", type=float, default=30.0,
               help="a member that misbehaves in a round (no answer, shares that do not open, a bad reveal) is left out "
               "of cohorts for this many seconds, doubled per further strike (at most an hour); a good round clears it")


def add_dp_arguments(parser: argparse.ArgumentParser) -> None:
    """The --dp-* flags (the coordinator's, and the scale-out tier root's under the same names)."""
    dp = parser.add_argument_group("differential privacy (needs pip install 'fedmq[dp]'; docs/security.md)")
    dp.add_argument("--dp-mode", choices=("local", "central"),
                    help="central: clip each update to --dp-clip and add noise of std --dp-noise x C to the sum of each "
                    "fedbuff/fedavg buffer; local: the agents noise, the status reports the epsilon their accepted "
                    "updates imply at --dp-noise (default: no DP)")
    dp.add_argument("--dp-clip", type=float, metavar="C", help="L2 bound C of one update (central: enforced here)")
    dp.add_argument("--dp-noise", type=float, metavar="SIGMA", help="noise multiplier sigma (central: of the noise added here)")
    _defaulted(dp, "--dp-delta", type=float, default=1e-5, help="report epsilon at this delta")
    dp.add_argument("--dp-epsilon-budget", type=float, metavar="EPSILON",
                    help="central: refuse (dp_budget) an update that would take its agent's epsilon above this (default: none)")
    dp.add_argument("--dp-noise-by", choices=("coordinator", "agents"),
                    help="with --secure-aggregation and --dp-mode central, who adds the noise: coordinator (to each "
                    "decoded cohort sum) or agents (each member adds its share inside its masked input, so the "
                    "coordinator never decodes an un-noised sum: distributed DP) (default: coordinator)")
    dp.add_argument("--dp-neighbours", choices=("add-remove", "replace-one"),
                    help="the neighbour relation epsilon is reported under: add-remove (sensitivity C) or replace-one "
                    "(2C: one device's data swapped for any other) (default: replace-one for local, add-remove for central)")
    _defaulted(dp, "--dp-norm-action", choices=("reject", "clip"), default="clip",
               help="central: an update above C is scaled down to C, or rejected (dp_norm; the accepted count then "
               "moves by one less on an over-C update, an un-noised bit)")


def int_or_off(text: str) -> int | None:
    """An integer flag whose 0 means off (None), so a compose file can leave it off from an unset variable."""
    try:
        return int(text) or None
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def add_max_packet_argument(parser) -> None:
    """--max-packet-bytes (the coordinator's, and the scale-out tier root's: models over it go as chunks)."""
    parser.add_argument("--max-packet-bytes", type=int_or_off, metavar="BYTES",
                        help="the broker's packet limit (e.g. 131072 for AWS IoT Core): a larger model is sent as "
                        "retained chunks under model/chunk/<i> with a manifest on the model topic (default, or 0: "
                        "no limit)")


def check_max_packet_bytes(limit: int | None) -> None:
    """ValueError (one line) for a --max-packet-bytes too small for the model topic's manifest."""
    if limit is not None and limit < MIN_PACKET_BYTES:
        raise ValueError(f"--max-packet-bytes must be at least {MIN_PACKET_BYTES}")


def add_metrics_argument(parser) -> None:
    """--metrics-port (the coordinator's, and the scale-out tier root's and workers')."""
    parser.add_argument("--metrics-port", type=int_or_off,
                        help="serve Prometheus metrics on this port at /metrics (needs prometheus-client: pip install "
                             "'fedmq[coordinator]'; default, or 0: none)")


def check_metrics_port(port: int | None) -> None:
    """ValueError (one line) for a --metrics-port outside 1..65535."""
    if port is not None and not 0 < port < 65536:
        raise ValueError("--metrics-port must be in 1..65535")


def add_pace_arguments(parser: argparse.ArgumentParser) -> None:
    """The --target-updates-per-s and --pace-* flags (the coordinator's, and the scale-out tier root's, which
    counts the agents online the same way, under the same names)."""
    pg = parser.add_argument_group("pace steering (the model tells each device how often to train and report; "
                                   "docs/architecture.md)")
    _defaulted(pg, "--target-updates-per-s", type=float, default=0.0, metavar="RATE",
               help="updates a second wanted from the whole fleet: every device is asked to report once per "
               "(agents online / RATE) seconds, randomised, so the update rate and the model downloads stay near "
               "RATE as the fleet grows; 0: no steering, devices keep their own schedule")
    _defaulted(pg, "--pace-min-interval", type=float, default=1.0, metavar="SECONDS",
               help="the shortest report interval asked of a device (a small fleet is not driven faster)")
    _defaulted(pg, "--pace-max-interval", type=float, default=DEFAULT_MAX_INTERVAL, metavar="SECONDS",
               help="the longest report interval asked of a device (a huge fleet reports above RATE rather "
               "than devices going silent)")
    _defaulted(pg, "--pace-jitter", type=float, default=DEFAULT_JITTER, metavar="FRACTION",
               help=f"devices draw each wait uniformly in interval x [1 - F, 1 + F] so they spread out; 0..{MAX_JITTER}")


def steering_from_args(args: argparse.Namespace) -> Steering | None:
    """The pace settings of parsed --target-updates-per-s / --pace-* flags; None when not steered.
    ValueError (one line) with --secure-aggregation, whose cohorts set their own pace, or impossible bounds."""
    if not args.target_updates_per_s:
        return None
    if getattr(args, "secure_aggregation", False):
        raise ValueError("--target-updates-per-s does not combine with --secure-aggregation: cohorts set "
                         "their own pace")
    return Steering(args.target_updates_per_s, args.pace_min_interval, args.pace_max_interval, args.pace_jitter)


def _defaulted(group, *flags: str, **kwargs) -> None:
    """add_argument with the default written into the help text.

    (argparse's %(default)s would show the placeholder that protocol.config.parse_layered
    puts in place of defaults while parsing.)
    """
    kwargs["help"] = f"{kwargs['help']} (default {kwargs['default']})"
    group.add_argument(*flags, **kwargs)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Layered arguments with the cross-field checks; exits 2 with one line on bad config."""
    parser = build_parser()
    args = parse_layered(parser, argv, required=("broker", "fleet", "model"))
    try:
        args.topics = Topics(args.fleet, args.topic_prefix)
        args.hyper = parse_hyperparameters(args.hyperparameters)
        args.classes_given = parse_classes(args.classes)
        if args.schema_agents < 1 or (args.schema_wait is not None and args.schema_wait < 0):
            raise ValueError("--schema-agents must be >= 1 and --schema-wait >= 0")
        if args.n_features is not None and (args.model != "sgd-classifier" or args.classes_given):
            args.spec = ModelSpec(args.model, args.n_features, args.classes_given, args.hyper)
        else:  # the schema comes from the fleet (coordinator/schema.py): checked now on a stand-in
            args.spec = None
            ModelSpec(args.model, args.n_features or 1, args.classes_given or
                      ((0, 1) if args.model == "sgd-classifier" else ()), args.hyper)
        check_hyperparameters(args.spec or ModelSpec(args.model, 1, (0, 1) if args.model == "sgd-classifier" else (),
                                                     args.hyper))
        args.staleness_fn = parse_staleness(args.staleness)
        parse_aggregate(args.aggregate)  # checked whatever the strategy, so a typo never waits
        if args.buffer_size < 1 or not args.server_lr > 0 or not 0 < args.alpha <= 1:
            raise ValueError("--buffer-size must be >= 1, --server-lr > 0 and --alpha in (0, 1]")
        args.strategy_obj = make_strategy(
            args.strategy, alpha=args.alpha, staleness=args.staleness_fn,
            buffer_size=args.buffer_size, server_lr=args.server_lr, aggregate=args.aggregate,
            memory=args.buffer_memory,
        )
        if args.buffer_memory and (args.dp_mode is not None or args.secure_aggregation):
            raise ValueError("--buffer-memory does not combine with --dp-mode or --secure-aggregation: a remembered "
                             "update enters many steps, which neither accounts for")
        args.strategy_obj, args.dp_policy = make_dp(args, args.strategy_obj)
        if args.dp_mode is not None:
            check_central_dp(args)
            if args.dp_mode == "local" and args.model == "sgd-classifier" and not args.classes_given:
                raise ValueError("under local DP the agents announce no label set: give --classes")
        if args.dp_noise_by is not None and not (args.secure_aggregation and args.dp_mode == "central"):
            raise ValueError("--dp-noise-by needs --secure-aggregation and --dp-mode central")
        if args.secure_aggregation:  # coordinator/secagg.py
            require_extra("cryptography", "secagg", "--secure-aggregation")
            from coordinator.secagg import SecAggRounds, SecureCentralDP, SecureFedBuff  # cryptography: only when asked for

            if args.strategy != "fedbuff" or args.dp_mode == "local":
                raise ValueError("--secure-aggregation needs --strategy fedbuff and no --dp-mode local")
            dp = None
            if args.dp_mode == "central" and args.dp_neighbours == "replace-one":
                raise ValueError("--secure-aggregation accounts central DP under add-remove only: drop --dp-neighbours replace-one")
            if args.dp_mode == "central":  # noise on each cohort's decoded sum; the agents clip to --dp-clip
                dp = SecureCentralDP(GaussianMechanism(args.dp_clip, args.dp_noise), args.dp_delta,
                                     epsilon_budget=args.dp_epsilon_budget, noise_by=args.dp_noise_by or "coordinator")
                args.strategy_obj, args.dp_policy = args.strategy_obj.inner, None  # no per-update screen: none is seen
            if args.spec is None:
                raise ValueError("--secure-aggregation needs the spec up front: give --n-features (and --classes)")
            args.secagg_threshold = args.secagg_threshold or args.buffer_size // 2 + 1
            args.secagg_rounds = SecAggRounds(args.topics, args.spec.n_params, args.buffer_size, args.secagg_threshold,
                                              clip=args.secagg_clip, timeout=args.secagg_timeout,
                                              grace=args.secagg_grace, backoff=args.secagg_backoff,
                                              clip_target=args.secagg_clip_target or None,
                                              l2_clip=args.dp_clip if dp else None, eligible=dp.eligible if dp else None,
                                              noise=dp.agent_noise(args.secagg_threshold) if dp else None)
            args.strategy_obj = SecureFedBuff(args.strategy_obj, dp)
        args.steering = steering_from_args(args)
        args.feature_stats = feature_stats_default(args)
        args.norm = NormBound(args.max_update_norm, norm_factor(args), sample_factor=args.sample_factor)
        args.rate = RateLimit(args.max_agent_rate) if args.max_agent_rate is not None else None
        args.settings = settings_from_args(args)
        for name in ("publish_interval", "max_message_bytes", "connect_timeout"):
            if not getattr(args, name) > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0")
        args.publish_policy_obj = PublishPolicy(args.publish_interval, args.publish_min_interval,
                                                args.publish_min_change, args.publish_waiting_share, args.publish_policy)
        check_max_packet_bytes(args.max_packet_bytes)
        if args.ack_interval < 0:
            raise ValueError(f"--ack-interval must be >= 0, got {args.ack_interval:g}")
        if args.max_held_chunks < 1 or not args.chunk_timeout > 0:
            raise ValueError("--max-held-chunks must be >= 1 and --chunk-timeout > 0")
        if args.max_staleness < 0 or args.buffer_timeout < 0:
            raise ValueError("--max-staleness and --buffer-timeout must be >= 0")
        check_metrics_port(args.metrics_port)
        if args.eval_csv and not Path(args.eval_csv).is_file():  # now, not after the wait for the fleet's schema
            raise ValueError(f"{args.eval_csv}: no such file")
    except ValueError as exc:
        parser.error(str(exc))
    return args


# Models whose SGD needs standardized features, so --feature-stats is their default.
STATS_BY_DEFAULT = frozenset({"sgd-classifier", "sgd-regressor", "sgd-one-class-svm"})  # all linear


def feature_stats_default(args: argparse.Namespace) -> bool:
    """--feature-stats as given, else on for a linear model with no privacy flag.

    Devices log raw units and SGD on them diverges, so a newcomer gets the fleet's scaling; but
    the statistics are exact per-device means, variances and two readings per feature
    (docs/security.md), so any DP mode or secure aggregation leaves them off unless asked for
    (central DP refuses them outright: check_central_dp). Nor when one agent's statistics
    message is larger than --max-packet-bytes (statistics are not chunked).
    """
    if args.feature_stats is not None:
        return args.feature_stats
    if args.max_packet_bytes is not None and args.n_features and unnamed_stats_bytes(args.n_features) > args.max_packet_bytes:
        return False  # an agent's statistics would not pass the broker: the first model would wait for ever
    return args.model in STATS_BY_DEFAULT and args.dp_mode is None and not args.secure_aggregation


def make_dp(args: argparse.Namespace, strategy):
    """(the strategy to run, the DP policy or None) from the --dp-* flags; ValueError (one line) on a bad combination."""
    if args.dp_mode is None:
        if any(v is not None for v in (args.dp_clip, args.dp_noise, args.dp_epsilon_budget, args.dp_neighbours)):
            raise ValueError("--dp-clip, --dp-noise, --dp-epsilon-budget and --dp-neighbours need --dp-mode local or central")
        return strategy, None
    if args.dp_clip is None or args.dp_noise is None:
        raise ValueError(f"--dp-mode {args.dp_mode} needs --dp-clip and --dp-noise")
    try:
        return make_policy(args.dp_mode, strategy, GaussianMechanism(args.dp_clip, args.dp_noise), args.dp_delta,
                           epsilon_budget=args.dp_epsilon_budget, norm_action=args.dp_norm_action,
                           neighbours=args.dp_neighbours)
    except ImportError as exc:
        raise ValueError(str(exc)) from None


def norm_factor(args: argparse.Namespace) -> float | None:
    """The relative norm bound's factor: --norm-factor as given (0: off), else DEFAULT_NORM_FACTOR,
    except under central DP (a median of other agents' norms must not decide what enters the
    noised sum: check_central_dp refuses the flag) and secure aggregation (no update is seen alone)."""
    if args.norm_factor is not None:
        if args.norm_factor < 0:
            raise ValueError(f"--norm-factor must be > 0, or 0 for off, got {args.norm_factor:g}")
        return args.norm_factor or None
    if args.dp_mode == "central" or args.secure_aggregation:
        return None
    return DEFAULT_NORM_FACTOR


def check_central_dp(args: argparse.Namespace) -> None:
    """ValueError (one line) on a flag that central DP's guarantee cannot carry (issue 19)."""
    if args.dp_mode != "central":
        return
    if args.norm_factor is not None:
        raise ValueError("central DP refuses --norm-factor: a median of other agents' norms would decide whether an "
                         "update enters the noised sum (--dp-clip bounds each update)")
    if args.feature_stats:
        raise ValueError("central DP refuses --feature-stats: the model would carry the exact merged feature "
                         "scaling, un-noised (standardize the features on the devices instead)")
    if not args.checkpoint_dir:
        raise ValueError("central DP needs --checkpoint-dir: the fleet's privacy ledger must survive a restart")


def parse_classes(text: str | None) -> tuple:
    """``0,1,2`` -> (0, 1, 2); ValueError for a label that is not a number: CSV labels are read
    as numbers, so ``cat,dog`` would match no agent's rows and every row would be skipped."""
    if not text:
        return ()
    labels = [c.strip() for c in text.split(",") if c.strip()]
    words = [c for c in labels if not _is_number(c)]
    if words:
        raise ValueError(f"--classes {', '.join(map(repr, words[:3]))}: class labels are numbers (agents read CSV "
                         "labels as numbers, so these would match no row); give the numeric labels your CSVs use, "
                         "e.g. 0,1,2, and map names to numbers when you write the CSVs")
    return tuple(int(c) if c.lstrip("+-").isdigit() else float(c) for c in labels)


def _is_number(text: str) -> bool:
    try:
        return np.isfinite(float(text))
    except ValueError:
        return False


def parse_hyperparameters(text: str) -> dict:
    """A JSON object, or ``k=v,k=v`` where each v is read as JSON if it can be (1e-4, true, null)."""
    text = text.strip()
    if not text or text.startswith("{"):
        try:
            value = json.loads(text or "{}")
        except json.JSONDecodeError as exc:
            raise ValueError(f"--hyperparameters is not a JSON object: {exc}") from None
        if not isinstance(value, dict):
            raise ValueError("--hyperparameters must be a JSON object or k=v,... pairs")
        return value
    value = {}
    for pair in text.split(","):
        key, sep, raw = (part.strip() for part in pair.partition("="))
        if not sep or not key:
            raise ValueError(f"--hyperparameters: {pair.strip()!r} is not k=v (give k=v,k=v or a JSON object)")
        try:
            value[key] = json.loads(raw)
        except json.JSONDecodeError:
            value[key] = raw
    return value


def check_hyperparameters(spec: ModelSpec) -> None:
    """Let scikit-learn judge the values now, rather than every agent at its first fit."""
    estimator = build_estimator(spec)
    for check in ("_validate_params", "_more_validate_params"):  # scikit-learn >= 1.2
        if hasattr(estimator, check):
            getattr(estimator, check)()


def resolve_spec(args: argparse.Namespace, stop: threading.Event, *, from_checkpoint: bool = True) -> bool:
    """Set `args.spec` when the flags left it open: from the checkpoint (unless the fleet's schema
    is being discovered again), else from a majority of the fleet's agents.

    False when `stop` came before enough agents announced. ValueError, CheckpointError or
    BrokerError with one line.
    """
    if args.spec is not None:
        return True
    args.spec_discovered = True
    resume = load_checkpoint(args.checkpoint_dir) if args.checkpoint_dir and from_checkpoint else None
    if resume is not None and resume["spec"].estimator == args.model:
        args.spec = resume["spec"]  # the spec fixed before: versions and agents stay on it
        log.info("the model spec (%d features) comes from the checkpoint", args.spec.n_features)
        return True
    # its own short connection: with a username (use_username_as_clientid) it takes the
    # coordinator's session id, so with --checkpoint-dir it runs once, before any session exists
    discovery = SchemaDiscovery(args.schema_agents, args.schema_wait)
    log.info("no --n-features%s: waiting for %d agent(s) to announce their columns on %s",
             "" if args.n_features is None else " or --classes", args.schema_agents, args.topics.all_schemas)
    if not discover(args.settings, args.topics, discovery, connect_timeout=args.connect_timeout, stop=stop):
        return False
    args.spec = discovery.spec(args.model, args.hyper, n_features=args.n_features, classes=args.classes_given)
    args.known_schemas = discovery.usable()
    log.info("spec fixed from %d agent(s): %d features (%s)%s", len(discovery.first), args.spec.n_features,
             ", ".join(args.spec.columns[:8]) + (", ..." if args.spec.n_features > 8 else ""),
             f", classes {list(args.spec.classes)}" if args.spec.is_classifier else "")
    return True


@dataclass(frozen=True)
class Rediscovery:
    """What a coordinator whose discovered schema lost its majority hands to the next spec's."""

    version: int  # the new spec starts above it: versions never go backwards
    count: int  # times the schema was discovered again
    highest_seq: dict  # the dedup state: no update is taken twice
    gaps: int


def build_coordinator(args: argparse.Namespace, after: Rediscovery | None = None) -> Coordinator:
    """The core from parsed arguments; DataError, CheckpointError or ValueError with one line.

    A checkpoint of another spec than a discovered one (the schema was discovered again) is
    left behind but for its version, dedup state and rediscovery count (`after`)."""
    eval_data = load_eval_set(args.eval_csv, args.label_column, args.spec,
                              feature_stats=args.feature_stats) if args.eval_csv else None
    resume = load_checkpoint(args.checkpoint_dir) if args.checkpoint_dir else None
    discovered = getattr(args, "spec_discovered", False)
    if resume is not None and resume["spec"] == args.spec:
        after = None  # discovered again as it was: go on from the checkpoint
    elif resume is not None and discovered:
        if after is None or resume["version"] > after.version:
            after = Rediscovery(resume["version"], (resume.get("schema_agents") or {}).get("rediscovered", 0) + 1,
                                resume.get("highest_seq", {}), resume.get("gaps", 0))
        resume = None
    validator = UpdateValidator(
        args.topics, args.spec.n_params, max_staleness=args.max_staleness,
        norm=args.norm, norm_action=args.norm_action, max_bytes=args.max_message_bytes, rate=args.rate,
        max_agents=args.max_agents,
    )
    options = {}
    if args.dp_policy is not None:  # updates reach the strategy only through the DP screen
        validator = guard(validator, args.dp_policy)
        options["privacy"] = args.dp_policy
    if args.secure_aggregation:
        from coordinator.secagg import SecureCoordinator

        options["secagg"] = args.secagg_rounds
    core = (SecureCoordinator if args.secure_aggregation else PrivateCoordinator if args.dp_policy is not None else Coordinator)(
        args.topics, args.spec, args.strategy_obj, validator, publish_policy=args.publish_policy_obj,
        buffer_timeout=args.buffer_timeout or None,
        eval_data=eval_data, checkpoint_dir=args.checkpoint_dir, resume=resume, **options,
        model_codec=args.model_codec,
        statistics=FleetStatistics(args.topics, args.spec.n_features, min_agents=args.stats_min_agents,
                                   columns=args.spec.columns)
        if args.feature_stats else None,
        schema=FleetSchema(args.topics, args.spec, discovered=discovered, quorum=args.schema_agents,
                           known=getattr(args, "known_schemas", None)),
        presence=Presence(args.topics) if (args.strategy != "fedasync" or args.steering) and not args.secure_aggregation
        else None,
        steering=args.steering,
    )
    if after is not None:
        core.version_ = after.version + 1
        core.validator.restore(after.highest_seq, after.gaps)
        core.schema.rediscovered_ = after.count
        log.info("the fleet's schema discovered again (%d time(s)): version %d with the new spec", after.count,
                 core.version_)
    core.checkpoint()  # an unwritable --checkpoint-dir is a configuration error, found now
    return core


def main(argv: list[str] | None = None) -> int:
    """Run the coordinator until SIGINT/SIGTERM; 0 on a clean stop, 1 broker error, 2 bad config.

    A schema discovered from the fleet that loses its majority (coordinator/schema.py) is
    discovered again and the coordinator goes on with the new spec, above the old version."""
    stop, relay = stop_event_on_signals()  # protocol/stopping.py: no lock taken in the signal handler
    with relay:
        return _serve(argv, stop)


def _serve(argv: list[str] | None, stop: threading.Event) -> int:
    """main's work: parse, build the coordinator and run its session until `stop`; main's exit status."""
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    on_status, after = None, None
    while True:
        try:
            if not resolve_spec(args, stop, from_checkpoint=after is None):
                return 0
            core = build_coordinator(args, after=after)
            core.acks.interval = args.ack_interval
            if on_status is None and args.metrics_port:
                on_status = start_metrics(args.metrics_port)
            session = CoordinatorSession(core, args.settings, connect_timeout=args.connect_timeout,
                                         metrics_log=args.metrics_log, audit_log=args.audit_log, on_status=on_status,
                                         max_packet_bytes=args.max_packet_bytes, max_held_chunks=args.max_held_chunks,
                                         chunk_timeout=args.chunk_timeout)
        except (DataError, CheckpointError, ValueError, OSError) as exc:  # OSError: TLS files, ports
            print(f"fedmq-coordinator: error: {_one_line(exc)}", file=sys.stderr)
            return 2
        except BrokerError as exc:  # while waiting for the fleet's schema
            print(f"fedmq-coordinator: error: {exc}", file=sys.stderr)
            return 1
        log.info("fleet %s: %s with %d parameters, strategy %s, version %d",
                 args.fleet, args.model, args.spec.n_params, args.strategy, core.version_)
        try:
            session.run(stop)
        except BrokerError as exc:
            print(f"fedmq-coordinator: error: {exc}", file=sys.stderr)
            return 1
        if stop.is_set() or core.schema is None or not core.schema.lost_:
            break
        after = Rediscovery(core.version_, core.schema.rediscovered_ + 1, dict(core.validator.highest_seq),
                            core.validator.gaps_)
        args = parse_args(argv)  # a fresh strategy and buffer for the new spec
    log.info("stopped at version %d", core.version_)
    return 0


def start_metrics(port: int, collector=None):
    """The Prometheus exporter's publish callback; ValueError if it cannot be started. `collector()`, when given,
    makes the collector (the tier's: tier/metrics.py), imported only here, where a missing package is told."""
    try:
        from coordinator.metrics import start_metrics_server

        made = collector() if collector is not None else None
    except ImportError:
        raise ValueError("--metrics-port needs prometheus-client: pip install 'fedmq[coordinator]'") from None
    try:
        return start_metrics_server(port, collector=made)
    except OSError as exc:
        raise ValueError(f"--metrics-port {port}: {exc.strerror or exc}") from None


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())
