"""The root of the scale-out tier: one active writer of the global model, any number of standbys.

Every root process campaigns for the lease `root` (tier/lease.py); the holder drains the
partial aggregates from JetStream (durable pull consumer, explicit ack), folds each partition's
partials in gap-free order ((partition, seq) high-water mark in its checkpoint: a repeat is
dropped, one that arrives ahead of a missing predecessor is handed back for later), steps the
model with the root rule (tier/steps.py), then commits: audit lines (every (agent, seq) a folded
partial covers), the fenced checkpoint (model, version, high-water marks, buffer), the retained
model over MQTT, and only then the acks of the partials. A standby that wins the lease restores
the checkpoint and carries on at its version: versions never go backwards across a failover.
With --secure-aggregation the partitions run masking rounds (tier/secagg.py) under the settings this
root writes into its checkpoint, and the root folds only cohort sums: a partial without a round, or
of fewer members than the threshold, is dropped.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
import time

import numpy as np
from nats.errors import TimeoutError as NatsTimeout
from nats.js import api
from nats.js.errors import NotFoundError

from coordinator.audit import AuditLog
from coordinator.cli import add_dp_arguments, add_secagg_arguments, parse_classes
from coordinator.publish_policy import PublishPolicy, floor, publish_due, relative_change
from coordinator.status import encode_status
from protocol.errors import ProtocolError
from protocol.messages import ModelMessage, decode_model, encode_model
from protocol.model_spec import ESTIMATORS, ModelSpec
from protocol.topics import Topics
from tier.cli_args import add_cluster_args, connect_nats, start_logging, start_with_retries, stop_on_signals
from tier.lease import Fenced, FencedRecord, Keeper, Lease, Vacancy
from tier.mqtt_link import Link, parse_urls
from tier.nats_io import Nats
from tier.partial import decode_partial
from tier.privacy import RootDP, root_dp
from tier.steps import RootRule, make_rule

log = logging.getLogger(__name__)

CONSUMER = "root"
ACK_WAIT_S = 5.0
BATCH = 256
STANDBY_POLL_S = 0.25
ECHO_S = 3.0  # the root subscribes to its own model: one not seen back within this is a dead connection
# the model and the status go out at QoS 0 (retained): NATS delivers a QoS 0 publish to every subscriber
# (the devices' QoS 1 subscriptions included) over core NATS at once, where a QoS 1 publish is first
# stored in the $MQTT_msgs stream and reaches a subscriber through its JetStream consumer: after a node's
# kill -9, that stream's and each consumer's leader election (4-9 s) held the new model back, and a store
# unacknowledged within the listener's js_api_timeout closed the root's connection. Nothing is lost at
# QoS 0: the retained copy is what a (re)connecting device gets, and a newer model replaces any missed one
MODEL_QOS = 0


class Root:
    """Campaigns for the root lease and, while it holds it, folds partials into the model."""

    def __init__(self, nats: Nats, mqtt_nodes, topics: Topics, spec: ModelSpec, rule: RootRule, *,
                 root_id: str, audit_log: str | None = None, buffer_timeout: float = 5.0,
                 publish_interval: float = 0.2, partitions: int = 32, dp: RootDP | None = None,
                 secagg: dict | None = None) -> None:
        self.nats = nats
        self.topics = topics
        self.spec = spec
        self.rule = rule
        self.root_id = root_id
        self.audit_path = audit_log
        self.buffer_timeout = buffer_timeout
        self.publish_interval = publish_interval
        # the coordinator's publish policy, by the model's change alone (partials carry no agent's waiting)
        self.publish_policy = PublishPolicy(max_interval=publish_interval, min_interval=min(0.05, publish_interval))
        self._published_params: np.ndarray | None = None
        self.partitions = partitions
        self.dp = dp
        self.secagg = secagg  # the partitions' secure-aggregation settings (tier/secagg.root_config)
        self.cohorts = 0  # cohort sums folded
        self.lease = Lease(nats, "root", root_id)
        self.keeper = Keeper()
        self.record = FencedRecord(nats, "root")
        self.retained_version = -1
        self.retained_seen = threading.Event()
        self._last_pub = 0.0
        # two connections to two nodes (one with a single node), never failing over to the other's node: when a
        # node dies the other one still carries the model at once, where a reconnect waited for the elections of
        # the session stream (4-9 s) and then up to the listener's js_api_timeout more. Each subscribes to the
        # model at QoS 0 (it is published at QoS 0): no JetStream consumer, so a reconnect needs no consumer to
        # be deleted by the meta leader
        self.links = [Link(mqtt_nodes, f"fedmq-root-{topics.fleet}-{root_id}" + ("-b" if i else ""), persistent=False,
                           start=i, on_message=self._on_retained, on_connect=lambda c, *a: c.subscribe(topics.model, 0),
                           avoid=lambda i=i: self.links[1 - i].index)
                      for i in range(min(2, len(mqtt_nodes)))]
        self.link = self.links[0]  # the one the last model went out on
        self.params = np.zeros(spec.n_params)
        self.version = 0
        self.published = -1
        self.hwm: dict[str, int] = {}
        self.epochs: dict[str, int] = {}
        self.folded = 0
        self.partials = 0
        self.duplicates = 0
        self.rejected = 0
        self.buffer_since: float | None = None
        self.started_at = time.time()
        self.audit: AuditLog | None = None
        self.sub = None

    def _on_retained(self, client, userdata, msg) -> None:
        try:
            model = decode_model(msg.payload)
            if model.fleet == self.topics.fleet:
                self.retained_version = max(self.retained_version, model.version)
                self.retained_seen.set()
        except (ProtocolError, ValueError, TypeError):
            pass

    # life cycle ----------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        for link in self.links:
            link.start()
        vacancy = Vacancy(grace=0.5)
        while not stop.is_set():
            if not vacancy.try_acquire(self.lease):
                stop.wait(STANDBY_POLL_S)  # standby
                continue
            self.keeper.add(self.lease)
            try:
                self._take_over()
                self._serve(stop)
            except Fenced as exc:
                log.warning("root %s fenced out: %s; back to standby", self.root_id, exc)
            except Exception:
                log.exception("root %s: unexpected error; back to standby", self.root_id)
            self.keeper.remove(self.lease)
            self.lease.revision = None
        self.keeper.stop()
        self.lease.release()
        for link in self.links:
            link.close()

    def _take_over(self) -> None:
        state = self._retry("reading the checkpoint", lambda: self.record.read() or {})
        if not state and self.link.wait(5):
            self.retained_seen.wait(1.0)  # no checkpoint: the broker's retained model, if there is one
        if state:
            self.params = np.frombuffer(state["params"], dtype="<f8").copy()
            self.version = int(state["version"])
            self.hwm = dict(state["hwm"])
            self.epochs = dict(state["epochs"])
            self.rule.restore(state["buffer"])
            self.folded, self.partials = state.get("folded", 0), state.get("partials", 0)
            self.duplicates = state.get("duplicates", 0)
            self.cohorts = state.get("cohorts", 0)
            if self.dp is not None:  # the ledger: what each agent has spent survives the failover
                self.dp.restore(state.get("dp"))
        if self.retained_version > self.version:  # never publish a version the fleet has already passed
            log.warning("retained model at version %d is ahead of the checkpoint (%d): continuing above it",
                        self.retained_version, self.version)
            self.version = self.retained_version
        self.audit = AuditLog(self.audit_path, state.get("audit")) if self.audit_path else None
        self._retry("claiming the checkpoint", lambda: self.record.write(self._state()))  # a previous holder's
        # next write now fails
        if not state:  # the workers read the spec from the claim
            self._wait_for_partitions()
        self.published = -1
        log.info("root %s active at epoch %d, version %d, %d update(s) folded so far",
                 self.root_id, self.lease.epoch, self.version, self.folded)
        self.sub = self._retry("subscribing to the partials", lambda: self.nats.call(self._subscribe, 10))

    def _retry(self, what: str, fn):
        """fn() until it succeeds while the lease holds: JetStream may be electing a leader (a node died)."""
        while True:
            try:
                return fn()
            except Fenced:
                raise
            except Exception as exc:
                if self.lease.revision is None:
                    raise Fenced(f"root lease lost while {what}") from None
                log.info("%s: %s; retrying", what, exc or type(exc).__name__)
                time.sleep(0.2)

    def _wait_for_partitions(self) -> None:
        """A new fleet: publish the first model (devices start on it) only once every partition's session
        exists, since NATS keeps QoS 1 messages only for subscriptions that exist."""
        want = {f"p{n}" for n in range(self.partitions)}
        waited = 0.0
        while True:
            try:
                keys = set(self.nats.call(lambda: self.nats.state.keys(), 5))
            except Exception:  # no keys yet
                keys = set()
            if want <= keys:
                return
            if not self.lease.renew():
                raise Fenced("root lease lost while waiting for the partitions")
            if waited % 5 < 0.25:
                log.info("waiting for partition workers: %d of %d partitions claimed", len(want & keys), len(want))
            time.sleep(0.25)  # polling the bucket's keys
            waited += 0.25

    async def _subscribe(self):
        js, stream = self.nats.js, self.nats.names["partials"]
        try:  # a fresh consumer: what the previous holder fetched and never acked comes back at once
            await js.delete_consumer(stream, CONSUMER)
        except NotFoundError:
            pass
        config = api.ConsumerConfig(durable_name=CONSUMER, ack_policy=api.AckPolicy.EXPLICIT, ack_wait=ACK_WAIT_S,
                                    max_ack_pending=20_000, deliver_policy=api.DeliverPolicy.ALL)
        return await js.pull_subscribe(f"{self.nats.prefix}.{self.nats.fleet.replace('.', '_')}.partial.>",
                                       durable=CONSUMER, stream=stream, config=config)

    def _serve(self, stop: threading.Event) -> None:
        acks, dirty = [], False  # partials folded but not yet covered by a checkpoint
        while not stop.is_set():
            if self.lease.revision is None:
                raise Fenced("root lease lost")
            msgs = self._fetch()
            naks, lines = [], []
            for msg in msgs:
                verdict = self._fold(msg.data, lines)
                (naks if verdict == "later" else acks).append(msg)
            while self.rule.ready():
                self._step()
                dirty = True
            if self.rule.count and self.buffer_since is not None \
                    and time.monotonic() - self.buffer_since >= self.buffer_timeout:
                self._step()
                dirty = True
            if lines and self.audit is not None and self.audit.write(lines) is None:
                raise Fenced("audit log not writable")  # another root may do better
            dirty = dirty or bool(acks)
            if dirty:
                try:
                    self._commit()
                    dirty = False
                except TimeoutError as exc:  # a node down: retried with the next batch, nothing acked
                    log.debug("root checkpoint retried: %s", exc)
            if not dirty:
                self._publish()
                for msg in acks:
                    self._settle(msg.ack)
                acks = []
            for msg in naks:
                self._settle(lambda m=msg: m.nak(delay=0.2))

    def _settle(self, fn) -> None:
        """Ack or nak one partial; a failure only means JetStream delivers it again (and it is a duplicate)."""
        try:
            self.nats.call(fn, 5)
        except Exception as exc:
            log.debug("ack: %s", exc)

    def _fetch(self) -> list:
        try:
            return self.nats.call(lambda: self.sub.fetch(BATCH, timeout=0.2), 3)
        except (NatsTimeout, TimeoutError):
            return []
        except Exception as exc:  # JetStream electing a leader after a node died: nothing this time
            log.debug("fetching partials: %s", exc)
            time.sleep(0.1)
            return []

    # the fold --------------------------------------------------------------------------------

    def _fold(self, data: bytes, lines: list[str]) -> str:
        """'folded', 'duplicate', 'fenced', 'rejected', or 'later' (a predecessor is missing)."""
        try:
            p = decode_partial(data, self.spec.n_params)
        except ProtocolError as exc:
            log.warning("unreadable partial dropped: %s", exc)
            self.rejected += 1
            return "rejected"
        key = str(p.partition)
        if p.seq <= self.hwm.get(key, 0):
            self.duplicates += 1
            return "duplicate"
        if p.epoch < self.epochs.get(key, 0):  # an older owner's, after the new one committed: fencing
            self.rejected += 1
            return "fenced"
        if p.seq != self.hwm.get(key, 0) + 1:
            return "later"
        if self.secagg is not None and (p.round is None or p.count < self.secagg["threshold"]):
            log.error("partition %d: a partial that is not a cohort sum of at least %d (%d update(s)) under secure "
                      "aggregation: dropped", p.partition, self.secagg["threshold"], p.count)
            self.hwm[key] = p.seq  # the partition's next partials can be folded
            self.rejected += 1
            return "rejected"
        agents = [agent for agent, _, _ in p.covers]
        verdict = None if self.dp is None else self.dp.verdict(agents, p.clip)
        if verdict == "later":  # an agent of it is in the buffer: after the release (at most once per release)
            return verdict
        self.hwm[key] = p.seq
        if verdict is not None:  # never foldable under central DP: skipped, so the partition's next ones can be
            self.rejected += 1
            return verdict
        if self.dp is not None:
            self.dp.add(agents)
        self.epochs[key] = p.epoch
        self.rule.add(p.weighted_sum, p.weight, p.count)
        if self.buffer_since is None:
            self.buffer_since = time.monotonic()
        self.folded += p.count
        self.partials += 1
        self.cohorts += p.round is not None
        now = round(time.time(), 3)
        for agent, seq, base in p.covers:
            lines.append(json.dumps({"t": now, "partition": p.partition, "epoch": p.epoch, "pseq": p.seq,
                                     "agent": agent, "seq": seq, "base": base, "version": self.version,
                                     "arrived": round(p.oldest, 3)}) + "\n")
        return "folded"

    def _step(self) -> None:
        new = self.rule.step(self.params)
        if self.dp is not None:
            new = self.dp.release(new)
        self.buffer_since = None
        if not np.isfinite(new.astype(np.float32)).all():
            log.error("a step would make the model non-finite on the wire: dropped")
            return
        self.params = new
        self.version += 1

    def _state(self) -> dict:
        return {
            "epoch": self.lease.epoch, "owner": self.root_id, "version": self.version, "spec": self.spec.to_wire(),
            "params": np.ascontiguousarray(self.params, dtype="<f8").tobytes(), "hwm": self.hwm,
            "epochs": self.epochs, "buffer": self.rule.state(), "folded": self.folded, "partials": self.partials,
            "duplicates": self.duplicates, "audit": self._audit_offset(),
            "dp": self.dp.state() if self.dp else None, "dp_config": self.dp.config() if self.dp else None,
            "secagg_config": self.secagg, "cohorts": self.cohorts,
        }

    def _audit_offset(self) -> int | None:
        return None if self.audit is None else self.audit.file.tell()

    def _commit(self) -> None:
        """The fenced checkpoint: it, not how lately the lease was renewed, keeps two roots from both committing
        (a lease bucket electing a leader after a node died held every commit until its election, 4-9 s)."""
        try:
            self.record.write(self._state())
        except Fenced:
            raise
        except Exception as exc:
            raise TimeoutError(str(exc)) from None

    def _publish(self) -> None:
        since = time.monotonic() - self._last_pub
        if self.version == self.published or since < floor(self.publish_policy) or not publish_due(
                self.publish_policy, since_last=since, changed=True, change=relative_change(self.params, self._published_params)):
            return
        # acks=True: the partition workers ack each device's accepted updates (tier/worker.py, protocol/acks.py)
        body = encode_model(ModelMessage(self.topics.fleet, self.version, self.spec, self.params,
                                         started_at=self.started_at, acks=True))
        if self.published > self.retained_version and time.monotonic() - self._last_pub > ECHO_S:
            self.link.bounce()  # our own last model never came back: the connection is not carrying
            self._last_pub = time.monotonic()
            return
        up = [link for link in self.links if link.connected.is_set()] or [self.link]
        self.link = up[0]
        if self.link.publish(self.topics.model, body, retain=True, qos=MODEL_QOS):
            self.published = self.version
            self._published_params = self.params.copy()
            self._last_pub = time.monotonic()
            status = {"fleet": self.topics.fleet, "role": "root", "root": self.root_id, "version": self.version,
                      "folded": self.folded, "partials": self.partials, "duplicates": self.duplicates,
                      "rejected": self.rejected, "partitions": len(self.hwm), "time": time.time()}
            if self.dp is not None:
                status["privacy"] = self.dp.report()
            if self.secagg is not None:
                status["secure_aggregation"] = {"k": self.secagg["k"], "threshold": self.secagg["threshold"],
                                                "cohorts": self.cohorts}
            # on the other connection when there is one: a status store waiting on an election stalls its
            # connection's read loop up to the listener's js_api_timeout, and the next model must not wait behind it
            up[-1].publish(self.topics.coordinator_status, encode_status(status), retain=True, timeout=1, qos=MODEL_QOS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tier.root",
        description="Root of fedmq's scale-out tier: one active writer (NATS KV lease, the others stand by) that "
                    "folds the partition workers' partial aggregates and publishes the retained model.",
    )
    add_cluster_args(parser)
    parser.add_argument("--model", required=True, choices=sorted(ESTIMATORS), help="the fleet's estimator")
    parser.add_argument("--n-features", type=int, required=True, help="number of input features")
    parser.add_argument("--classes", help="comma-separated class labels (classifiers)")
    parser.add_argument("--strategy", default="fedbuff", choices=("fedbuff", "fedasync"), help="root rule")
    parser.add_argument("--buffer-size", type=int, default=5, help="fedbuff: updates per step (over all partitions)")
    parser.add_argument("--server-lr", type=float, default=1.0, help="fedbuff: server learning rate")
    parser.add_argument("--alpha", type=float, default=0.3, help="fedasync: mixing weight per partial")
    parser.add_argument("--buffer-timeout", type=float, default=5.0, help="step a buffer that waited this long")
    parser.add_argument("--audit-log", help="JSON lines: every (agent, seq) folded, with its partial")
    add_dp_arguments(parser)
    add_secagg_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start_logging(args.log_level)
    stop = stop_on_signals()
    try:
        topics = Topics(args.fleet, args.topic_prefix)
        spec = ModelSpec(args.model, args.n_features, parse_classes(args.classes))
        rule = make_rule(args.strategy, spec.n_params, buffer_size=args.buffer_size, server_lr=args.server_lr,
                         alpha=args.alpha)
        dp = root_dp(args)
        secagg = None
        if args.secure_aggregation:  # cryptography: imported only when asked for
            from tier.secagg import root_config

            secagg = root_config(args, spec.n_params)

        def build():
            nats = connect_nats(args, "root")
            try:
                return nats, Root(nats, parse_urls(args.mqtt), topics, spec, rule, root_id=args.id,
                                  audit_log=args.audit_log, buffer_timeout=args.buffer_timeout,
                                  partitions=args.partitions, dp=dp, secagg=secagg)
            except BaseException:
                nats.close()
                raise

        nats, root = start_with_retries(build, stop, "root")
    except (ValueError, OSError, TimeoutError) as exc:
        print(f"tier root: {exc}", file=sys.stderr)
        return 2
    root.run(stop)
    nats.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
