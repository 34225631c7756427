"""Partition worker: the coordinator's core per owned partition, committing partial aggregates.

A worker owns partitions by lease (tier/lease.py). For each it restores the partition's
checkpoint, connects the partition's MQTT persistent session (client id `agg-<fleet>-p<P>`,
subscribed to `<prefix>/<fleet>/upd/<P>/+`, manual acks) and folds every update through a
`coordinator.server.Coordinator` (validation, (agent, seq) dedup, staleness, norm bound) whose
strategy only sums (tier/partial.py). The group commit, every FLUSH_S:

1. the partition checkpoint (dedup state + the new partial) is written over the revision this
   owner last saw (FencedRecord: a second owner cannot also write);
2. the partial is published to JetStream with Nats-Msg-Id `<fleet>-p<P>-<seq>` (PubAck = stored R3);
3. only then are the device messages it covers acknowledged over MQTT, and each agent whose updates it
   accepted gets its ack (protocol/acks.py): one core NATS message per agent per commit on the ack topic's
   subject, not a retained MQTT message (docs/architecture.md, "Acks on the tier").

A crash anywhere leaves the messages unacknowledged: NATS redelivers them to the next owner,
which restores the checkpoint (its dedup state says which are already in a partial) and
republishes the checkpoint's partial (the root drops a (partition, seq) it already folded).
The global version for staleness comes from the retained model (an ordinary subscription).
Under the root's --secure-aggregation each partition runs masking rounds instead (tier/secagg.py):
its partials are cohort sums, its checkpoint holds the round in flight, and the cohort messages of a
round go out only after the checkpoint that holds it.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import threading
import time

from coordinator.presence import MAX_STATUS_BYTES, status_state
from coordinator.privacy import guard
from coordinator.chunks import TIMEOUT_S as CHUNK_TIMEOUT_S
from coordinator.chunks import UpdateChunks
from coordinator.server import Coordinator
from coordinator.session import RejectionLog
from coordinator.staleness import parse_staleness
from coordinator.validation import DEFAULT_NORM_FACTOR, NORM_WARMUP, NormBound, UpdateValidator
from protocol import chunking
from protocol.acks import encode_ack
from protocol.config import layered_parser, parse_layered
from protocol.errors import ProtocolError
import numpy as np

from protocol.messages import ModelMessage, decode_model, decode_update, only_spec
from protocol.model_spec import ModelSpec
from protocol.topics import Topics, check_name, tier_subject
from tier.cli_args import (CLUSTER_REQUIRED, add_cluster_args, connect_nats, start_logging, start_tier_metrics, start_with_retries,
                           stop_on_signals)
from tier.cluster import MQTT_MAX_ACK_PENDING, mqtt_subject, partition_of
from tier.lease import Fenced, FencedRecord, Keeper, Lease, Vacancy
from tier.mqtt_link import Link, drop, parse_urls
from tier.nats_io import JS_TIMEOUT_S, Nats, partial_subject
from tier.partial import Counts, Partial, PartialSum, encode_counts, encode_partial
from tier.privacy import PartitionDP, dp_changed

log = logging.getLogger(__name__)

FLUSH_S = 0.1  # group commit interval of a partition
HOLD_S = 10.0  # an update trained on a model newer than the one we know waits this long for it
SCAN_S = 0.5  # how often free partitions are looked for and leases renewed
DP_CHECK_S = 5.0  # how often the root's DP settings are read again (they change only with a root's flags)
SUBSCRIBE_TIMEOUT_S = 10.0
# JetStream redelivers an unacknowledged message after a newer one (a node died, a session moved):
# the seqs of a hole stay acceptable, up to this many per agent (coordinator/validation.py)
REORDER_WINDOW = 256
# chunk acks held back until their update's partial is durable, per partition (half per agent): each one
# takes a slot of the partition session's window on NATS (max_ack_pending), which must stay open to updates
MAX_HELD_CHUNKS = MQTT_MAX_ACK_PENDING // 2


class Partition:
    """One owned partition: MQTT session, Coordinator core, fenced checkpoint, unacknowledged messages."""

    def __init__(self, worker: "Worker", number: int, lease: Lease) -> None:
        self.worker = worker
        self.number = number
        self.lease = lease
        topics = worker.topics
        spec = worker.model.spec
        self.strategy = self.sum = PartialSum(spec.n_params, worker.staleness)  # self.strategy: maybe wrapped (DP)
        # the single coordinator's relative norm bound, per partition (its agents' references stay exact);
        # off where no update is seen alone (secure aggregation) and under central DP (the clip bounds each)
        factor = None if worker.secagg is not None or worker.dp is not None else worker.norm_factor
        validator = UpdateValidator(topics, spec.n_params, max_staleness=worker.max_staleness,
                                    norm=NormBound(worker.max_norm, factor), reorder_window=REORDER_WINDOW)
        self.dp = None
        self.secagg = None
        if worker.secagg is not None:  # masking rounds: partials are cohort sums, no update is seen in the clear
            from tier.secagg import CohortsOnly, PartitionRounds  # cryptography: imported only when asked for

            self.strategy = self.sum = CohortsOnly(spec.n_params, worker.staleness)
            self.secagg = PartitionRounds(topics, spec.n_params, worker.secagg)
        elif worker.dp is not None:  # central DP at the root: clip to C, weight 1, once per agent per partial
            self.strategy = self.dp = PartitionDP(self.strategy, worker.dp)
            validator = guard(validator, self.dp)
        self.core = Coordinator(topics, spec, self.strategy, validator, buffer_timeout=None, history=1)
        self.core.audit = self._audit
        # chunked updates (update/<agent>/chunk, mapped to updc/<P>/<agent>): assembled with the single
        # coordinator's bounds; a chunk's ack waits with its update for the partial that covers it
        self.chunks = UpdateChunks(validator.max_bytes, max_held=worker.max_held_chunks, timeout=worker.chunk_timeout)
        self.rejections = RejectionLog()
        self.record = FencedRecord(worker.nats, f"p{number}")
        self.lock = threading.Lock()
        self.commit_lock = threading.Lock()  # one commit at a time: the commit loop's, or a hand-over's
        self.covers: list = []
        self.oldest: float | None = None
        self.unacked: list = []  # (connection, mid, qos)
        self.held: list = []  # updates on a model newer than ours: (arrived, topic, payload, retain, acks)
        # (state, partial bytes | None, device message acks, agent -> seq to ack, secure-aggregation messages):
        # written, not yet published/acked
        self.staged: tuple | None = None
        self.seq = 0
        # the partition's refusal counts in its last checkpoint, and the last the root was sent (with a partial
        # or alone: a partition that folds nothing still reports its refusals)
        self.counts: Counts | None = None
        self.reported: Counts | None = None
        self.lost = False
        self.link: Link | None = None

    # start-up ---------------------------------------------------------------------------

    def start(self) -> None:
        state = self.record.read() or {}
        self.core.validator.restore(state.get("highest_seq", {}), state.get("gaps", 0), state.get("missing"),
                                     state.get("first"))
        self.core.accepted_ = state.get("accepted", 0)
        self.core.rejected_.update(state.get("rejected", {}))  # the partition's refusals, across owners
        self.seq = state.get("seq", 0)
        if self.core.rejected_:  # the root may not have them (the previous owner died before sending them)
            self.counts = Counts(self.number, dict(self.core.rejected_))
        if self.dp is not None:
            self.dp.restore(state.get("dp"))
        if self.secagg is not None:  # the round in flight resumes; its stage's messages go out after the claim
            self.secagg.restore(state.get("secagg"))
        self.adopt(self.worker.model)
        # the session's subscription first: NATS keeps QoS 1 messages only for subscriptions that exist,
        # and the root publishes the fleet's first model only once every partition has claimed its key
        prefix, fleet = self.worker.topics.prefix, self.worker.topics.fleet
        subscribed = threading.Event()
        self.link = Link(self.worker.mqtt_nodes, f"agg-{fleet}-p{self.number}", persistent=True,
                         start=self.number, manual_ack=True, on_message=self._on_message,
                         on_connect=lambda c, *a: c.subscribe(self._filters()),
                         on_subscribed=subscribed.set)
        self.link.start()
        if not subscribed.wait(SUBSCRIBE_TIMEOUT_S):
            drop(self.link)
            raise TimeoutError(f"no SUBACK for partition {self.number} within {SUBSCRIBE_TIMEOUT_S:g} s")
        claim = dict(state, epoch=self.lease.epoch, owner=self.worker.worker_id)
        try:
            self.record.write(claim)  # Fenced if another owner wrote since our read
        except Exception:  # not taken over: the session must not stay connected, folding into nothing
            drop(self.link)
            raise
        if state.get("pending"):  # the previous owner's last partial may never have reached JetStream
            self.staged = (dict(claim, written=True), state["pending"], [], {}, [])
        if self.secagg is not None:  # claimed: the partition's agents' keys from now on
            self.worker.seed_secagg(self)
        log.info("partition %d: epoch %d, restored %d agent(s), partial seq %d", self.number, self.lease.epoch,
                 len(self.core.validator.highest_seq), self.seq)

    def _filters(self) -> list[tuple[str, int]]:
        """The partition session's subscriptions: its updates, update chunks and (secure aggregation) the
        shares, masked inputs and reveals the cluster maps to it."""
        base, p = self.worker.topics.base, self.number
        kinds = ["update", "update_chunk"] + (["secagg"] if self.secagg is not None else [])
        return [(tier_subject(base, kind, p, fill="+", sep="/"), 1) for kind in kinds]

    def adopt(self, model) -> None:
        if model is not None:
            with self.lock:
                self.core.adopt(model)

    # network thread -----------------------------------------------------------------------

    def _audit(self, topic, update, reason, staleness, norm=None, limit=None) -> None:
        if reason is None and update is not None:
            self.covers.append((update.agent_id, update.seq, update.base_version))
            if self.oldest is None:
                self.oldest = time.time()

    def _on_message(self, client, userdata, msg) -> None:
        ack = (self.link.connection, msg.mid, msg.qos)
        head = tier_subject(self.worker.topics.base, "secagg", self.number, sep="/") + "/"
        if self.secagg is not None and msg.topic.startswith(head):
            self._on_secagg(msg.topic[len(head):], msg.payload, msg.retain, ack)
            return
        kind, agent = self.worker.topics.tier_topic(msg.topic) or ("update", None)
        try:
            topic = self.worker.topics.update(self._own_agent(agent))
        except ValueError:
            topic, kind = msg.topic, "update"  # the core counts it as a bad topic
        with self.lock:
            if kind == "update_chunk":
                reason = self._take_chunk(agent, topic, msg.payload, msg.retain, ack)
            else:
                reason = self._take(topic, msg.payload, msg.retain, [ack])
        if reason is not None:
            self.rejections(reason, msg.topic)

    def _own_agent(self, agent: str) -> str:
        """`agent` if it is a valid id the account mapping sends to this partition, else ValueError: the mapped
        subject is itself a topic a device can publish on, and an update sent there for another partition's
        agent would be folded there too (its (agent, seq) dedup is per partition: counted twice)."""
        if partition_of(check_name("agent id", agent), self.worker.partitions) != self.number:
            raise ValueError(f"agent {agent!r} is not of partition {self.number}")
        return agent

    def _on_secagg(self, rest: str, payload: bytes, retain: bool, ack) -> None:
        """A share, masked input or reveal (`<kind>/<agent>` of psecagg/<P>/): into the round, acknowledged
        with the next commit, which holds the state it moved."""
        kind, _, agent = rest.partition("/")
        try:
            topic = self.worker.topics.secagg(kind, self._own_agent(agent))
        except ValueError:
            topic = None
        with self.lock:
            self.unacked.append(ack)
            reason = "topic" if topic is None else self.secagg.handle(topic, payload, retained=retain)
        if reason is not None:
            self.rejections(f"secagg_{kind}" if topic else "topic", rest)

    def _take(self, topic: str, payload: bytes, retain: bool, acks: list) -> str | None:
        """Fold one update (or hold it: a newer model, a repeat under central DP); its acks wait for the
        commit (under the lock)."""
        if self._newer_base(topic, payload) or self._repeat(topic, self.held):
            self.held.append((time.monotonic(), topic, payload, retain, acks))
            return None
        self.unacked.extend(acks)
        return self.core.handle_update(topic, payload, retained=retain)

    def _take_chunk(self, agent: str, topic: str, payload: bytes, retain: bool, ack) -> str | None:
        """One chunk of an agent's update (coordinator/chunks.py): the assembled update goes on as one,
        with every chunk's ack (under the lock)."""
        taken = self.chunks.add(agent, payload, ack)
        reason = self._chunks_done(taken)
        if taken.update is None:
            return reason
        return self._take(topic, taken.update, retain, taken.acks) or reason

    def _chunks_done(self, taken) -> str | None:
        """Acks released by the bounds go out with the next commit; dropped sets are counted (under the lock)."""
        self.unacked.extend(taken.release)
        return taken.tally(self.core)

    def _repeat(self, topic: str, waiting: list) -> bool:
        """Central DP: this agent is in the partial being built, or one of its updates is `waiting`: held for
        a later partial (unacknowledged) rather than refused as dp_repeat, so nothing is lost."""
        if self.dp is None:
            return False
        agent = self.worker.topics.agent_of_update(topic)
        return agent in self.dp.members or any(self.worker.topics.agent_of_update(t) == agent for _, t, *_ in waiting)

    def _newer_base(self, topic: str, payload: bytes) -> bool:
        agent = self.worker.topics.agent_of_update(topic)
        if agent is None:
            return False
        try:
            return decode_update(payload, agent).base_version > self.core.version_
        except (ProtocolError, ValueError, TypeError):
            return False

    # main thread --------------------------------------------------------------------------

    def release_held(self) -> None:
        """Fold the held updates whose model we now know (or that waited HOLD_S: then judged as they are)."""
        if self.held and time.monotonic() - self.held[0][0] > HOLD_S / 2:
            self.worker.refresh_model()  # the retained model is late: the root's checkpoint has the version
        with self.lock:
            if (expired := self._chunks_done(self.chunks.expire())) is not None:
                self.rejections(expired, self.worker.topics.all_update_chunks)
            now, keep = time.monotonic(), []
            held, self.held = self.held, []
            for item in held:
                arrived, topic, payload, retain, acks = item
                if now - arrived < HOLD_S and (self._newer_base(topic, payload) or self._repeat(topic, keep)):
                    keep.append(item)
                    continue
                self.core.handle_update(topic, payload, retained=retain)
                self.unacked.extend(acks)
            self.held = keep

    def commit(self) -> None:
        """One group commit (see the module docstring); retried as a whole while a step fails."""
        if self.lease.revision is None:
            raise Fenced(f"lease of partition {self.number} lost")
        # a lease not renewed lately (its bucket electing a leader after a node died) does not stop the commit:
        # the fenced checkpoint write below fails once another owner has claimed the partition, and only
        # what that write made durable is published and acknowledged
        if self.staged is None:
            with self.lock:
                before = self.secagg.signature() if self.secagg is not None else None
                result = self.secagg.tick() if self.secagg is not None else None
                outbox = self.secagg.rounds.take_outbox() if self.secagg is not None else []
                if not self.unacked and result is None and not outbox \
                        and (self.secagg is None or self.secagg.signature() == before):
                    self._report_counts()
                    return
                total, weight, count, rows = self.strategy.take()
                covers, self.covers = self.covers, []
                acks, self.unacked = self.unacked, []
                agent_acks = self.core.acks.take()  # to the devices once the partial is stored (protocol/acks.py)
                oldest, self.oldest = self.oldest, None
                body = None
                if result is not None:  # a cohort's sum: weight 1 per member, as the coordinator's SecureFedBuff
                    self.seq += 1
                    now = time.time()
                    body = encode_partial(Partial(self.number, self.lease.epoch, self.seq, result.total,
                                                  float(result.count), result.count, self.secagg.covers(result), now,
                                                  now - result.seconds, self.secagg.l2_clip, result.round_id,
                                                  dict(self.core.rejected_), dict(self.secagg.rounds.excluded_)))
                elif count:
                    self.seq += 1
                    body = encode_partial(Partial(self.number, self.lease.epoch, self.seq, total, weight, count,
                                                  covers, time.time(), oldest or time.time(),
                                                  self.dp.mechanism.clip_norm if self.dp else None,
                                                  rejected=dict(self.core.rejected_), rows=rows))
                state = {
                    "epoch": self.lease.epoch, "owner": self.worker.worker_id, "seq": self.seq, "pending": body,
                    "highest_seq": dict(self.core.validator.highest_seq), "gaps": self.core.validator.gaps_,
                    "missing": {a: sorted(m) for a, m in self.core.validator.missing.items() if m},
                    "first": dict(self.core.validator.first),
                    "accepted": self.core.accepted_, "rejected": dict(self.core.rejected_),
                    "dp": self.dp.state() if self.dp else None,
                    "secagg": self.secagg.state() if self.secagg else None,
                }
                self.counts = Counts(self.number, dict(self.core.rejected_),
                                     dict(self.secagg.rounds.excluded_) if self.secagg is not None else {})
            self.staged = (state, body, acks, agent_acks, outbox)
            self.record.write(state)
        elif not self.staged[0].get("written"):
            self.record.write(self.staged[0])
        self.staged[0]["written"] = True
        state, body, acks, agent_acks, outbox = self.staged
        if body is not None:
            nats = self.worker.nats
            subject = partial_subject(nats.prefix, nats.fleet, self.number)
            headers = {"Nats-Msg-Id": f"{nats.fleet}-p{self.number}-{state['seq']}"}
            nats.call(lambda: nats.js.publish(subject, body, headers=headers), JS_TIMEOUT_S)
            self.reported = self.counts  # a partial carries the counts of its checkpoint
        for topic, payload, retain in outbox:  # the round they belong to is durable now (cohort, inboxes, unmask)
            self.link.client.publish(topic, payload, qos=1, retain=retain)
        for connection, mid, qos in acks:
            if connection == self.link.connection:  # a mid of an older connection is redelivered anyway
                self.link.client.ack(mid, qos)
        self.staged = None
        if agent_acks and not self.worker.send_acks(agent_acks):
            with self.lock:  # the partial is durable, its acks wait for the next commit
                self.core.acks.put_back(agent_acks)
        self._report_counts()

    def _report_counts(self) -> None:
        """The checkpointed refusal counts no partial carried to the root yet, alone (retried with the next commit)."""
        counts = self.counts
        if counts is None or counts == self.reported or not (counts.rejected or counts.excluded):
            return
        nats = self.worker.nats
        subject = partial_subject(nats.prefix, nats.fleet, self.number, counts=True)
        nats.call(lambda: nats.js.publish(subject, encode_counts(counts)), JS_TIMEOUT_S)
        self.reported = counts

    def stop(self, graceful: bool) -> None:
        self.worker.unseed_secagg(self)
        if self.link is not None:
            if graceful:
                self.link.close()
            else:
                drop(self.link)
        if graceful:
            self.lease.release()


