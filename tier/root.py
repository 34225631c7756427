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
With --target-updates-per-s every root (standbys too) counts the agents online from their retained
statuses and last wills (coordinator/presence.py, over a connection of its own), and every model the
active one publishes carries the pace `steer` gives for that count (protocol/pace.py), as the single
coordinator's do.
With --eval-csv the active root scores every model it publishes on that held-out set, as the coordinator
does (coordinator/evaluation.py): `accuracy` (or `r2`) in its status and its metrics.
A fedbuff buffer of K steps on K agents, or on every agent the root heard from within --live-window when they are
fewer (tier/heard.py: a fleet smaller than K steps as its agents send, not at --buffer-timeout); the status's
`buffer` shows both.
"""

from __future__ import annotations

import argparse
import collections
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
from coordinator.cli import (add_dp_arguments, add_max_packet_argument, add_pace_arguments, add_secagg_arguments,
                             check_max_packet_bytes, parse_classes, steering_from_args)
from coordinator.evaluation import load_eval_set, score
from coordinator.presence import Presence
from coordinator.publish_policy import PublishPolicy, floor, publish_due, relative_change
from coordinator.status import encode_status, score_fields
from protocol import chunking
from protocol.config import layered_parser, parse_layered
from protocol.errors import ProtocolError
from protocol.messages import ModelMessage, decode_model, encode_model, only_spec
from protocol.model_spec import ESTIMATORS, ModelSpec
from protocol.pace import Pace, Steering
from protocol.topics import Topics
from tier.cli_args import (CLUSTER_REQUIRED, add_cluster_args, connect_nats, start_logging, start_tier_metrics, start_with_retries,
                           stop_on_signals)
from tier.heard import Heard
from tier.lease import Fenced, FencedRecord, Keeper, Lease, Vacancy
from tier.mqtt_link import Link, parse_urls
from tier.nats_io import Nats, partials_filter
from tier.partial import Counts, decode_message, merge_counts, subject_partition
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
LIVE_WINDOW_TIMEOUTS = 3  # --live-window's default, in --buffer-timeouts: an agent sending at least that often counts
PRESENCE_WAIT_S = 5.0  # a root taking over waits this long at most for the agents' statuses to be subscribed


class Root:
    """Campaigns for the root lease and, while it holds it, folds partials into the model."""

    def __init__(self, nats: Nats, mqtt_nodes, topics: Topics, spec: ModelSpec, rule: RootRule, *,
                 root_id: str, audit_log: str | None = None, buffer_timeout: float = 5.0,
                 publish_interval: float = 0.2, partitions: int = 32, dp: RootDP | None = None,
                 secagg: dict | None = None, steering: Steering | None = None,
                 max_packet_bytes: int | None = None, eval_data: tuple[np.ndarray, np.ndarray] | None = None,
                 live_window: float | None = None) -> None:
        self.nats = nats
        self.topics = topics
        self.spec = spec
        self.rule = rule
        self.root_id = root_id
        self.audit_path = audit_log
        self.buffer_timeout = buffer_timeout
        # the agents of the partials folded lately: K shrinks to them (default window: 3 buffer timeouts)
        self.heard = Heard(LIVE_WINDOW_TIMEOUTS * buffer_timeout if live_window is None else live_window,
                           getattr(rule, "buffer_size", 1), time.time())
        self.publish_interval = publish_interval
        # the coordinator's publish policy, by the model's change alone (partials carry no agent's waiting)
        self.publish_policy = PublishPolicy(max_interval=publish_interval, min_interval=min(0.05, publish_interval))
        self._published_params: np.ndarray | None = None
        self.partitions = partitions
        self.dp = dp
        self.secagg = secagg  # the partitions' secure-aggregation settings (tier/secagg.root_config)
        self.cohorts = 0  # cohort sums folded
        self.eval_data = eval_data  # --eval-csv's (X, y): every published model is scored on it
        self.scores: dict[str, float] = {}  # the published model's (coordinator.evaluation.score)
        self.max_packet_bytes = max_packet_bytes  # a model over it goes as retained chunks and a manifest
        self._chunks_sent = 0  # chunk topics our last model filled (a smaller one clears the rest)
        self.retained_chunks = 0  # chunk topics the newest retained model fills (0: whole), whoever published it
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
        # pace steering: the agents online, from their retained statuses (replayed on every (re)subscription, so
        # a standby or a restarted root has the count before it publishes), on a connection of their own so a
        # fleet's statuses never queue before the model's echo. QoS 0 like the model: no JetStream consumer
        self.steering = steering
        self.presence = Presence(topics) if steering is not None else None
        self.counting = threading.Event()  # the statuses' subscription acknowledged: their replay is under way
        self.presence_link = None if steering is None else Link(
            mqtt_nodes, f"fedmq-root-{topics.fleet}-{root_id}-presence", persistent=False, start=len(self.links),
            on_message=lambda c, u, msg: self.presence.handle(msg.topic, msg.payload),
            on_connect=lambda c, *a: c.subscribe(topics.all_agent_statuses, 0), on_subscribed=self.counting.set)
        self.params = np.zeros(spec.n_params)
        self.version = 0
        self.published = -1
        self.hwm: dict[str, int] = {}
        self.epochs: dict[str, int] = {}
        self.folded = 0
        self.partials = 0
        self.duplicates = 0
        self.rejected = 0
        # per partition, its device messages refused by reason (the newest partial's cumulative counts)
        self.updates_rejected: dict[str, dict[str, int]] = {}
        self.secagg_excluded: dict[str, dict[str, int]] = {}  # likewise, members left out of cohorts by reason
        self.counts_changed = False  # a count above grew since the last status
        self._counts_serial = 0  # bumped when those counts grow (a key of the metrics' cached status)
        self._metrics_status: tuple | None = None  # (key, status) the last scrape built
        self._status_rejected = 0  # self.rejected as the last status showed it
        self._status_buffer: dict | None = None  # self.rule.buffer() as the last status showed it
        self._last_status = 0.0
        self.buffer_since: float | None = None
        self.started_at = time.time()
        self.audit: AuditLog | None = None
        self.sub = None

    def _on_retained(self, client, userdata, msg) -> None:
        try:  # a whole model, or the manifest of a chunked one: its version is what came back
            manifest = chunking.is_manifest(msg.payload)
            model = chunking.decode_manifest(msg.payload) if manifest else decode_model(
                msg.payload, **only_spec(self.spec))  # another spec refused before its params are decoded
            if model.fleet == self.topics.fleet:
                if model.version >= self.retained_version:
                    self.retained_chunks = model.chunks if manifest else 0
                self.retained_version = max(self.retained_version, model.version)
                self.retained_seen.set()
        except (ProtocolError, ValueError, TypeError):
            pass

    # life cycle ----------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        for link in self._all_links():
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
        for link in self._all_links():
            link.close()

    def _all_links(self) -> list[Link]:
        return self.links + ([self.presence_link] if self.presence_link is not None else [])

    def pace(self) -> tuple[Pace, int] | None:
        """The pace asked of every device now and the agents online it was steered for (None: not steered)."""
        if self.steering is None:
            return None
        online = self.presence.count
        return self.steering.pace(online), online

    def _take_over(self) -> None:
        state = self._retry("reading the checkpoint", lambda: self.record.read() or {})
        if self.link.wait(5):  # the broker's retained model, if there is one (a standby has it already): its version
            self.retained_seen.wait(1.0)  # and its chunk count
        if state:
            self.params = np.frombuffer(state["params"], dtype="<f8").copy()
            self.version = int(state["version"])
            self.hwm = dict(state["hwm"])
            self.epochs = dict(state["epochs"])
            self.rule.restore(state["buffer"])
            self.folded, self.partials = state.get("folded", 0), state.get("partials", 0)
            self.duplicates = state.get("duplicates", 0)
            self.updates_rejected = dict(state.get("updates_rejected") or {})
            self.secagg_excluded = dict(state.get("secagg_excluded") or {})
            self.cohorts = state.get("cohorts", 0)
            self._chunks_sent = int(state.get("chunks_sent", 0))
            if self.dp is not None:  # the ledger: what each agent has spent survives the failover
                self.dp.restore(state.get("dp"))
        self.heard.restore(state.get("heard"), time.time())  # a fresh fleet's (none): listening begins now
        if self.retained_version > self.version:  # never publish a version the fleet has already passed
            log.warning("retained model at version %d is ahead of the checkpoint (%d): continuing above it",
                        self.retained_version, self.version)
            self.version = self.retained_version
        # every chunk topic the previous root filled is cleared or overwritten by our first model: its checkpoint says
        # how many (as of its last commit), the retained manifest how many its last model filled (published after)
        self._chunks_sent = min(max(self._chunks_sent, self.retained_chunks), chunking.MAX_CHUNKS)
        self.audit = AuditLog(self.audit_path, state.get("audit")) if self.audit_path else None
        if self.presence_link is not None and not self.counting.wait(PRESENCE_WAIT_S):  # a fresh root's first model
            log.warning("agents' statuses not subscribed within %g s: steering for %d agent(s) online until they come",
                        PRESENCE_WAIT_S, self.presence.count)
        self._retry("claiming the checkpoint", lambda: self.record.write(self._state()))  # a previous holder's
        # next write now fails
        # the workers read the spec from the claim; and no first model before every partition's session exists,
        # also when the checkpoint is this fleet's first claim only (a root fenced out while it waited: its takeover
        # found its own claim and published at once, and the devices' first updates to unsubscribed partitions
        # were lost, seen at load 30)
        if not self.hwm:
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
        return await js.pull_subscribe(partials_filter(self.nats.prefix, self.nats.fleet), durable=CONSUMER, stream=stream, config=config)

    def _serve(self, stop: threading.Event) -> None:
        acks, dirty = [], False  # partials folded but not yet covered by a checkpoint
        while not stop.is_set():
            if self.lease.revision is None:
                raise Fenced("root lease lost")
            msgs = self._fetch()
            naks, lines = [], []
            for msg in msgs:
                verdict = self._fold(msg.data, lines, msg.subject)
                (naks if verdict == "later" else acks).append(msg)
            self.rule.resize(self.heard.live(time.time()))
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

    def _fold(self, data: bytes, lines: list[str], subject: str | None = None) -> str:
        """'folded', 'counts', 'duplicate', 'fenced', 'rejected', or 'later' (a predecessor is missing).
        `subject`: the message's, whose partition (and counts or partial) the message's own must match."""
        try:
            p = decode_message(data, self.spec.n_params)
        except ProtocolError as exc:
            log.warning("unreadable partial dropped: %s", exc)
            self.rejected += 1
            return "rejected"
        sent_for = subject_partition(subject) if subject is not None else (p.partition, isinstance(p, Counts))
        if p.partition >= self.partitions or sent_for != (p.partition, isinstance(p, Counts)):
            log.warning("partition %d's %s on %s dropped: not that subject's or not one of the fleet's %d partitions",
                        p.partition, "counts" if isinstance(p, Counts) else "partial", subject, self.partitions)
            self.rejected += 1
            return "rejected"
        key = str(p.partition)
        if isinstance(p, Counts):  # a commit without a partial: only its refusals, merged
            self._merge_counts(key, p)
            return "counts"
        if p.seq <= self.hwm.get(key, 0):
            self.duplicates += 1
            return "duplicate"
        if p.epoch < self.epochs.get(key, 0):  # an older owner's, after the new one committed: fencing
            self.rejected += 1
            return "fenced"
        if p.seq != self.hwm.get(key, 0) + 1:
            return "later"
        self._merge_counts(key, p)
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
        self.rule.add(p.weighted_sum, p.weight, p.count, p.rows, agents)  # K counts agents; each one's weight bounded
        self.heard.note(agents, time.time())
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

    def _merge_counts(self, key: str, p) -> None:
        """A partition's cumulative refusal counts (from a partial or a Counts message) into the status's."""
        rejected = merge_counts(self.updates_rejected.get(key, {}), p.rejected)
        excluded = merge_counts(self.secagg_excluded.get(key, {}), p.excluded)
        if rejected != self.updates_rejected.get(key, {}) or excluded != self.secagg_excluded.get(key, {}):
            self.updates_rejected[key], self.secagg_excluded[key] = rejected, excluded
            self.counts_changed = True
            self._counts_serial += 1

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
            "duplicates": self.duplicates, "updates_rejected": self.updates_rejected,
            "secagg_excluded": self.secagg_excluded, "audit": self._audit_offset(),
            "dp": self.dp.state() if self.dp else None, "dp_config": self.dp.config() if self.dp else None,
            "secagg_config": self.secagg, "cohorts": self.cohorts, "chunks_sent": self._chunks_sent,
            "heard": self.heard.state(time.time()),
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
            self._publish_counts()
            return
        # acks=True: the partition workers ack each device's accepted updates (tier/worker.py, protocol/acks.py)
        steered = self.pace()
        body = encode_model(ModelMessage(self.topics.fleet, self.version, self.spec, self.params,
                                         started_at=self.started_at, acks=True,
                                         pace=steered[0] if steered else None))
        if self.published > self.retained_version and time.monotonic() - self._last_pub > ECHO_S:
            self.link.bounce()  # our own last model never came back: the connection is not carrying
            self._last_pub = time.monotonic()
            return
        up = [link for link in self.links if link.connected.is_set()] or [self.link]
        self.link = up[0]
        # over --max-packet-bytes: retained chunks, then the manifest on the model topic (the coordinator's format)
        packets, chunks = chunking.model_packets(self.topics.model, self.topics.model_chunk, body, self.topics.fleet,
                                                 self.version, self.max_packet_bytes, self._chunks_sent)
        if all(self.link.publish(topic, payload, retain=True, qos=MODEL_QOS) for topic, payload in packets):
            self._chunks_sent = chunks
            self.published = self.version
            self._published_params = self.params.copy()
            self._last_pub = time.monotonic()
            self._score()
            self._publish_status(up, steered)

    def _score(self) -> None:
        """The published model on --eval-csv: once per publish, as the coordinator scores (publishes are rate-limited
        by the publish policy, folds are not)."""
        if self.eval_data is None:
            return
        try:
            self.scores = score(self.spec, self.params, *self.eval_data)
        except Exception:  # a score is worth a log line, not the root
            log.exception("cannot score version %d on the eval set", self.version)
            self.scores = {}

    def _publish_counts(self) -> None:
        """The status alone when refusals came in without a new model (a partition of hostile or silent devices
        folds nothing), or K now moved (agents fell silent: a fleet that stops sending makes no model to carry
        it), at most once per publish interval and only after this root's first model."""
        changed = self.counts_changed or self.rejected != self._status_rejected \
            or self.rule.buffer() != self._status_buffer  # refused partials too: a forged one that fenced a partition
        # out shows, not only with the next model
        if not changed or self.published < 0 or time.monotonic() - self._last_status < self.publish_interval:
            return
        self._publish_status([link for link in self.links if link.connected.is_set()] or [self.link], self.pace())

    def _publish_status(self, up: list[Link], steered) -> None:
        self.counts_changed = False
        self._status_rejected = self.rejected
        self._status_buffer = self.rule.buffer()
        self._last_status = time.monotonic()
        # on the other connection when there is one: a status store waiting on an election stalls its
        # connection's read loop up to the listener's js_api_timeout, and the next model must not wait behind it
        up[-1].publish(self.topics.coordinator_status, encode_status(self.status(steered)), retain=True, timeout=1,
                       qos=MODEL_QOS)

    def status(self, steered) -> dict:
        """The root's status document (its status topic; its metrics, tier/metrics.py), `steered` = self.pace()."""
        now = time.time()
        status = {"fleet": self.topics.fleet, "role": "root", "root": self.root_id, "version": self.published,
                  **score_fields(self.spec.is_classifier, self.scores),
                  "folded": self.folded, "partials": self.partials, "duplicates": self.duplicates,
                  "rejected": self.rejected, "updates_rejected": rejected_by_reason(self.updates_rejected),
                  "partitions": len(self.hwm), "time": now, "uptime_s": round(now - self.started_at, 3),
                  "bounded": {"repeat_agent": self.rule.repeat_agent, "weight_cap": self.rule.weight_capped}}
        if self.rule.buffer() is not None:  # fedbuff: K, K now, and the agents heard it shrinks to (None: not yet known)
            status["buffer"] = dict(self.rule.buffer(), window=self.heard.window)
        if self.dp is not None:
            status["privacy"] = self.dp.report()
        if steered is not None:  # as the coordinator's status shows it
            status["pace"] = dict(steered[0].to_wire(), agents_online=steered[1])
        if self.secagg is not None:
            status["secure_aggregation"] = {"k": self.secagg["k"], "threshold": self.secagg["threshold"],
                                            "cohorts": self.cohorts,
                                            "excluded": rejected_by_reason(self.secagg_excluded)}
        return status

    def metrics(self) -> dict:
        """What --metrics-port serves (read at every scrape, from the exporter's thread): the status and the lease.
        The status is built again only when something it shows moved (a step, a fold, a refusal, a count, the
        pace, a release), not per scrape: under DP it runs the accountant over every agent's count."""
        steered = self.pace()
        key = (self.published, self.version, self.folded, self.partials, self.duplicates, self.rejected, self.cohorts,
               len(self.hwm), self._counts_serial, steered, self.dp.central.releases if self.dp is not None else None,
               self.lease.epoch, tuple(sorted((self.rule.buffer() or {}).items())))
        cached = self._metrics_status
        if cached is None or cached[0] != key:
            cached = self._metrics_status = (key, self.status(steered))
        return dict(cached[1], active=self.lease.revision is not None, epoch=self.lease.epoch or 0,
                    uptime_s=round(time.time() - self.started_at, 3))  # per scrape: the cache's is as old as it


