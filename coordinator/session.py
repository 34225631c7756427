"""The coordinator's MQTT session: updates in on paho's network thread, commits and models out
on the main thread.

Delivery: paho runs with manual acknowledgement. `on_message` (network thread) folds each
payload into the core and notes its message id; the main thread then commits, as a group,
everything handled so far (audit lines, then one atomic checkpoint holding the model, the
fedbuff/fedavg buffer and the (agent, seq) dedup state) and only then acknowledges those
messages to the broker. A crash before the commit leaves them unacknowledged: the broker
redelivers them and the restored dedup state counts each exactly once. While checkpoints
fail nothing is acknowledged (the broker's in-flight window then holds the rest back), and
the status keeps flowing with `checkpoint_failing` in it. A model is published only from a
committed state, so the retained model is never ahead of the checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

from coordinator.audit import AuditLog
from coordinator.chunks import MAX_HELD, TIMEOUT_S, UpdateChunks
from coordinator.publish_policy import floor
from coordinator.server import Coordinator
from coordinator.status import encode_status
from coordinator.store import CheckpointError
from protocol import chunking
from protocol.acks import encode_ack
from protocol.errors import ProtocolError
from protocol.messages import MAX_MESSAGE_BYTES, ModelMessage, decode_model, only_spec
from protocol.model_spec import ModelSpec
from protocol.topics import Topics
from protocol.transport import BrokerSettings, connect, make_client

log = logging.getLogger(__name__)

# Updates that arrive before the start-up check of the retained model are held, up to this
# (with manual acknowledgement the broker sends no more than its in-flight window anyway).
EARLY_MAX_MESSAGES = 10_000
EARLY_MAX_BYTES = 64 * 1024 * 1024
# Group commit: under load a commit waits until COMMIT_SPACING_S passed since the last one, so
# one checkpoint (the whole model) covers many updates and throughput holds; it must stay
# inside the broker's in-flight window (max_inflight_messages 1000 at ~9k updates/s is
# 110 ms). It commits sooner once no message came for COMMIT_IDLE_S: the stream paused, or
# a broker with a small window (mosquitto's default is 20) waits for our acknowledgements.
COMMIT_SPACING_S = 0.05
COMMIT_IDLE_S = 0.005
# A commit writes a checkpoint only when committed state changed (`Coordinator.durable_key`);
# what refused payloads change (rejection counters, their seq, the audit lines) rides with
# the next real checkpoint or, at the latest, this long after: hostile traffic cannot turn
# into SD-card writes (issue 18).
COUNTERS_COMMIT_S = 5.0


class RejectionLog:
    """Logs rejections at WARNING, at most once per reason per `every` seconds, with counts."""

    def __init__(self, every: float = 10.0) -> None:
        self.every = every
        self._last: dict[str, float] = {}
        self._since: dict[str, int] = {}

    def __call__(self, reason: str, topic: str) -> None:
        self._since[reason] = self._since.get(reason, 0) + 1
        now = time.monotonic()
        if now - self._last.get(reason, -self.every) >= self.every:
            log.warning("rejected %d update(s) as %s (latest on %s)", self._since[reason], reason, topic)
            self._last[reason] = now
            self._since[reason] = 0


class CoordinatorSession:
    """Connects a `Coordinator` to the broker and runs until `stop` is set.

    On start it reads the broker's retained model and continues from it when it is a
    newer version of the same fleet and spec than the checkpoint (see `Coordinator.adopt`).
    """

    def __init__(
        self,
        core: Coordinator,
        settings: BrokerSettings,
        *,
        connect_timeout: float = 10.0,
        metrics_log: str | None = None,
        audit_log: str | None = None,
        on_publish=None,
        on_status=None,
        retained_grace: float = 0.5,
        max_packet_bytes: int | None = None,
        max_held_chunks: int = MAX_HELD,
        chunk_timeout: float = TIMEOUT_S,
    ) -> None:
        self.core = core
        self.max_packet_bytes = max_packet_bytes  # the broker's packet limit: larger models go as chunks
        self.settings = settings
        self.connect_timeout = connect_timeout
        self.retained_grace = retained_grace
        self.metrics_log = Path(metrics_log) if metrics_log else None
        self.on_publish = on_publish  # callback(status) after each model publish
        self.on_status = on_status  # callback(status) before every status publish, with a model or not: metrics
        self.lock = threading.Lock()  # guards `core` and `_unacked` between the two threads
        position = core.audit_position_
        committed_audit = position.get("offset") if position.get("path") == _abspath(audit_log) else None
        self.audit = AuditLog(audit_log, committed_audit) if audit_log else None
        core.audit = self.audit
        self.rejections = RejectionLog()
        self._unacked: list[tuple[int, int, int]] = []  # (connection, mid, qos) handled, not yet durable
        self._connection = 0  # bumped on every (dis)connection: a mid belongs to one connection
        self._wake = threading.Event()  # set by the network thread: something to commit
        self._last_message_at = 0.0  # monotonic, set by the network thread on every message
        self._committed: tuple | None = None
        self._durable: tuple | None = None  # `Coordinator.durable_key` of the newest checkpoint written
        self._durable_at = float("-inf")
        self._unpublishable: int | None = None  # a version model_payload could not encode (logged once)
        self._status_handled = -1
        self._status_at = float("-inf")
        self._checkpoint_error_at = float("-inf")
        self._last_infos: list = []
        self._model_chunk_head = f"{core.topics.base}/model/chunk/"
        # start-up: the retained model, and the updates that arrive before it is looked at
        self._early: list | None = []
        self._early_bytes = 0
        self._retained: bytes | None = None
        self._retained_seen = threading.Event()
        self._first_suback = threading.Event()
        self._connected_once = False
        self._republish = threading.Event()
        # chunked messages (protocol/chunking.py): update chunks stay unacknowledged until the
        # update they assemble is committed; the retained model's chunks are read at start-up
        self._update_chunks = UpdateChunks(core.validator.max_bytes, max_held=max_held_chunks, timeout=chunk_timeout)
        self._model_chunks = chunking.Collector(max_bytes=2 * MAX_MESSAGE_BYTES, max_partial=3)
        self._model_chunks_sent = 0  # chunk topics holding our retained chunks (cleared when fewer are needed)
        self._secagg = getattr(core, "secagg", None)  # a SecureCoordinator's rounds (coordinator/secagg.py)
        core.acks_served = True  # every commit acks what it made durable, and the model says so
        self.client = make_client(settings, f"fedmq-coordinator-{core.topics.fleet}", persistent=True)
        self.client.manual_ack_set(True)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message

    # paho callbacks (network thread) -----------------------------------------------------

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            if self._connected_once:  # before that, start() reports it (one line)
                log.error("broker refused the connection: %s", reason_code)
            return
        self._connection += 1
        topics = self.core.topics
        stats = [(topics.all_stats, 1)] if self.core.statistics is not None else []
        stats += [(f, 1) for f in self._secagg.subscriptions] if self._secagg is not None else []  # coordinator/secagg.py
        stats += [(topics.all_update_chunks, 1)]
        stats += [(topics.all_schemas, 1)] if self.core.schema is not None else []
        if self.core.presence is not None and self._secagg is None:  # secure aggregation reads them itself
            stats += [(topics.all_agent_statuses, 1)]
        if self._connected_once:
            client.subscribe([(topics.all_updates, 1), *stats])
            self._republish.set()  # a broker without persistence has lost the retained model
            log.info("reconnected to %s", self.settings.url)
        else:
            client.subscribe([(topics.all_updates, 1), (topics.model, 1), (topics.all_model_chunks, 1), *stats])
            log.info("connected to %s, subscribed to %s", self.settings.url, topics.all_updates)
        self._connected_once = True

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties):
        self._first_suback.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        self._connection += 1  # what was not acknowledged on that connection will be redelivered
        if reason_code.is_failure and self._connected_once:
            log.warning("lost the broker (%s); reconnecting with backoff", reason_code)

    def _on_message(self, client, userdata, msg):
        self._last_message_at = time.monotonic()
        if msg.topic == self.core.topics.model or msg.topic.startswith(self._model_chunk_head):
            if not self._retained_seen.is_set():
                self._take_retained(msg.topic, msg.payload)
            client.ack(msg.mid, msg.qos)  # nothing of ours depends on it
            return
        if (agent := self.core.topics.agent_of_update_chunk(msg.topic)) is not None:
            with self.lock:
                reason = self._take_chunk(agent, msg)
            self._wake.set()
            if reason is not None:
                self.rejections(reason, msg.topic)
            return
        if (handle := self._handler_for(msg.topic)) is not None:
            with self.lock:  # acked through the same group commit as updates
                try:
                    handle(msg.topic, msg.payload, msg.retain)
                except Exception:  # a bug of ours must not end paho's network thread (acked: not redelivered)
                    log.exception("unexpected error on %s", msg.topic)
                self._unacked.append((self._connection, msg.mid, msg.qos))
            self._wake.set()
            return
        with self.lock:
            reason = self._take_update(msg.topic, msg.payload, msg.retain, [(self._connection, msg.mid, msg.qos)])
        self._wake.set()
        if reason is not None:
            self.rejections(reason, msg.topic)

    def _handler_for(self, topic: str):
        """The core's handler(topic, payload, retained) for the other topics it reads, or None.

        Secure-aggregation rounds; each agent's schema, statistics and status (retained by
        design, so the newest copy of each stands)."""
        core = self.core
        if self._secagg is not None and self._secagg.owns(topic):
            return lambda t, p, retained: core.handle_secagg(t, p, retained=retained)
        if core.topics.agent_of_schema(topic) is not None:
            return lambda t, p, retained: core.handle_schema(t, p)
        if core.topics.agent_of_stats(topic) is not None:
            return lambda t, p, retained: core.handle_statistics(t, p)
        if core.topics.agent_of_status(topic) is not None:
            return lambda t, p, retained: core.handle_agent_status(t, p)
        return None

    def _take_update(self, topic: str, payload: bytes, retain: bool, acks: list) -> str | None:
        """Hold an update until start-up is done, or fold it in; its acks wait for the commit (under the lock)."""
        early = self._early
        if early is not None and len(early) < EARLY_MAX_MESSAGES and self._early_bytes < EARLY_MAX_BYTES:
            early.append((topic, payload, retain, acks))
            self._early_bytes += len(payload)
            return None
        reason = self.core.handle_update(topic, payload, retained=retain)
        self._unacked.extend(acks)
        return reason

    def _take_chunk(self, agent: str, msg) -> str | None:
        """One chunk of an agent's update: its ack held (bounded) with it; the assembled update goes on as one."""
        taken = self._update_chunks.add(agent, msg.payload, (self._connection, msg.mid, msg.qos))
        reason = self._chunks_done(taken)
        if taken.update is None:
            return reason
        return self._take_update(self.core.topics.update(agent), taken.update, msg.retain, taken.acks) or reason

    def _chunks_done(self, taken) -> str | None:
        """Release what `taken` lets go and count the partial updates it dropped (under the lock)."""
        self._unacked.extend(taken.release)  # acknowledged with the next commit; dropped sets leave nothing behind
        return taken.tally(self.core)

    def _take_retained(self, topic: str, payload: bytes) -> None:
        """The retained model at start-up: whole, or assembled from its chunks and manifest."""
        if self._model_chunks is None:  # start-up is over
            return
        try:
            if topic != self.core.topics.model:
                if payload:
                    done = self._model_chunks.add(chunking.decode_chunk(payload))
                else:
                    done = None
            elif chunking.is_manifest(payload):
                done = self._model_chunks.expect(chunking.decode_manifest(payload, fleet=self.core.topics.fleet).digest)
            else:
                done = payload
        except ProtocolError as exc:
            log.warning("ignoring a retained model chunk or manifest on %s: %s", topic, exc)
            return
        if done is not None:
            self._retained = done
            self._retained_seen.set()

    # main thread --------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Connect, publish the current model, then commit and publish until `stop` is set.

        The loop wakes for every message (group commit: what arrives during one commit is
        committed by the next) and at least every quarter publish interval.
        On `stop` (or when the fleet's discovered schema lost its majority, coordinator/schema.py):
        a last commit and publish, bounded wait for delivery, disconnect.
        """
        connect(self.client, self.settings, timeout=self.connect_timeout)
        try:
            self._catch_up()
            self._republish.clear()
            self.step(force=True)
            # a publish the floor held back goes out within a floor (coordinator/publish_policy.py)
            tick = min(self.core.publish_interval / 4, max(floor(self.core.publish_policy), 0.01), 1.0)
            last_step = time.monotonic()
            while not stop.is_set() and not (self.core.schema is not None and self.core.schema.lost_):
                self._wake.wait(tick)
                while (now := time.monotonic()) < last_step + COMMIT_SPACING_S \
                        and now - self._last_message_at < COMMIT_IDLE_S and not stop.wait(COMMIT_IDLE_S):
                    pass  # messages still streaming in: let the batch grow
                self._wake.clear()
                last_step = time.monotonic()
                force = self._republish.is_set()
                if force:
                    self._republish.clear()
                self.step(force=force)
            self.step(force=True)
            self._wait_delivered(timeout=5.0)
        finally:
            self.client.disconnect()
            self.client.loop_stop()
            if self.audit:
                self.audit.close()

    def _catch_up(self) -> None:
        """Adopt a newer retained model of this fleet, then handle the updates held meanwhile."""
        topics = self.core.topics
        if self._first_suback.wait(self.connect_timeout):
            self._retained_seen.wait(self.retained_grace)
        else:
            log.warning("no subscription acknowledgement from the broker within %g s", self.connect_timeout)
        self.client.unsubscribe([topics.model, topics.all_model_chunks])
        self._model_chunks = None
        with self.lock:
            if self._retained is not None:
                try:
                    self.core.adopt(retained_model(self._retained, topics, self.core.spec))
                except ProtocolError as exc:
                    log.warning("ignoring the retained model on %s: %s", topics.model, exc)
            early, self._early = self._early or [], None
            reasons = []
            for topic, payload, retained, acks in early:
                reasons.append(self.core.handle_update(topic, payload, retained=retained))
                self._unacked.extend(acks)
        for (topic, *_), reason in zip(early, reasons):
            if reason is not None:
                self.rejections(reason, topic)

    def step(self, force: bool = False) -> bool:
        """Commit what was handled, acknowledge it, then publish the model if it is due (or
        `force`) and the status; True when a model was published.

        The status alone is republished (at most once per interval) when only rejections
        happened since the last one, and while checkpoints fail. While the broker is away
        the state is committed but no model is queued; it goes out again on reconnect.
        """
        topics = self.core.topics
        connected = self.client.is_connected()
        with self.lock:
            if self.core.tick():
                force = True  # a buffer stepped on its timeout: tell the waiting agents at once
            expired = self._chunks_done(self._update_chunks.expire())
            key = (self.core.version_, self.core.handled_)
            publish = connected and self.core.ready and (force or self.core.publish_due())
            acks, self._unacked = self._unacked, []
            agent_acks = self.core.acks.take()  # sent once this commit is durable (protocol/acks.py)
            lines = self.audit.take() if self.audit else []
            outbox = self.core.take_outbox() if self._secagg is not None else []  # a round moved on: commit it first
            state = self._state_to_write(key, outbox, force)
            published_before = (self.core.published_version_, self.core.last_publish_)
            payload = self._model_payload() if publish else None
            status, handled = self._status(), self.core.handled_
        if expired is not None:
            self.rejections(expired, self.core.topics.all_update_chunks)
        offset = self.audit.write(lines) if self.audit else None
        if state is not None:
            durable = state.pop("durable_key")
            if offset is not None:
                state["audit"] = {"path": self.audit.path, "offset": offset}
            try:
                self.core.checkpoint(state)
            except CheckpointError as exc:
                with self.lock:
                    self._unacked[:0] = acks  # not durable: nothing is acknowledged
                    self.core.acks.put_back(agent_acks)
                    if outbox:  # nor is anything of a round that is not durable sent
                        self._secagg.outbox[:0] = outbox
                    self.core.published_version_, self.core.last_publish_ = published_before
                    status = self._status()
                self._report_checkpoint_failure(exc, status, handled, connected)
                return False
            self.core.audit_position_ = state.get("audit", self.core.audit_position_)
            self._durable, self._durable_at = durable, time.monotonic()
        self._committed = key
        # secure-aggregation cohort, inboxes, unmask requests: only from a committed round, which a
        # restarted coordinator resumes and sends again (coordinator/secagg.py)
        for out_topic, out_payload, retain in outbox:
            self.client.publish(out_topic, out_payload, qos=1, retain=retain)
        current = self._connection
        for connection, mid, qos in acks:
            if connection == current:
                self.client.ack(mid, qos)
        for agent, seq in agent_acks.items():  # retained: a device that reconnects reads its newest at once
            self.client.publish(topics.ack(agent), encode_ack(seq), qos=1, retain=True)
        if payload is None:
            self._publish_status_if_due(status, handled, connected)
            return False
        self._status_handled, self._status_at = handled, time.monotonic()
        if self.on_status:  # the exporter first: whoever reads the status on the broker finds /metrics as new
            self.on_status(status)
        self._last_infos = [
            *self._publish_model(payload, status["version"]),
            self.client.publish(topics.coordinator_status, encode_status(status), qos=1, retain=True),
        ]
        self._after_publish(status, len(payload))
        return True

    def _status(self) -> dict:
        """The core's status, and the chunked updates' when there were any (under the lock)."""
        status = self.core.status()
        if (chunks := self._update_chunks.summary()) is not None:
            status["chunks"] = chunks
        return status

    def _model_payload(self) -> bytes | None:
        """The model to publish, or None when it cannot be encoded (logged once per version): nothing
        a device sent may end the coordinator, even through a bug of ours (under the lock)."""
        try:
            return self.core.model_payload()
        except Exception:
            if self._unpublishable != self.core.version_:
                log.exception("cannot encode version %d for publishing; the previous model stays", self.core.version_)
                self._unpublishable = self.core.version_
            return None

    def _state_to_write(self, key: tuple, outbox: list, force: bool) -> dict | None:
        """The state to checkpoint now (under the lock), or None: nothing handled since the last
        commit, or only refused payloads within COUNTERS_COMMIT_S of the last checkpoint."""
        core = self.core
        if not core.checkpoint_dir or (key == self._committed and not outbox):
            return None
        state = core.state()
        durable = core.durable_key(state)
        if durable == self._durable and not outbox and not force \
                and time.monotonic() - self._durable_at < COUNTERS_COMMIT_S:
            core.checkpoints_["deferred"] += 1
            return None
        state["durable_key"] = durable
        return state

    def _publish_model(self, payload: bytes, version: int) -> list:
        """The model on its retained topic, or over the packet limit its retained chunks, then the manifest."""
        topics = self.core.topics
        packets, chunks = chunking.model_packets(topics.model, topics.model_chunk, payload, topics.fleet, version,
                                                 self.max_packet_bytes, self._model_chunks_sent)
        self._model_chunks_sent = chunks  # a smaller model: no stale chunk stays retained
        infos = [self.client.publish(topic, body, qos=1, retain=True) for topic, body in packets]
        if chunks:
            log.debug("version %d in %d chunks", version, chunks)
        return infos

    @property
    def committed(self) -> int:
        """Payloads handled and made durable (acknowledged to the broker, or due to be)."""
        return self._committed[1] if self._committed else 0

    def _publish_status_if_due(self, status: dict, handled: int, connected: bool, failing: bool = False) -> None:
        now = time.monotonic()
        if connected and (handled != self._status_handled or failing) and now - self._status_at >= self.core.publish_interval:
            self._status_handled, self._status_at = handled, now
            if self.on_status:  # before the publish, as with a model
                self.on_status(status)
            self.client.publish(self.core.topics.coordinator_status, encode_status(status), qos=1, retain=True)

    def _report_checkpoint_failure(self, exc: CheckpointError, status: dict, handled: int, connected: bool) -> None:
        now = time.monotonic()
        if now - self._checkpoint_error_at >= 10.0:
            log.error("%s; acknowledging nothing and holding back version %d until a checkpoint succeeds",
                      exc, self.core.version_)
            self._checkpoint_error_at = now
        self._publish_status_if_due(status, handled, connected, failing=True)

    def _after_publish(self, status: dict, size: int) -> None:
        if self.metrics_log:
            try:
                with self.metrics_log.open("a") as fh:
                    fh.write(json.dumps(status) + "\n")
            except OSError as exc:
                log.error("cannot append to the metrics log %s: %s", self.metrics_log, exc.strerror or exc)
        if self.on_publish:
            self.on_publish(status)
        log.info(
            "published version %d (%d bytes): accepted %d, rejected %d%s",
            status["version"], size, status["accepted"], sum(status["rejected"].values()),
            "".join(f", {k} {v:.3f}" for k in ("accuracy", "r2") if (v := status.get(k)) is not None),
        )

    def _wait_delivered(self, timeout: float) -> None:
        """Bounded wait until the broker acknowledged the last model and status."""
        deadline = time.monotonic() + timeout
        for info in self._last_infos:
            try:
                info.wait_for_publish(max(0.0, deadline - time.monotonic()))
            except (RuntimeError, ValueError):  # not connected: the checkpoint has it
                return


def _abspath(path: str | None) -> str | None:
    return os.path.abspath(path) if path else None


def retained_model(payload: bytes, topics: Topics, spec: ModelSpec) -> ModelMessage:
    """The broker's retained model, if it is of this coordinator's `spec` (adopt() would ignore another); ProtocolError
    otherwise. Its class count is judged before any class is built and its spec before its params are decoded: a
    ~150-byte model counting 100,000 classes was ~11 MB traced, a 5 MB int4 one of 10^7 features ~130 MB of RSS."""
    return decode_model(payload, fleet=topics.fleet, **only_spec(spec))
