"""The agent's protocol state machine: no threads, no sockets.

`AgentSession` (one process, one MQTT client) and the simulator (thousands of agents on
one event loop) both drive it: hand it model payloads, ask it for update payloads.
"""

from __future__ import annotations

import logging
import random
import time

import numpy as np

from edge_agent.data import DataSource
from edge_agent.error_feedback import ErrorFeedback
from edge_agent.privacy_state import PrivacyStore
from edge_agent.statistics import LocalStatistics, prepare_features
from edge_agent.trainer import LocalTrainer
# the values of the status's "state" field live in protocol/agent_states.py (the monitor reads them too)
from protocol.agent_states import BUDGET_SPENT, ERROR, IDLE, OFFLINE, ONLINE, STATES, TRAINING, UNHEARD  # noqa: F401
from protocol.errors import ProtocolError
from protocol.messages import ModelMessage, UpdateMessage, decode_model, encode_update
from protocol.model_spec import ModelSpec
from protocol.pace import DEFAULT_MAX_INTERVAL, Pace, bounded
from protocol.privacy import GaussianMechanism, secure_rng
from protocol.stats_privacy import StatsMechanism
from protocol.schema import Schema, column_order, encode_schema, mismatch, of_data
from protocol.sequence import first_seq
from protocol.tabular import DataError
from protocol.topics import Topics, check_name

log = logging.getLogger(__name__)

# causes of UNHEARD (Agent.set_unheard)
REFUSED, NO_MODEL, NO_PROGRESS, UNACKED = "refused", "no_model", "no_progress", "unacked"


