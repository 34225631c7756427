"""One agent process's MQTT session, after paho-mqtt's own client life-cycle examples.

paho's network thread (loop_start) receives models and reconnects with backoff; the main
thread trains and publishes. The paho callbacks stay thin: the protocol is in `Agent`.
Training never waits on the broker: an update made while disconnected is held (only the
newest) and sent on reconnection.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass

import paho.mqtt.client as mqtt

from edge_agent.acks import AckWatch
from edge_agent.agent import NO_MODEL, NO_PROGRESS, OFFLINE, REFUSED, TRAINING, UNACKED, Agent, offline_status
from edge_agent.chunks import ModelChunks, update_packets
from protocol import chunking
from protocol.acks import decode_ack
from protocol.errors import ProtocolError
from protocol.transport import BrokerSettings, connect, make_client

log = logging.getLogger(__name__)

# skip_models_in_rounds: what unsubscribing and subscribing again cost (UNSUBSCRIBE, SUBSCRIBE, their acks,
# TCP/IP headers and ACKs; bench/results/async_advantage.json's breakdown) against each model message
# not downloaded, its payload plus its topic, MQTT and TCP/IP headers and the device's TCP ACK
PAUSE_COST_BYTES = 500
PER_MESSAGE_BYTES = 130
NO_MODEL_WARNING_S = 20.0  # no model this long after connecting: a WARNING (--no-model-warning)
NO_MODEL_WARNING_MAX_S = 600.0  # the warnings' back-off doubles up to this


@dataclass(frozen=True)
class Outgoing:
    """An update payload and what the log line about it says."""

    payload: bytes
    seq: int
    version: int
    metrics: dict


class AgentSession:
    """Runs an `Agent` against a broker until `stop` is set.

    The retained status is published on every (re)connection, when the agent's phase
    changes (first update sent, error, error cleared, budget spent, offline), as "training"
    when a round runs longer than `slow_round_after` seconds, and as a heartbeat every
    `status_interval` seconds (0 = never); not per round: the update says what a round did.

    `min_model_interval` (seconds, 0 = every version): after taking a model the session
    unsubscribes from the model topic and subscribes again once that long has passed; the
    broker then sends the newest retained model, so the versions between are never downloaded.
    Under a pace (protocol/pace.py) it does the same until the agent's next round is due: one
    model download per round, the newest, just before training on it.

    `skip_models_in_rounds`: without either, a round expected to outlast the model publishes enough
    (the last round's time against the time between the models received while listening;
    `skip_models_in_round`) runs unsubscribed, and the session subscribes again after it: the newest
    retained model comes then, and the versions published during the round (which the agent would only
    have replaced) are not downloaded.
    """

    def __init__(
        self,
        agent: Agent,
        settings: BrokerSettings,
        *,
        connect_timeout: float = 10.0,
        poll_interval: float = 1.0,
        status_interval: float = 60.0,
        max_packet_bytes: int | None = None,
        min_model_interval: float = 0.0,
        slow_round_after: float = 1.0,
        unheard_after: float = 120.0,
        no_model_warning: float = NO_MODEL_WARNING_S,
        version_status_bound: float = 5.0,
        skip_models_in_rounds: bool = False,
    ) -> None:
        self.agent = agent
        self.settings = settings
        self.connect_timeout = connect_timeout
        self.poll_interval = poll_interval
        self.status_interval = status_interval
        self.min_model_interval = min_model_interval
        self.slow_round_after = slow_round_after
        self.unheard_after = unheard_after  # seconds without a (newer) model before the status says unheard; 0: never
        self._connected_at: float | None = None  # monotonic, of the first connection
        # no model this long after the first connection: a WARNING, again after twice as long, ... (0: never)
        self.no_model_warning = no_model_warning
        self._no_model_warned = 0  # WARNINGs said so far of no model
        self._in_flight: dict[int, str] = {}  # mid -> what was published (update seq N), for an MQTT 5 refusal
        self.acks = AckWatch()  # the coordinator's acks of our updates (protocol/acks.py); guarded by _ack_lock
        self._ack_lock = threading.Lock()
        self._bad_ack_said = False
        self._foreign_said: set[str] = set()  # topics of another fleet the broker delivered (said once each)
        self._last_status = time.monotonic()  # of the last status published
        # a new base version is in the retained status within this many seconds (at most one status per bound)
        self.version_status_bound = version_status_bound
        self._status_version: int | None = None  # the base version the last published status showed
        self._models_paused = False  # unsubscribed until _models_due_at (--min-model-interval)
        self._models_due_at = 0.0  # monotonic
        self._paused_at = 0.0  # monotonic: when the session last stopped listening for models
        self.models_taken = 0  # models handed to the agent that were newer than the one held
        self.skip_models_in_rounds = skip_models_in_rounds
        self.model_gap_: float | None = None  # seconds between newer models received while listening (moving mean)
        self._model_at: float | None = None  # monotonic: the last newer model received
        self._model_bytes = 0  # its payload's size
        self._retained_next = True  # the next model is a (re)subscription's retained one: its gap says nothing
        self.round_s_: float | None = None  # the last round's duration (training and whatever pads it)
        self.rounds_unsubscribed = 0  # rounds run without listening for models (skip_models_in_rounds)
        self._round_running = False  # train_and_send is in a round (the main thread's)
        self._paused_for_round = False  # the pause is skip_models_in_rounds', not --min-model-interval's or a pace's
        self._said_training = False  # a slow round published "training": say when it ends
        self.wake = threading.Event()  # set by the network thread when a newer model arrived
        self._pending: Outgoing | None = None
        self._lock = threading.Lock()  # guards _pending against on_connect's flush, and _key_fetches
        self._key_fetches: set[str] = set()  # peers' key topics subscribed to for a waiting cohort (secure aggregation)
        self._connected_once = False  # before that, start() reports a refusal (one line)
        self._stats_resend = False  # set on (re)connection: the broker may have lost the retained statistics
        self.max_packet_bytes = max_packet_bytes  # the broker's packet limit: a larger update goes as chunks
        self.chunks = ModelChunks(agent.topics)  # a model over the limit arrives as chunks and a manifest
        topics = agent.topics
        self.client = make_client(
            settings,
            f"fedmq-agent-{topics.fleet}-{agent.agent_id}",
            persistent=True,
            will=(topics.agent_status(agent.agent_id), json.dumps(offline_status(agent.agent_id)).encode()),
        )
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish

    # --- paho callbacks (network thread) ---------------------------------------------

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            if self._connected_once:
                log.error("broker refused the connection: %s", reason_code)
            return
        # a reconnection: the broker may have lost the retained statistics and schema, so they go again. Not on the
        # first connection: connect() returns on the CONNACK, before this callback, and the main thread sends them
        # first anyway; a resend asked for here then made a second copy of each ~20 ms later (every agent's start)
        self._stats_resend = self._connected_once
        self._connected_once = True
        if self._connected_at is None:
            self._connected_at = time.monotonic()
        # QoS 0: the model is retained, so every (re)subscription brings the newest, and the
        # broker queues no stale models for an offline device (docs/architecture.md)
        if not self._models_paused:
            self._retained_next = True
            client.subscribe(self.agent.topics.model, qos=0)
        with self._ack_lock:
            self.acks.resumed(time.monotonic())
        # a coordinator's acks are retained (the newest comes at once); the tier's come live only. QoS 0: on a
        # clean session a QoS 1 delivery lost with the connection is not resent either, and an ack is a
        # hint (the highest seq taken, edge_agent/acks.py): a lost one is covered by the next or by the
        # retained one on resubscribing; QoS 1 cost a PUBACK and its segment per ack
        client.subscribe(self.agent.topics.ack(self.agent.agent_id), qos=0)
        if self.agent.secure is not None:  # secure aggregation: the cohort, the unmask requests, its own inbox
            with self._lock:
                self._key_fetches = set()  # a clean session: the broker holds none of them now
            client.subscribe([(t, 1) for t in self.agent.secure.subscriptions])
            self._fetch_missing_keys()
            self._publish_secagg([self.agent.secure.announcement()])
        client.subscribe(self.agent.topics.all_model_chunks, qos=0)  # a chunked model's (retained) chunks
        self.wake.set()
        self.publish_status()
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is not None:
            self._publish_update(pending, held=True)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure and self._connected_once:
            log.warning("lost the broker (%s); reconnecting with backoff", reason_code)

    def _on_message(self, client, userdata, msg) -> None:
        if self.agent.secure is not None and self.agent.secure.owns(msg.topic):
            replies = []
            try:
                replies = self.agent.secure.on_message(msg.topic, msg.payload)
                self._publish_secagg(replies)
                self._fetch_missing_keys()
            except Exception:  # an exception here would end paho's network thread
                log.exception("failed to take a secure-aggregation message")
            kind = self.agent.topics.secagg_of(msg.topic)
            if kind is None or kind[0] != "key" or replies:  # a peer's key changes nothing, unless a cohort waited for it
                self.wake.set()  # a delta spent in a cohort: train a fresh one
            return
        if msg.topic == self.agent.topics.ack(self.agent.agent_id):
            self._on_ack(msg.payload)
            return
        if self._models_paused:  # sent before the broker took our unsubscribe: the newest comes on resubscribing
            return
        if not self._ours(msg.topic):
            self._foreign(msg.topic)
            return
        try:
            payload = self.chunks.on_message(msg.topic, msg.payload)  # a whole model, or None while chunks are missing
            newer = payload is not None and self.agent.on_model(payload)
        except Exception:  # an exception here would end paho's network thread
            log.exception("failed to take a model message")
            return
        if newer:
            self._model_arrived(len(payload))
            self.models_taken += 1
            if self.min_model_interval > 0 or self.agent.pace is not None:
                self._pause_models()
            elif self._trains_on_arrival() and self._skip_models_now():
                self._pause_models(for_round=True)  # at once: by the main thread's turn more models may come
            self.wake.set()

    def _on_ack(self, payload: bytes) -> None:
        """The coordinator acknowledged our updates up to a seq (network thread): an UNACKED unheard is over."""
        try:
            seq = decode_ack(payload)
        except ProtocolError as exc:
            if not self._bad_ack_said:
                self._bad_ack_said = True
                log.warning("ignoring an unusable ack on %s: %s (said once)", self.agent.topics.ack(self.agent.agent_id),
                            exc)
            return
        with self._ack_lock:
            newer = self.acks.acked(seq, time.monotonic())
        if newer and self.agent.unheard_ is not None and self.agent.unheard_[0] == UNACKED:
            self.agent.heard(UNACKED)
            log.info("the coordinator acknowledged update seq %d: heard again", seq)
            self.publish_status()

    def _ours(self, topic: str) -> bool:
        """A topic this session subscribes to (the fleet's model and its chunks)."""
        topics = self.agent.topics
        return topic == topics.model or mqtt.topic_matches_sub(topics.all_model_chunks, topic)

    def _foreign(self, topic: str) -> None:
        """The broker delivers a topic we never asked for: a session of this broker account kept the
        subscription of an earlier run (another --fleet; the broker names sessions after the user).
        Said once per topic, and unsubscribed (network thread)."""
        if topic not in self._foreign_said:
            self._foreign_said.add(topic)
            log.warning("the broker delivers %s, but this agent runs fleet %r (%s): its session kept an earlier "
                        "run's subscription (same broker account, another --fleet); unsubscribing from it",
                        topic, self.agent.topics.fleet, self.agent.topics.model)
            self.client.unsubscribe(topic)

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        """MQTT 5: the broker's PUBACK says whether it took a message (3.1.1 always says yes)."""
        what = self._in_flight.pop(mid, None)
        if what is None:  # a status, statistics, schema or secure-aggregation message
            return
        if not reason_code.is_failure:
            if self.agent.unheard_ is not None and self.agent.unheard_[0] == REFUSED:
                self.agent.heard(REFUSED)
                log.info("the broker took %s: the earlier refusal is over", what)
                self.publish_status()
            return
        user = self.settings.username or "(anonymous)"
        reason = (f"the broker refused {what} on {self.agent.topics.update(self.agent.agent_id)}: {reason_code} "
                  f"(its ACL does not let user {user} publish there: check --fleet, and that --id is the account's username)")
        if self.agent.set_unheard(REFUSED, reason):
            log.error("%s; nothing this agent sends reaches the coordinator", reason)
            self.publish_status()

    def _warn_no_model(self) -> None:
        """No model yet, `no_model_warning` s after connecting (then 2x, 4x, ... up to NO_MODEL_WARNING_MAX_S apart):
        one WARNING line naming the topic waited on and the likely causes, long before --unheard-after (main thread)."""
        if not self.no_model_warning or self._connected_at is None or self.agent.model_ is not None:
            return
        waited = time.monotonic() - self._connected_at
        due = sum(min(self.no_model_warning * 2 ** i, NO_MODEL_WARNING_MAX_S) for i in range(self._no_model_warned + 1))
        if waited < due:
            return
        self._no_model_warned += 1
        topics = self.agent.topics
        log.warning("still waiting for a model on %s after %.0f s: is --fleet %r the coordinator's fleet name, is a "
                    "coordinator running on this broker, does its ACL let user %s read it? (next warning in %g s)",
                    topics.model, waited, topics.fleet, self.settings.username or "(anonymous)",
                    min(self.no_model_warning * 2 ** self._no_model_warned, NO_MODEL_WARNING_MAX_S))

    def _check_heard(self) -> None:
        """3.1.1 cannot say a publish was refused: no model within the bound says it, and then no ack of an
        update (a coordinator that serves acks), or no newer model (one that does not) (main thread)."""
        if not self.unheard_after or self._connected_at is None or self.agent.unheard_ is not None:
            return
        now, agent, topics = time.monotonic(), self.agent, self.agent.topics
        unacked = None
        if agent.model_ is not None and agent.model_.acks and self.client.is_connected():
            with self._ack_lock:
                unacked = self.acks.reason(now, self.unheard_after, topics.ack(agent.agent_id))
        if agent.model_ is None and now - self._connected_at >= self.unheard_after:
            cause, reason = NO_MODEL, (
                f"no model on {topics.model} within {self.unheard_after:g} s: no coordinator serves fleet "
                f"{topics.fleet!r} on this broker, or its ACL does not let user {self.settings.username or '(anonymous)'} "
                f"read it (check --fleet)")
        elif unacked is not None:
            cause, reason = UNACKED, unacked
        elif agent.updates_sent_ and not agent.model_.acks and agent.model_.version <= agent.base_version_ \
                and now - max(agent.last_train_at_, agent.next_round_at_) >= self.unheard_after:
            cause, reason = NO_PROGRESS, (
                f"no model newer than version {agent.base_version_} within {self.unheard_after:g} s of update seq "
                f"{agent.seq_}: the coordinator may not receive this agent's updates (check --fleet, and that --id "
                f"is the broker account's username)")
        else:
            return
        agent.set_unheard(cause, reason)
        log.warning("%s", reason)
        self.publish_status()

    def _model_arrived(self, size: int) -> None:
        """A newer model came (network thread): the time since the one before, unless this one is a
        (re)subscription's retained model, goes into the moving mean of the gap between publishes."""
        now = time.monotonic()
        if self._model_at is not None and not self._retained_next:
            gap = now - self._model_at
            self.model_gap_ = gap if self.model_gap_ is None else 0.7 * self.model_gap_ + 0.3 * gap
        self._model_at, self._model_bytes, self._retained_next = now, size, False

    def _skip_models_now(self) -> bool:
        """Run the round about to start unsubscribed: it is expected to download more models than
        unsubscribing and subscribing again costs (`skip_models_in_round`)."""
        if not self.skip_models_in_rounds or self.min_model_interval > 0 or self.agent.pace is not None \
                or self.agent.secure is not None or self._models_paused or not self.client.is_connected() \
                or not self.model_gap_ or self.round_s_ is None:
            return False
        return skip_models_in_round(self.round_s_, self.model_gap_, self._model_bytes)

    def _trains_on_arrival(self) -> bool:
        """A newer model starts the next round as soon as the main thread wakes: no round is running and
        rounds wait on models only (no --min-new-samples, no --train-every)."""
        return not self._round_running and not self.agent.min_new_samples and self.agent.train_every is None

    def _pause_models(self, for_round: bool = False) -> None:
        """Stop listening for models until --min-model-interval has passed (network thread), or for the
        next round (`for_round`: skip_models_in_rounds): the model topic and a chunked model's chunks,
        which would otherwise keep coming."""
        self._paused_for_round = for_round
        self._models_paused = True
        self._paused_at = time.monotonic()
        self._models_due_at = self._paused_at + self.min_model_interval
        self.client.unsubscribe([self.agent.topics.model, self.agent.topics.all_model_chunks])

    def _models_resume_at(self) -> float:
        """When to listen for models again: --min-model-interval after the last one, and under a pace not
        before the agent's next round."""
        return max(self._models_due_at, self.agent.next_round_at_ if self.agent.pace is not None else 0.0)

    def _round_wants_newest(self) -> bool:
        """Under a pace, the round is due and the held model came before it (the session stopped listening
        before the round): listen again first, so the round trains on the newest model, not the held one."""
        return self._models_paused and self.agent.pace is not None \
            and self._paused_at < self.agent.next_round_at_ <= time.monotonic()

    def _resume_models(self) -> None:
        """Subscribe again, as on connecting: the broker sends the newest retained model (or its
        retained chunks and manifest; a device resuming mid-transfer assembles as one joining) (main thread)."""
        self._models_paused = False
        self._retained_next = True
        if self.client.is_connected():
            self.client.subscribe([(self.agent.topics.model, 0), (self.agent.topics.all_model_chunks, 0)])

    # --- publishing --------------------------------------------------------------------

    def publish_status(self, state: str | None = None) -> mqtt.MQTTMessageInfo | None:
        """Publish the agent's retained JSON status (QoS 1); None while disconnected
        (paho would queue it, but on_connect publishes a fresh one anyway)."""
        if not self.client.is_connected():
            return None
        self._last_status = time.monotonic()
        self._status_version = self.agent.base_version_
        doc = json.dumps(self.agent.status(state), separators=(",", ":"))
        return self.client.publish(self.agent.topics.agent_status(self.agent.agent_id), doc, qos=1, retain=True)

    def send(self, out: Outgoing) -> None:
        """Publish an update now, or hold it (replacing an older held one) until reconnection."""
        with self._lock:
            # checked under the lock: on_connect flushes under it right after paho marks us connected
            if not self.client.is_connected():
                if self._pending is not None:
                    log.info("offline: held update seq %d superseded by seq %d", self._pending.seq, out.seq)
                else:
                    log.info("offline: holding update seq %d until the broker is back", out.seq)
                self._pending = out
                return
        self._publish_update(out)

    def _publish_update(self, out: Outgoing, held: bool = False) -> None:
        for topic, packet in update_packets(self.agent.topics, self.agent.agent_id, out.payload, self.max_packet_bytes):
            info = self.client.publish(topic, packet, qos=1)  # chunks on update/<id>/chunk when over the packet limit
            if len(self._in_flight) > 1000:  # acks that raced ahead of this line: never a leak
                self._in_flight.clear()
            self._in_flight[info.mid] = f"update seq {out.seq}"
        with self._ack_lock:
            self.acks.sent(out.seq, time.monotonic())
        log.info("sent %supdate: version %d, seq %d, %d bytes, %s", "held " if held else "",
                 out.version, out.seq, len(out.payload), format_metrics(out.metrics))

    def _fetch_missing_keys(self) -> None:
        """Subscribe to the key topic of each peer a waiting cohort lacks, and drop those no longer needed: a new
        subscription brings a retained announcement that a broker node lost to a race (edge_agent/secagg.py)."""
        wanted = set(self.agent.secure.missing_key_topics())
        with self._lock:
            new, gone = sorted(wanted - self._key_fetches), sorted(self._key_fetches - wanted)
            self._key_fetches = wanted
        if new:
            self.client.subscribe([(t, 1) for t in new])
        if gone:
            self.client.unsubscribe(gone)

    def _publish_secagg(self, messages) -> None:
        """Publish secure-aggregation messages (edge_agent/secagg.py) at QoS 1."""
        for message in messages:
            if message is not None:
                topic, payload, retain = message
                self.client.publish(topic, payload, qos=1, retain=retain)

    def send_schema(self) -> bool:
        """Announce the window's column names and labels (retained, QoS 1) when new or changed; True if sent."""
        if not self.client.is_connected():
            return False
        payload = self.agent.schema_payload()
        if payload is None:
            return False
        self.client.publish(self.agent.topics.schema(self.agent.agent_id), payload, qos=1, retain=True)
        log.info("announced %d feature columns (%d bytes)", len(self.agent.schema_sent_.columns), len(payload))
        return True

    def send_statistics(self) -> bool:
        """Publish the window's feature statistics (retained, QoS 1) when they are due; True if sent."""
        if self._stats_resend:
            self._stats_resend = False
            self.agent.statistics.resend()
            self.agent.schema_sent_ = None  # the schema too: announced again
        payload = self.agent.statistics_payload()
        if payload is None:
            return False
        if not self.client.is_connected():
            self.agent.statistics.resend()  # try again once connected
            return False
        topic = self.agent.topics.stats(self.agent.agent_id)
        if not chunking.fits(topic, len(payload), self.max_packet_bytes):  # statistics are not chunked (yet)
            log.warning("feature statistics (%d bytes) exceed --max-packet-bytes %d: not sent", len(payload),
                        self.max_packet_bytes)
            return False
        self.client.publish(topic, payload, qos=1, retain=True)
        log.info("sent feature statistics of %d rows (%d bytes)", len(self.agent.source), len(payload))
        return True

    # --- main thread ------------------------------------------------------------------

    def start(self) -> None:
        """Connect and start paho's network thread; BrokerError (one line) if the broker
        cannot be reached within `connect_timeout`. Reconnection after that is paho's."""
        connect(self.client, self.settings, timeout=self.connect_timeout)
        log.info("agent %s connected to %s; %d rows, codec %s; waiting for the global model",
                 self.agent.agent_id, self.settings.url, len(self.agent.source), self.agent.feedback.spec)

    def run(self, stop: threading.Event) -> None:
        """Start, then train whenever the agent is due until `stop` is set; then close."""
        self.start()
        try:
            while not stop.is_set():
                self.send_statistics()
                self.send_schema()
                wait = self.poll_interval
                if self._models_paused:
                    wait = max(0.0, min(wait, self._models_resume_at() - time.monotonic()))
                self.wake.wait(wait)
                self.wake.clear()
                if stop.is_set():
                    break
                taken = self.models_taken  # a model taken from here on waits for the next pass (its wake is set)
                # a chunk was dropped (not while paused: resuming fetches the retained chunks anyway):
                if self.chunks.stalled() and self.client.is_connected() and not self._models_paused:
                    self.client.subscribe(self.agent.topics.all_model_chunks, qos=0)  # the broker resends the retained ones
                if self._round_wants_newest():
                    self._resume_models()  # the round waits for the newest model this brings (the wake), not the held one
                elif self.agent.due():
                    if self._skip_models_now():  # listening again right after the round (below)
                        self._pause_models(for_round=True)
                    self.rounds_unsubscribed += self._models_paused and self._paused_for_round
                    self.train_and_send()
                # not before the round on a model that came since the wake: it would only bring that model again
                if self._models_paused and time.monotonic() >= self._models_resume_at() and self.models_taken == taken:
                    self._resume_models()
                self._warn_no_model()
                self._check_heard()
                if self.agent.secure is not None:
                    self.agent.secure.tick()  # a cohort that waited for peers' keys in vain is refused
                    self._fetch_missing_keys()
                if self.status_interval and time.monotonic() - self._last_status >= self.status_interval:
                    self.publish_status()
                elif self._version_status_due():
                    self.publish_status()
        finally:
            self.close()

    def train_and_send(self) -> None:
        """One round: train on the newest model, send the update; the status only if the phase changed."""
        slow = threading.Timer(self.slow_round_after, self._say_training)
        slow.daemon = True
        slow.start()
        started = time.monotonic()
        self._round_running = True
        try:
            payload = self.agent.make_update()
        finally:
            self._round_running = False
            slow.cancel()
            self.round_s_ = time.monotonic() - started
        if payload is not None:
            self.send(Outgoing(payload, self.agent.seq_, self.agent.base_version_, self.agent.last_metrics_))
        elif self.agent.secure is not None and self.client.is_connected():  # a delta held: announce its fresh key
            self._publish_secagg([self.agent.secure.announcement()])
        if self.agent.status_changed() or self._said_training or self._version_status_due():
            self._said_training = False
            self.publish_status()

    def _version_status_due(self) -> bool:
        """The base version moved since the last status, and the last one is `version_status_bound` old:
        so the retained status is at most that far behind the agent's newest update (and no more than
        one status per bound goes out, however fast the fleet's versions move)."""
        return self.agent.base_version_ != self._status_version \
            and time.monotonic() - self._last_status >= self.version_status_bound

    def _say_training(self) -> None:
        """A round is taking long: say so (timer thread; paho's publish is thread-safe)."""
        if self.agent.training_:
            self._said_training = True
            self.publish_status(TRAINING)

    @property
    def pending(self) -> Outgoing | None:
        """The update held while disconnected, if any."""
        with self._lock:
            return self._pending

    def close(self) -> None:
        """Say offline (retained; bounded wait), disconnect cleanly, stop the network thread."""
        with self._lock:
            if self._pending is not None:
                log.warning("stopping with update seq %d unsent (the broker was unreachable)", self._pending.seq)
        info = self.publish_status(OFFLINE)
        if info is not None and info.rc == mqtt.MQTT_ERR_SUCCESS:
            try:
                info.wait_for_publish(timeout=5)
            except RuntimeError:  # the connection dropped meanwhile; the last will says offline
                pass
        self.client.disconnect()
        self.client.loop_stop()


def skip_models_in_round(round_s: float, model_gap: float, model_bytes: int) -> bool:
    """Whether a round of `round_s` seconds, with a model published every `model_gap` seconds, costs fewer
    device bytes unsubscribed (subscribing again after it) than listening.

    Listening, the round downloads the models published during it, of which it keeps the newest: it
    wastes E[max(N - 1, 0)] = L - 1 + P(N = 0) downloads for N publishes in the round, L = round_s /
    model_gap on average. Unsubscribed, it pays the unsubscribe and resubscribe (`PAUSE_COST_BYTES`), and
    the retained model it then gets is the one it already holds when nothing was published: P(N = 0)
    wasted downloads. P(N = 0) is in both, so unsubscribing wins once (L - 1) x (model + headers) outweighs
    the pause, whatever the publishes' spread (regular or Poisson): for a 3.5 KB model at L ~ 1.15, for a
    400 B one at L ~ 2."""
    return (round_s / model_gap - 1) * (model_bytes + PER_MESSAGE_BYTES) > PAUSE_COST_BYTES


def format_metrics(metrics: dict) -> str:
    """The federated evaluation for a log line: `eval_loss 0.412, eval_accuracy 0.870`."""
    shown = [f"{k} {v:.4g}" for k, v in sorted(metrics.items()) if k.startswith("eval_")]
    return ", ".join(shown) or "no eval metrics"