def rejected_by_reason(per_partition: dict[str, dict[str, int]]) -> dict[str, int]:
    """What the partition workers refused (device messages, secure-aggregation members), by reason, summed
    over the partitions."""
    total: collections.Counter = collections.Counter()
    for counts in list(per_partition.values()):  # a copy: the metrics' thread reads it while the root folds
        total.update(counts)
    return dict(sorted(total.items()))


def build_parser() -> argparse.ArgumentParser:
    parser = layered_parser("python -m tier.root",
                         "Root of fedmq's scale-out tier: one active writer (NATS KV lease, the others stand by) that "
                         "folds the partition workers' partial aggregates and publishes the retained model.")
    add_cluster_args(parser)
    parser.add_argument("--model", choices=sorted(ESTIMATORS), help="the fleet's estimator (required)")
    parser.add_argument("--n-features", type=int, help="number of input features (required)")
    parser.add_argument("--classes", help="comma-separated class labels (classifiers)")
    parser.add_argument("--strategy", default="fedbuff", choices=("fedbuff", "fedasync"), help="root rule")
    parser.add_argument("--buffer-size", type=int, default=5, help="fedbuff: updates per step (over all partitions)")
    parser.add_argument("--server-lr", type=float, default=1.0, help="fedbuff: server learning rate")
    parser.add_argument("--alpha", type=float, default=0.3, help="fedasync: mixing weight per partial")
    parser.add_argument("--buffer-timeout", type=float, default=5.0, help="step a buffer that waited this long")
    parser.add_argument("--live-window", type=float,
                        help="fedbuff: K shrinks to the agents whose partials came within this many seconds, when "
                             "they are fewer (default 3 x --buffer-timeout; K until a root listened that long; 0: K "
                             "always)")
    parser.add_argument("--audit-log", help="JSON lines: every (agent, seq) folded, with its partial")
    parser.add_argument("--eval-csv", help="held-out CSV scored at each publish (accuracy or r2 in the status and "
                                           "fedmq_eval_score), as the coordinator's --eval-csv")
    parser.add_argument("--label-column", default="label", help="label column of --eval-csv (default label)")
    add_dp_arguments(parser)
    add_secagg_arguments(parser)
    add_pace_arguments(parser)
    add_max_packet_argument(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parse_layered(build_parser(), argv, CLUSTER_REQUIRED + ("model", "n_features"))
    start_logging(args.log_level)
    stop = stop_on_signals()
    try:
        topics = Topics(args.fleet, args.topic_prefix)
        spec = ModelSpec(args.model, args.n_features, parse_classes(args.classes))
        rule = make_rule(args.strategy, spec.n_params, buffer_size=args.buffer_size, server_lr=args.server_lr,
                         alpha=args.alpha)
        dp = root_dp(args)
        steering = steering_from_args(args)  # refused with --secure-aggregation, as by the coordinator
        check_max_packet_bytes(args.max_packet_bytes)
        eval_data = load_eval_set(args.eval_csv, args.label_column, spec) if args.eval_csv else None
        secagg = None
        if args.secure_aggregation:  # cryptography: imported only when asked for
            from tier.secagg import root_config

            secagg = root_config(args, spec.n_params)

        def build():
            nats = connect_nats(args, "root")
            try:
                return nats, Root(nats, parse_urls(args.mqtt), topics, spec, rule, root_id=args.id,
                                  audit_log=args.audit_log, buffer_timeout=args.buffer_timeout,
                                  partitions=args.partitions, dp=dp, secagg=secagg,
                                  steering=steering, max_packet_bytes=args.max_packet_bytes, eval_data=eval_data,
                                  live_window=args.live_window)
            except BaseException:
                nats.close()
                raise

        nats, root = start_with_retries(build, stop, "root")
        start_tier_metrics(args.metrics_port, root.metrics)
    except (ValueError, OSError, TimeoutError) as exc:
        print(f"tier root: {exc}", file=sys.stderr)
        return 2
    root.run(stop)
    nats.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