class Worker:
    """Holds up to a fair share of the fleet's partitions and serves each (see the module docstring)."""

    def __init__(self, nats: Nats, mqtt_nodes, topics: Topics, *, partitions: int, worker_id: str,
                 max_partitions: int | None = None, staleness: str = "constant", max_staleness: int = 1000,
                 max_norm: float | None = None, norm_factor: float | None = DEFAULT_NORM_FACTOR,
                 max_held_chunks: int = MAX_HELD_CHUNKS, chunk_timeout: float = CHUNK_TIMEOUT_S) -> None:
        self.nats = nats
        self.mqtt_nodes = mqtt_nodes
        self.topics = topics
        self.partitions = partitions
        self.worker_id = worker_id
        self.max_partitions = max_partitions or partitions
        self.staleness = parse_staleness(staleness)
        self.max_staleness = max_staleness
        self.max_norm = max_norm if max_norm is not None else 1e6
        if norm_factor is not None and norm_factor < 0:
            raise ValueError(f"--norm-factor must be > 0, or 0 for off, got {norm_factor:g}")
        self.norm_factor = norm_factor or None
        UpdateChunks(1, max_held=max_held_chunks, timeout=chunk_timeout)  # refuses bad bounds in one line
        self.max_held_chunks = max_held_chunks
        self.chunk_timeout = chunk_timeout
        self.model = None
        self.dp: dict | None = None  # the root's central DP settings (tier/privacy.py), from its checkpoint
        self.secagg: dict | None = None  # the root's secure-aggregation settings (tier/secagg.py), likewise
        # secure aggregation: every agent's retained key announcement and who is offline, read once for all
        # partitions (fleet-wide topics) and handed to the owner of the agent's partition
        self.sa_keys: dict[str, bytes] = {}
        self.sa_offline: set[str] = set()
        self.sa_parts: dict[int, Partition] = {}
        self.sa_lock = threading.Lock()
        self.sa_link: Link | None = None
        self.dp_checked = time.monotonic()
        self.owned: dict[int, Partition] = {}
        self.presence = Lease(nats, f"w_{worker_id}", worker_id)
        self.keeper = Keeper()
        self.vacancy = Vacancy(grace=SCAN_S)
        self.model_seen = threading.Event()
        self.watcher = Link(mqtt_nodes, f"agg-{topics.fleet}-model-{worker_id}", persistent=False,
                            on_message=self._on_model, on_connect=lambda c, *a: c.subscribe(topics.model, 0))

    def send_acks(self, acks: dict[str, int]) -> bool:
        """One commit's per-agent acks as core NATS messages on the ack topics' subjects: an MQTT subscriber of
        its ack topic online gets each (QoS 0), nothing is stored (a retained QoS 1 ack was one R3 store per update
        at a fleet of 100,000, what bounded the sustained rate). False when the connection did not take them."""
        messages = [(mqtt_subject(self.topics.ack(agent)), encode_ack(seq)) for agent, seq in acks.items()]

        async def publish() -> None:
            for subject, payload in messages:
                await self.nats.nc.publish(subject, payload)  # buffered by nats-py, flushed in the background

        try:
            self.nats.call(publish, JS_TIMEOUT_S)
            return True
        except Exception as exc:  # its outbound buffer full while reconnecting: the next commit sends them
            log.debug("acks of %d agents held for the next commit: %s", len(messages), exc)
            return False

    def _on_model(self, client, userdata, msg) -> None:
        if chunking.is_manifest(msg.payload):  # a chunked model (the root's --max-packet-bytes): the root's checkpoint
            self.refresh_model()  # holds it, written before the manifest went out
            return
        held = self.model
        if held is None:  # the spec to judge it by: the root's checkpoint, written before its models go out
            self.refresh_model()
            return
        try:  # the held spec judged before the params decode (a 5 MB int4 model of 10^7 features: ~128 MiB)
            model = decode_model(msg.payload, **only_spec(held.spec))
        except (ProtocolError, ValueError, TypeError) as exc:
            log.warning("unreadable model on %s: %s", msg.topic, exc)
            if getattr(exc, "reason", None) == "limits":  # a new spec comes first in the root's checkpoint
                self.refresh_model()
            return
        if model.fleet != self.topics.fleet or (self.model is not None and model.version <= self.model.version):
            return
        self.model = model
        self.model_seen.set()
        for part in list(self.owned.values()):
            part.adopt(model)

    def _on_public(self, client, userdata, msg) -> None:
        """A key announcement or agent status (secure aggregation): kept, and handed to its partition's rounds."""
        kind = self.topics.secagg_of(msg.topic)
        agent = kind[1] if kind is not None and kind[0] == "key" else self.topics.agent_of_status(msg.topic)
        if agent is None:
            return
        with self.sa_lock:
            if kind is not None:
                if msg.payload:
                    self.sa_keys[agent] = msg.payload
                else:
                    self.sa_keys.pop(agent, None)
            elif len(msg.payload) <= MAX_STATUS_BYTES and (state := status_state(msg.payload)) is not None:
                (self.sa_offline.add if state == "offline" else self.sa_offline.discard)(agent)
            part = self.sa_parts.get(partition_of(agent, self.partitions))
        if part is not None and part.secagg is not None:
            with part.lock:
                part.secagg.handle(msg.topic, msg.payload)

    def seed_secagg(self, part: Partition) -> None:
        """A partition taken: its agents' keys and offline statuses into its rounds; then every new one."""
        with self.sa_lock:
            self.sa_parts[part.number] = part
            with part.lock:
                for agent, payload in self.sa_keys.items():
                    if partition_of(agent, self.partitions) == part.number:
                        part.secagg.handle(self.topics.secagg("key", agent), payload)
                for agent in self.sa_offline:
                    if partition_of(agent, self.partitions) == part.number:
                        part.secagg.handle(self.topics.agent_status(agent), b"")

    def unseed_secagg(self, part: Partition) -> None:
        with self.sa_lock:
            if self.sa_parts.get(part.number) is part:
                del self.sa_parts[part.number]

    def start_public(self) -> None:
        """Under secure aggregation: one subscription to every key announcement and agent status."""
        if self.secagg is None or self.sa_link is not None:
            return
        topics = self.topics
        self.sa_link = Link(self.mqtt_nodes, f"agg-{topics.fleet}-keys-{self.worker_id}", persistent=False,
                            on_message=self._on_public,
                            on_connect=lambda c, *a: c.subscribe([(topics.all_secagg("key"), 1),
                                                                  (topics.all_agent_statuses, 1)]))
        self.sa_link.start()

    def refresh_model(self) -> None:
        """Adopt the root's checkpointed model when it is newer than the last retained one we got."""
        try:
            state = FencedRecord(self.nats, "root").read()
        except Exception as exc:
            log.debug("root checkpoint: %s", exc)
            return
        if state and "spec" in state and (self.model is None or int(state["version"]) > self.model.version):
            self.model_seen.set()
            self.model = ModelMessage(self.topics.fleet, int(state["version"]), ModelSpec.from_wire(state["spec"]),
                                      np.frombuffer(state["params"], dtype="<f8").copy())
            for part in list(self.owned.values()):
                part.adopt(self.model)

    def read_dp(self, stop: threading.Event) -> None:
        """The root's DP and secure-aggregation settings from its checkpoint (written before its first model),
        before any partition."""
        while not stop.is_set():
            try:
                state = FencedRecord(self.nats, "root").read() or {}
            except Exception as exc:  # a node down: the partitions wait, their updates stay unacknowledged
                log.info("reading the root's DP settings: %s; retrying", exc)
                stop.wait(SCAN_S)
                continue
            self.dp = state.get("dp_config")
            self.secagg = state.get("secagg_config")
            if self.dp:
                log.info("central DP: updates clipped to C=%g, weight 1, one per agent per partial", self.dp["clip"])
            if self.secagg:
                log.info("secure aggregation: cohorts of %d agents inside each partition, threshold %d",
                         self.secagg["k"], self.secagg["threshold"])
                self.start_public()
            return

    def metrics(self) -> dict:
        """What --metrics-port serves (tier/metrics.py), read at every scrape: per owned partition its lease epoch,
        updates folded, refusals by reason and partials committed (cumulative across owners)."""
        parts = {str(n): {"epoch": p.lease.epoch or 0, "accepted": p.core.accepted_, "rejected": dict(p.core.rejected_),
                          "partials": p.seq, "weight_capped": p.sum.weight_capped,
                          "repeat_agent": p.sum.repeat_agent} for n, p in list(self.owned.items())}
        return {"fleet": self.topics.fleet, "role": "worker", "worker": self.worker_id,
                "version": self.model.version if self.model is not None else -1, "partitions": parts}

    def live_workers(self) -> int:
        try:
            keys = self.nats.call(lambda: self.nats.leases.keys(), JS_TIMEOUT_S)
        except Exception:  # no keys yet, or a node down: count ourselves
            return 1
        return max(1, sum(1 for k in keys if k.startswith("w_")))

    def rebalance(self) -> None:
        """Renew what we hold, give up what we lost, win free partitions up to our fair share."""
        if self.presence.revision is None and self.presence.acquire():
            self.keeper.add(self.presence)
        for number, part in list(self.owned.items()):
            if part.lost or part.lease.revision is None:
                log.warning("partition %d lost", number)
                del self.owned[number]
                self.keeper.remove(part.lease)
                with part.commit_lock:
                    part.stop(graceful=False)
        self.follow_dp()
        share = min(self.max_partitions, math.ceil(self.partitions / self.live_workers()))
        if len(self.owned) > share:  # a worker joined: hand the highest partitions back
            for number in sorted(self.owned, reverse=True)[:len(self.owned) - share]:
                self.hand_back(number)
                log.info("partition %d handed over (fair share %d)", number, share)
        for number in range(self.partitions):
            if len(self.owned) >= share:
                break
            if number in self.owned:
                continue
            lease = Lease(self.nats, f"p{number}", self.worker_id)
            try:
                if not self.vacancy.try_acquire(lease):
                    continue
                part = Partition(self, number, lease)
                self.keeper.add(lease)
                part.start()
            except Exception as exc:
                log.warning("partition %d: cannot take it over: %s", number, exc)
                self.keeper.remove(lease)
                lease.release()
                continue
            self.owned[number] = part

    def hand_back(self, number: int) -> None:
        """Commit what partition `number` holds and give its lease up."""
        part = self.owned.pop(number)
        self.keeper.remove(part.lease)
        with part.commit_lock:  # not while the commit loop commits it
            try:
                part.commit()
            except Exception as exc:  # its messages stay unacknowledged: the next owner gets them
                log.warning("partition %d: last commit before hand-over failed: %s", number, exc)
            part.stop(graceful=True)

    def follow_dp(self) -> None:
        """A root that restarted with other --dp-* flags: hand every partition back, to take them again
        under the new settings (partials already made under the old ones are the root's to refuse)."""
        if time.monotonic() < self.dp_checked + DP_CHECK_S:
            return
        self.dp_checked = time.monotonic()
        try:  # a short bound: this runs between commits
            state = FencedRecord(self.nats, "root").read(timeout=2) or {}
        except Exception:  # a node down: next time
            return
        if "spec" not in state or not (dp_changed(self.dp, state.get("dp_config"))
                                       or dp_changed(self.secagg, state.get("secagg_config"))):
            return
        log.warning("the root's DP or secure-aggregation settings changed (%s, %s -> %s, %s): taking the partitions "
                    "again under them", self.dp, self.secagg, state.get("dp_config"), state.get("secagg_config"))
        for number in list(self.owned):
            self.hand_back(number)
        self.dp = state.get("dp_config")
        self.secagg = state.get("secagg_config")
        self.start_public()

    def _scan(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.rebalance()
            except Exception:  # a scan that failed is the next scan's to redo
                log.exception("ownership scan failed")
            stop.wait(SCAN_S)

    def run(self, stop: threading.Event) -> None:
        self.watcher.start()
        if self.presence.acquire():
            self.keeper.add(self.presence)
        while not stop.is_set() and not self.model_seen.wait(0.5):
            self.refresh_model()  # a new fleet: the root's checkpoint has the spec before any model is out
            if self.model is not None:
                break
            log.info("waiting for the root (its retained model on %s or its checkpoint)", self.topics.model)
        self.read_dp(stop)
        # ownership scans on their own thread: while a killed node's streams elect leaders each KV call of
        # a scan waits out its timeout (1-3 s a scan, seen), and the commits of the partitions we hold
        # must not wait with it
        scans = threading.Thread(target=self._scan, args=(stop,), name="rebalance", daemon=True)
        scans.start()
        while not stop.is_set():
            for number, part in list(self.owned.items()):
                with part.commit_lock:
                    try:
                        part.release_held()
                        part.commit()
                    except Fenced as exc:
                        log.warning("partition %d: %s; giving it up", number, exc)
                        part.lost = True
                    except Exception as exc:  # a node down: the staged commit is retried
                        log.debug("partition %d: commit retried: %s", number, exc)
            stop.wait(FLUSH_S)
        scans.join(SUBSCRIBE_TIMEOUT_S + 10)
        for number, part in list(self.owned.items()):
            try:
                part.commit()
            except Exception as exc:
                log.warning("partition %d: final commit failed: %s", number, exc)
            part.stop(graceful=True)
        self.keeper.stop()
        self.presence.release()
        self.watcher.close()
        if self.sa_link is not None:
            self.sa_link.close()


def build_parser() -> argparse.ArgumentParser:
    parser = layered_parser("python -m tier.worker",
                         "Partition worker of fedmq's scale-out tier: owns partitions by NATS KV lease, validates and "
                         "dedups their updates with the coordinator's core and commits partial aggregates to JetStream.")
    add_cluster_args(parser)
    parser.add_argument("--max-partitions", type=int, help="own at most this many partitions (default: fair share)")
    parser.add_argument("--staleness", default="constant", help="constant, polynomial:A or hinge:A,B")
    parser.add_argument("--max-staleness", type=int, default=1000, help="reject updates staler than this")
    parser.add_argument("--max-update-norm", type=float, help="reject updates with a larger L2 norm")
    parser.add_argument("--norm-factor", type=float, default=DEFAULT_NORM_FACTOR,
                        help="reject an update whose norm is more than this many times the median of the newest "
                             f"update of each of the other agents among the partition's last 50, once {NORM_WARMUP} were seen (one that "
                             "agrees with the recent accepted deltas is taken at their median norm instead); 0: off "
                             f"(default {DEFAULT_NORM_FACTOR:g}; off while the root runs secure aggregation or central DP)")
    parser.add_argument("--max-held-chunks", type=int, default=MAX_HELD_CHUNKS,
                        help="acks of chunked updates' chunks held back per partition until the partial covering "
                             f"their update is durable, half of it per agent (default {MAX_HELD_CHUNKS}: half the "
                             "session window NATS is configured with; past it, acks go out and the chunks are kept)")
    parser.add_argument("--chunk-timeout", type=float, default=CHUNK_TIMEOUT_S, metavar="SECONDS",
                        help="drop a chunked update not complete this many seconds after its first chunk (counted)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parse_layered(build_parser(), argv, CLUSTER_REQUIRED)
    start_logging(args.log_level)
    logging.getLogger("coordinator.server").setLevel(logging.WARNING)  # "continuing from version N" per partition
    stop = stop_on_signals()
    try:
        topics = Topics(args.fleet, args.topic_prefix)
        nats = start_with_retries(lambda: connect_nats(args, "worker"), stop, "worker")
        worker = Worker(nats, parse_urls(args.mqtt), topics, partitions=args.partitions, worker_id=args.id,
                        max_partitions=args.max_partitions, staleness=args.staleness,
                        max_staleness=args.max_staleness, max_norm=args.max_update_norm,
                        norm_factor=args.norm_factor, max_held_chunks=args.max_held_chunks, chunk_timeout=args.chunk_timeout)
        start_tier_metrics(args.metrics_port, worker.metrics)
    except (ValueError, OSError, TimeoutError) as exc:
        print(f"tier worker: {exc}", file=sys.stderr)
        return 2
    worker.run(stop)
    nats.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