class Agent:
    """One device: newest global model in, encoded delta out.

    Sequence numbers start at the agent's start time in microseconds and add one per update
    (protocol/sequence.py). The coordinator deduplicates QoS 1 redeliveries by (agent, seq)
    and keeps only the highest seq per agent, refusing anything at or below it as a replay;
    starting from the clock keeps seq increasing across restarts without a state file on
    the device, and a hole of a few within one run shows updates that never arrived.

    Liveness: an update can be lost where exactly-once cannot reach (a broker that loses
    its state). When no newer model arrived within `resend_after` seconds (times a jitter
    in [1, 1.5), so a fleet does not resend in step) of the last update, or the coordinator
    restarted (the same version republished with another `started_at`), the agent trains
    again on the model it holds and sends a fresh update.

    Pace (protocol/pace.py): a model message may ask how often to report. The agent then
    trains no sooner than a wait drawn around that interval after its last round, whatever
    `train_every` says (and resends no sooner either); the interval is capped at `max_pace`
    seconds, so a hostile model message cannot silence the device for longer.
    """

    def __init__(
        self,
        agent_id: str,
        topics: Topics,
        source: DataSource,
        trainer: LocalTrainer,
        codec: str = "int8",
        *,
        min_new_samples: int = 0,
        train_every: float | None = None,
        seed: int | None = None,
        resend_after: float | None = 60.0,
        dp: GaussianMechanism | None = None,
        dp_delta: float = 1e-5,
        dp_epsilon_budget: float | None = None,
        dp_neighbours: str = "add-remove",
        stats_noise: StatsMechanism | None = None,
        privacy_store: PrivacyStore | None = None,
        private: bool = False,
        max_pace: float = DEFAULT_MAX_INTERVAL,
        share_statistics: bool = True,
    ) -> None:
        self.agent_id = check_name("agent id", agent_id)
        self.topics = topics
        self.source = source
        self.trainer = trainer
        self.feedback = ErrorFeedback(codec, np.random.default_rng(seed))
        self.min_new_samples = min_new_samples
        self.train_every = train_every
        self.model_: ModelMessage | None = None  # the newest global model received
        self.trained_version_ = -1  # the model version last trained on (sent or not)
        self.base_version_: int | None = None  # base version of the last update made
        self.last_train_at_ = 0.0  # monotonic
        self.last_update_time_: float | None = None  # wall clock of the last update made
        self.new_samples_ = 0
        self.rows_polled_ = 0  # rows every poll brought, in all (the window changes only with them)
        self._schema_rows = -1  # rows_polled_ when the schema was last looked at
        self.seq_ = first_seq()
        self.resend_after = resend_after
        self.resend_jitter = random.Random(seed).uniform(1.0, 1.5)
        self.resend_now_ = False  # the coordinator restarted: send afresh at once
        self.max_pace = max_pace  # the longest report interval a model message can ask of this device
        self.pace_rng = random.Random(f"{agent_id}:{seed}") if seed is not None else random.Random()
        self.next_round_at_ = 0.0  # monotonic: under a pace, no round before this
        self.error_: tuple[int, str] | None = None  # (model version, why it cannot be trained on)
        self.unheard_: tuple[str, str] | None = None  # (cause, why nothing is heard): see set_unheard
        self.unusable_models_ = 0  # model messages it could not use (said once per reason, counted in the status)
        self.unusable_said_: set[str] = set()
        self.updates_sent_ = 0
        self.last_metrics_: dict[str, float] = {}
        self.training_ = False
        self.published_phase_: str | None = None  # the phase the last published status showed
        self.since_ = time.time()  # wall clock of the last change of phase
        # feature statistics for the fleet (edge_agent/statistics.py), noised with --stats-noise (protocol/stats_privacy.py)
        self.statistics = LocalStatistics(noise=stats_noise, delta=dp_delta)
        self.share_statistics = share_statistics  # fedmq-agent --no-feature-stats: none leave the device
        self.missing_ = 0  # missing cells imputed in the last round
        self.schema_sent_: Schema | None = None  # the column names and labels last announced (protocol/schema.py)
        # local DP (protocol/privacy.py): clip + noise the float delta before error feedback and the codec
        self.dp = dp
        self.dp_rng = secure_rng()  # never the training seed: reproducible noise is removable noise
        self.dp_budget = None
        self.secure = None  # secure aggregation (edge_agent/secagg.py): deltas wait, masked, for a cohort
        if dp is not None:
            from protocol.accounting import Budget  # needs the dp extra

            self.dp_budget = Budget(dp.noise_multiplier, dp_delta, dp_epsilon_budget, neighbours=dp_neighbours)
        elif dp_epsilon_budget is not None:
            raise ValueError("--dp-epsilon-budget needs local DP: give --dp-clip and --dp-noise")
        # the privacy ledger across restarts (edge_agent/privacy_state.py): loaded by the CLI, saved before each release
        self.privacy_store = privacy_store
        self.private_ = private  # --private: as private as local DP without noising the updates (central-DP fleets)
        if privacy_store is not None and privacy_store.state is not None:
            saved = privacy_store.state
            if self.dp_budget is not None:
                self.dp_budget.contributions = saved.updates
            if stats_noise is not None:
                self.statistics.releases_ = saved.stats_releases
                self.statistics.sent_rows_ = saved.stats_rows
                self.statistics.last_payload_ = saved.stats_payload
                # a new process sends them once more, the same bytes: the broker may have lost the retained copy
                # while it was down (the first connection no longer asks for a resend, c42354f)
                self.statistics.resend()

    @property
    def private(self) -> bool:
        """Local DP, secure aggregation or --private: nothing exact about the data may leave (issue 19.2) --
        no un-noised statistics, no row, missing-cell or skipped-label count in the status, no label set in
        the schema, sample count 1 and no metrics in an update."""
        return self.dp is not None or self.secure is not None or self.private_

    @property
    def pace(self) -> Pace | None:
        """The held model's pace within this device's bounds (None: not steered)."""
        return None if self.model_ is None else bounded(self.model_.pace, self.max_pace)

    @property
    def budget_spent(self) -> bool:
        """Local DP with a budget, and one more update would exceed it."""
        return self.dp_budget is not None and not self.dp_budget.can_contribute()

    def on_model(self, payload: bytes) -> bool:
        """Take a model payload; True when it is newer than the one held (training is due).

        Garbage, another fleet's model and versions at or below the held one are logged
        and ignored: nothing on the model topic can crash the agent.
        """
        try:
            limits = getattr(self.trainer, "limits", None)  # judged before the params are decoded and held
            model = decode_model(payload, fleet=self.topics.fleet, check_spec=limits.check if limits else None,
                                 check_classes=limits.check_classes if limits else None)
        except ProtocolError as exc:
            self.unusable_models_ += 1
            # once per reason code, then only the status counter: a set of every distinct message said grew without
            # bound on a broker's models of format 1000, 1001, ... (~166 B each, tests/test_hostile_wire.py)
            if exc.reason not in self.unusable_said_:
                self.unusable_said_.add(exc.reason)
                log.warning("ignoring an unusable model message: %s (said once; counted as unusable_models in the "
                            "status)", exc)
            return False
        held = self.model_
        if held is not None and model.version == held.version and model.started_at != held.started_at \
                and held.started_at is not None and self.trained_version_ >= held.version:
            log.info("the coordinator restarted at version %d; sending a fresh update", model.version)
            self.model_, self.resend_now_ = model, True
            return True
        if held is not None and model.version <= held.version:
            log.debug("ignoring model version %d: holding version %d", model.version, held.version)
            return False
        if held is not None and model.spec != held.spec:
            log.info("the fleet's model spec changed at version %d; starting error feedback afresh", model.version)
            self.feedback.reset()
        self.model_ = model
        if held is None and self.trained_version_ < 0 and (pace := self.pace) is not None:
            self.next_round_at_ = time.monotonic() + pace.first_wait(self.pace_rng)  # a cold start: spread out
        if self.unheard_ is not None and self.unheard_[0] in (NO_MODEL, NO_PROGRESS):
            self.unheard_ = None  # a model came, or a newer one: the coordinator is there and hears the fleet
        log.debug("global model version %d received", model.version)
        return True

    def set_unheard(self, cause: str, reason: str) -> bool:
        """Say (state unheard, once per cause) that nothing this agent sends is heard; True if new.

        Causes: REFUSED (an MQTT 5 broker answered an update with a failure reason code, e.g. not
        authorized; cleared by an update it takes), NO_MODEL (connected, no model within the
        bound) and NO_PROGRESS (no model newer than its last update's base within the bound; the
        coordinator may never receive its updates); those two clear when a newer model comes.
        UNACKED (a coordinator that serves acks, protocol/acks.py, acknowledged no update sent
        within the bound) replaces NO_PROGRESS under such a coordinator and clears with an ack.
        """
        new = self.unheard_ is None or self.unheard_[0] != cause
        self.unheard_ = (cause, reason)
        return new

    def heard(self, cause: str) -> None:
        """The broker took an update (REFUSED no longer holds), or the coordinator acknowledged one (UNACKED)."""
        if self.unheard_ is not None and self.unheard_[0] == cause:
            self.unheard_ = None

    def due(self, now: float | None = None) -> bool:
        """Train now? A newer model than the last trained one, and enough new samples;
        or, with `train_every`, that many seconds since the last round. Reads new data."""
        if self.model_ is None or self.budget_spent:
            return False
        now = time.monotonic() if now is None else now
        self._poll()
        if self.error_ is not None and self.error_[0] == self.model_.version:
            return False  # said once for this version; waits for a model it can train on
        if self.secure is not None:  # a fresh delta whenever the held one went into a cohort or is stale
            return self.secure.wants_delta(self.model_.version)
        if self.pace is not None and now < self.next_round_at_:
            return False  # the coordinator's pace: not yet, whatever else is due
        if self.train_every is not None and now - self.last_train_at_ >= self.train_every:
            return self.new_samples_ > 0 or self.model_.version > self.trained_version_
        if self.model_.version > self.trained_version_:
            return self.new_samples_ >= self.min_new_samples or self.trained_version_ < 0
        return self._resend_due(now)

    def _poll(self) -> None:
        try:
            new = self.source.poll()
            self.new_samples_ += new
            self.rows_polled_ += new
        except DataError as exc:  # a bad appended row must not stop the device
            log.error("skipped unreadable new data: %s", exc)

    def statistics_payload(self, poll: bool = True) -> bytes | None:
        """The window's feature statistics for `Topics.stats` when due (first, or data grew); else None.

        A private agent (see `private`) sends only noised (and accounted) statistics (--stats-noise), else none;
        with --no-feature-stats none at all.
        """
        if not self.share_statistics or (self.private and self.statistics.noise is None):
            return None
        if poll:
            self._poll()
        X, _ = self.source.data()
        releases = self.statistics.releases_
        try:
            payload = self.statistics.payload_if_due(X, self.source.columns)
        except ValueError as exc:  # --stats-clip declares ranges for another feature count
            log.error("feature statistics not sent: %s", exc)
            self.statistics.sent_rows_ = len(X)  # not again until the window grows
            return None
        if self.statistics.releases_ != releases and not self._persist():  # a fresh noised release: on disk first
            return None
        return payload

    def _persist(self) -> bool:
        """Save the privacy ledger (fsync'd) before a release; False (logged) when the disk refuses."""
        store = self.privacy_store
        if store is None or store.state is None:
            return True
        state = store.state
        state.updates = self.dp_budget.contributions if self.dp_budget is not None else 0
        state.stats_releases = self.statistics.releases_
        state.stats_rows = self.statistics.sent_rows_
        state.stats_payload = self.statistics.last_payload_
        try:
            store.save()
        except OSError as exc:
            log.error("cannot save the privacy state file %s (%s): nothing released", store.path, exc)
            return False
        return True

    def schema_payload(self) -> bytes | None:
        """The window's column names and label set for `Topics.schema`, when new or changed; else None.

        Private (local DP, secure aggregation): the column names only; the labels come from the
        coordinator's --classes, since the label set a device holds is data about it."""
        if self.schema_sent_ is not None and self._schema_rows == self.rows_polled_:
            return None  # no new rows since it was last looked at: the same window (the session calls this every wake)
        columns = self.source.columns
        if columns is None or len(self.source) == 0:
            return None
        self._schema_rows = self.rows_polled_
        schema = Schema(tuple(columns)) if self.private else of_data(columns, self.source.data()[1])
        if schema == self.schema_sent_:
            return None
        self.schema_sent_ = schema
        return encode_schema(schema)

    def _fleet_order(self, X: np.ndarray, y: np.ndarray, spec: ModelSpec) -> np.ndarray:
        """The window's columns in the fleet's order, by name; ValueError (why) when they are not the fleet's."""
        columns = self.source.columns
        if columns is None:
            return X
        reason = mismatch(Schema(tuple(columns)), spec)
        if reason is not None:
            raise ValueError(reason)
        order = column_order(columns, spec)
        return X if order is None else X[:, order]

    def _resend_due(self, now: float) -> bool:
        """The last update may be lost: the coordinator restarted, or no newer model came in time."""
        if self.updates_sent_ == 0:
            return False
        if self.resend_now_:
            self.resend_now_ = False
            return True
        if self.resend_after is not None and now - self.last_train_at_ >= self.resend_after * self.resend_jitter:
            log.info("no newer model than version %d within %.0f s of update seq %d; sending a fresh update",
                     self.model_.version, now - self.last_train_at_, self.seq_)
            return True
        return False

    def make_update(self) -> bytes | None:
        """Train on the newest model and return the encoded update (None if nothing to send)."""
        model = self.model_
        if model is None:
            return None
        if self.budget_spent:
            log.info("privacy budget spent (epsilon %.3f of %g at delta %g): sending no more updates",
                     self.dp_budget.epsilon, self.dp_budget.epsilon_budget, self.dp_budget.delta)
            return None
        X, y = self.source.data()
        if len(y) == 0:
            return None
        self.training_ = True
        try:
            X = self._fleet_order(X, y, model.spec)  # never trained on columns that are not the fleet's
            X, self.missing_ = prepare_features(X, model.scaling)
            result = self.trainer.train(model, X, y)
            encoded = self.feedback.encode(self._privatize(result.delta)) if result is not None and self.secure is None else None
        except Exception as exc:  # e.g. the fleet's model expects other features: said once per version
            reason = " ".join(str(exc).split()) or type(exc).__name__
            log.error("cannot train on the model at version %d: %s; waiting for another model", model.version, reason)
            self.error_ = (model.version, reason)
            result = encoded = None
        finally:
            self.training_ = False
        self.trained_version_ = model.version
        self.last_train_at_ = time.monotonic()
        pace = self.pace
        self.next_round_at_ = self.last_train_at_ + (pace.wait(self.pace_rng) if pace is not None else 0.0)
        self.new_samples_ = 0
        if result is None:
            return None
        self.error_ = None
        if self.secure is not None:  # never sent in the clear: held for the next cohort (the session announces it)
            self.base_version_, self.last_metrics_ = model.version, result.metrics
            self.secure.hold(result.delta, model.version)
            return None
        if self.dp_budget is not None:
            self.dp_budget.record()  # the noised update exists now: it is spent whether or not it arrives
            if not self._persist():  # on disk before it leaves, or it does not leave
                return None
        self.seq_ += 1
        self.updates_sent_ += 1
        self.base_version_ = model.version
        self.last_update_time_ = time.time()
        self.last_metrics_ = result.metrics
        return encode_update(
            UpdateMessage(
                agent_id=self.agent_id,
                seq=self.seq_,
                base_version=model.version,
                # under local DP nothing un-noised about the data travels: no sample count, no metrics
                n_samples=1 if self.private else result.n_samples,
                delta=encoded,
                # the round's metrics travel here, not in the status: eval_* (and train_* if the trainer
                # was asked for them), float32 on the wire
                metrics={} if self.private else dict(result.metrics),
            )
        )

    def _privatize(self, delta: np.ndarray) -> np.ndarray:
        """Local DP: clip to C and add N(0, (sigma C)^2) on the float delta, before error feedback.

        Error feedback then only ever sees the privatized delta, so its residual (what top-k
        or quantization dropped) is post-processing of noised values: no noise-free residue
        passes the clip (docs/security.md).
        """
        if self.dp is None:
            return delta
        private, clipped = self.dp.privatize(delta, self.dp_rng)
        if clipped:
            log.debug("update clipped to L2 norm %g before noise", self.dp.clip_norm)
        return private

    @property
    def state(self) -> str:
        """online, training, idle, error, unheard or budget_spent (see the constants above); offline is the session's to say."""
        if self.training_:
            return TRAINING
        if self.budget_spent:
            return BUDGET_SPENT
        if self.error_ is not None and self.model_ is not None and self.error_[0] == self.model_.version:
            return ERROR
        if self.unheard_ is not None:
            return UNHEARD
        if self.model_ is not None and self.trained_version_ >= self.model_.version:
            return IDLE
        return ONLINE

    def phase(self, state: str | None = None) -> str:
        """The state without the round cycle: once an update was sent, online, training and idle
        are one phase ("working"); error, unheard, budget_spent and offline are phases of their own."""
        state = state or self.state
        return "working" if state in (ONLINE, TRAINING, IDLE) and self.updates_sent_ else state

    def status_changed(self) -> bool:
        """True when the phase differs from the one the last published status showed (publish it)."""
        return self.phase() != self.published_phase_

    def status(self, state: str | None = None) -> dict:
        """The retained JSON status for `agent/<id>/status` (`state` overrides the agent's own).

        It says what the agent is doing and since when (`since`: the last change of phase,
        `time`: when this was published); per-round figures (base version, seq, metrics)
        travel in the update itself, so the status is published on changes and as a
        heartbeat (`AgentSession.status_interval`), not per round. Marks it published.
        """
        phase = self.phase(state)
        if phase != self.published_phase_:
            self.published_phase_, self.since_ = phase, time.time()
        status = {
            "agent": self.agent_id,
            "state": state or self.state,
            "since": round(self.since_, 3),
            "version": self.base_version_,
            "model_version": self.model_.version if self.model_ else None,
            "updates_sent": self.updates_sent_,
            "samples": None if self.private else len(self.source),
            "codec": str(self.feedback.spec),
            "last_update_time": None if self.last_update_time_ is None else round(self.last_update_time_, 3),
            "missing": None if self.private else self.missing_,
            "scaled": bool(self.model_ is not None and self.model_.scaling is not None),
            "time": round(time.time(), 3),
        }
        if status["state"] == ERROR:
            status["error"] = self.error_[1]
        if status["state"] == UNHEARD:
            status["reason"] = self.unheard_[1]
        if (pace := self.pace) is not None:
            status["pace"] = round(pace.interval, 3)
        if self.unusable_models_:
            status["unusable_models"] = self.unusable_models_
        if getattr(self.trainer, "skipped_labels_", 0) and not self.private:  # a row count: data
            status["skipped_labels"] = self.trainer.skipped_labels_
        ledger = {} if self.privacy_store is None or self.privacy_store.state is None else \
            {"reset_at": self.privacy_store.state.reset_at}  # when --reset-privacy-state started this ledger
        if self.dp_budget is not None:  # local DP: this agent's epsilon at delta over the updates it made
            status["privacy"] = dict(self.dp_budget.report(), clip=self.dp.clip_norm, **ledger)
        if self.statistics.noise is not None:  # --stats-noise: epsilon at delta per row over the releases made
            status["stats_privacy"] = dict(self.statistics.report(), **ledger)
        return status


def offline_status(agent_id: str) -> dict:
    """The last will: what the broker publishes when the agent vanishes."""
    return {"agent": agent_id, "state": OFFLINE}
