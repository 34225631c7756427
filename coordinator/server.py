"""The coordinator's core, free of MQTT: validate, aggregate, version, publish, checkpoint.

`Coordinator` is driven by the MQTT session (coordinator/session.py), by tests and by the
simulator alike. It is not thread-safe; the session serialises calls with one lock.
Nothing a payload contains can raise out of `handle_update`: every payload is either
accepted or counted under a rejection reason.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections import Counter, OrderedDict

import msgpack
import numpy as np

from coordinator.acks import PendingAcks
from coordinator.evaluation import FleetEvaluation, score
from coordinator.presence import Presence
from coordinator.publish_policy import CLOCK, AgentsWaiting, PublishPolicy, floor, publish_due, relative_change
from coordinator.schema import FleetSchema
from coordinator.statistics import FleetStatistics, Rescales
from coordinator.status import build_status
from coordinator.store import CheckpointError, save_checkpoint
from coordinator.strategies import Strategy
from coordinator.validation import UpdateValidator, Verdict, judged_norm
from protocol.codec import MODEL_CODECS, decode_params, encode_params
from protocol.messages import ModelMessage, encode_model
from protocol.pace import Pace, Steering
from protocol.model_spec import ModelSpec
from protocol.statistics import identity, reexpress_gain, standardize
from protocol.topics import Topics

log = logging.getLogger(__name__)
FLOAT32_MAX = float(np.finfo(np.float32).max)
# Checkpoint keys that do not make a checkpoint due by themselves (`Coordinator.durable_key`):
# counters, and what a refused payload moves (its agent's seq); the model, its buffer and the
# statistics are followed by cheaper keys (version, accepted, statistics changes); the spec is fixed.
NOT_DURABLE_ALONE = frozenset({
    "fleet", "spec", "version", "params", "buffer", "accepted", "rejected", "clipped", "staleness_sum",
    "staleness_max", "highest_seq", "gaps", "buffer_timeouts", "audit", "statistics", "rounds",
})


class Coordinator:
    """Holds the global model (`params_`, `version_`) and everything counted about it."""

    def __init__(
        self,
        topics: Topics,
        spec: ModelSpec,
        strategy: Strategy,
        validator: UpdateValidator,
        *,
        publish_interval: float = 1.0,
        buffer_timeout: float | None = 30.0,
        history: int = 32,
        eval_data: tuple[np.ndarray, np.ndarray] | None = None,
        checkpoint_dir: str | None = None,
        resume: dict | None = None,
        statistics: FleetStatistics | None = None,
        model_codec: str = "float32",
        schema: FleetSchema | None = None,
        presence: Presence | None = None,
        steering: Steering | None = None,
        publish_policy: PublishPolicy | None = None,
    ) -> None:
        self.topics = topics
        self.spec = spec
        self.strategy = strategy
        self.validator = validator
        # when a changed model goes out (coordinator/publish_policy.py); without one, the clock of publish_interval
        self.publish_policy = publish_policy or PublishPolicy(max_interval=publish_interval, min_interval=0.0, kind=CLOCK)
        self.publish_interval = self.publish_policy.max_interval
        self.waiting_ = AgentsWaiting()  # agents whose update is folded and who hold nothing newer
        # agents whose update was refused since the last step: they train again only on a newer model, so a
        # buffer sized to the agents online must not wait for them (one refusal stalled a fleet of K for
        # --buffer-timeout)
        self.refused_since_step_: set[str] = set()
        self.published_params_: np.ndarray | None = None  # params_ when last published (what the change is measured from)
        self.buffer_timeout = buffer_timeout
        self.eval_data = eval_data
        self.checkpoint_dir = checkpoint_dir
        if model_codec not in MODEL_CODECS:
            raise ValueError(f"unknown model codec {model_codec!r}: use {', '.join(MODEL_CODECS)}")
        self.model_codec = model_codec  # how the model travels (protocol/codec.py encode_params)
        self.started_at = time.time()
        self.params_ = np.zeros(spec.n_params)
        self.version_ = 0
        self.handled_ = 0  # payloads seen, accepted or not
        self.accepted_ = 0
        self.rounds_ = 0  # accepted updates that were a round of their agent (`steps`): one per model it received
        self.round_base_: dict[str, int] = {}  # agent -> the base version of its newest round counted
        self.typical_samples_ = 0  # a checkpoint's typical update size: it votes until the sample cap's warm-up
        self.rejected_: Counter[str] = Counter()
        self.clipped_ = 0
        self.staleness_sum_ = 0
        self.staleness_max_ = 0
        self.published_version_ = -1
        self.buffer_since_: float | None = None  # monotonic time the oldest pending update arrived
        self.timeouts_ = 0  # buffers stepped by --buffer-timeout before they were full
        self.checkpoint_failing_: dict | None = None  # {"error", "since"} while checkpoints fail
        self.checkpoints_: Counter[str] = Counter()  # written; deferred (only refused payloads since the last)
        self.history = history
        # version -> exactly what agents received (float32 values, as they decode them)
        self.published_: OrderedDict[int, np.ndarray] = OrderedDict()
        self.last_publish_ = 0.0
        self.scores_: dict[str, float] = {}
        self.fleet_eval = FleetEvaluation()
        # audit(topic, update or None, reason or None, staleness) after every payload
        self.audit = None
        # per agent, the highest seq accepted since the last commit: the commit that holds it acks it (protocol/acks.py)
        self.acks = PendingAcks()
        self.acks_served = False  # the transport publishes those acks: the model says so ("acks": true)
        self.audit_position_: dict = {}  # {"path", "offset"}: the audit log's length the last checkpoint covers
        # federated feature statistics (coordinator/statistics.py): params_ are for features
        # standardized with rescales.current (raw features while it is None)
        self.statistics = statistics
        self.rescales = Rescales(spec)
        self.stats_seen_ = -1  # statistics.changes_ when the scaling was last refreshed
        self.schema = schema  # every agent's column names judged against the spec (coordinator/schema.py)
        self.presence = presence  # agents online by their statuses: the buffer's size follows them
        # pace steering (protocol/pace.py): the model tells every device how often to report, from the agents online
        if steering is not None and presence is None:
            raise ValueError("pace steering needs the agents' statuses (presence) to count the fleet")
        self.steering = steering
        if resume:
            self._restore(resume)

    # --- updates ---------------------------------------------------------------------

    def handle_update(self, topic: str, payload: bytes, *, retained: bool = False) -> str | None:
        """Validate and fold in one payload; returns None if accepted, else the reason.

        A retained update (someone published it with the retain flag) is refused unread:
        every coordinator starting afresh would otherwise ingest it again.
        """
        self.handled_ += 1
        try:
            verdict = Verdict("retained") if retained else \
                self.validator.check(topic, payload, self.version_, self.strategy.admit, self._distance)
            reason = verdict.reason or self._apply(verdict)
        except Exception:  # a bug of ours must not stop the network thread
            log.exception("unexpected error handling an update on %s", topic)
            verdict, reason = Verdict("internal"), "internal"
        if reason is not None:
            self.rejected_[reason] += 1
            if reason != "replay" and verdict.update is not None:
                self._not_waiting_for(verdict.update.agent_id)
        else:
            self.acks.note(verdict.update.agent_id, verdict.update.seq)
        if self.audit is not None:
            self.audit(topic, verdict.update, reason, verdict.staleness, verdict.norm, verdict.limit)
        return reason

    def _apply(self, verdict: Verdict) -> str | None:
        update = verdict.update
        base = self.published_.get(update.base_version)
        delta = self.rescales.catch_up(verdict.delta, update.base_version)  # trained under an older scaling
        new = self.strategy.add(self.params_, delta, verdict.n_samples, verdict.staleness, base, agent=update.agent_id)
        if new is not None and not _finite_on_the_wire(new):  # overflow: never publish it
            return "non_finite_model"
        if self.strategy.pending and self.buffer_since_ is None:
            self.buffer_since_ = time.monotonic()
        self.accepted_ += 1
        self._count_round(update.agent_id, update.base_version)
        self.clipped_ += verdict.clipped
        self.staleness_sum_ += verdict.staleness
        self.staleness_max_ = max(self.staleness_max_, verdict.staleness)
        self.fleet_eval.report(update.agent_id, verdict.n_samples, update.metrics)
        self.waiting_.folded(update.agent_id, update.base_version)
        if new is not None:
            self._step(new)
        return None

    def _count_round(self, agent: str, base_version: int) -> None:
        """Count a round of `agent` for `steps`: at most one per published model it trained from (a base
        published and newer than its last counted one). Counted per update, one fast agent sending 50
        updates a model beside 3 honest agents made `steps` 21 rounds where each had trained 2."""
        if base_version <= self.published_version_ and base_version > self.round_base_.get(agent, -1):
            self.round_base_[agent] = base_version
            self.rounds_ += 1

    def _distance(self, delta: np.ndarray, base_version: int) -> float:
        """What the norm bound judges (validation.judged_norm): at most how far the agent's model (its base
        + delta) lies from the current one, and for a strategy that adds deltas at most the delta's norm. The
        delta's own norm when the base is no longer held (older than the last `history` publishes)."""
        delta = self.rescales.catch_up(delta, base_version)
        return judged_norm(delta, self.published_.get(base_version), self.params_, self.strategy.mixes_models)

    def _not_waiting_for(self, agent: str) -> None:
        """A refused agent sends nothing more before a newer model: the buffer, sized to the agents online,
        steps without it (one agent can only give up its own slot this way)."""
        if self.presence is None:
            return
        self.refused_since_step_.add(agent)
        if self._fit_buffer():
            self._flush(f"{self.presence.count} agent(s) online, {len(self.refused_since_step_)} refused since the last step")

    def _fit_buffer(self) -> bool:
        """Size the buffer to the agents online less those refused since the last step whose update it does
        not hold; True when what is pending fills it. Every resize goes through here: an agent's status
        (sent after every update) resized to all agents online and the buffer waited --buffer-timeout for
        the refused one again (tests/test_hostile_counts.py's honest fedbuff fleet: 30 s per version)."""
        live = self.presence.live
        return self.strategy.resize(max(1, len(live) - self._refused_absent()) if live else 0)

    def _refused_absent(self) -> int:
        """Agents online refused since the last step whose update the buffer does not hold: K leaves them out."""
        return len((self.refused_since_step_ & self.presence.live) - self.strategy.buffered_agents())

    def _step(self, new: np.ndarray) -> None:
        self.params_ = new
        self.version_ += 1
        self.buffer_since_ = None if not self.strategy.pending else self.buffer_since_
        if self.refused_since_step_:
            self.refused_since_step_.clear()
            if self.presence is not None:
                self._fit_buffer()

    def tick(self, now: float | None = None) -> bool:
        """Step a buffer that has waited `buffer_timeout` seconds without filling; True if it did.

        With fewer live agents than K (or agents that only train on a newer model) a
        buffer would otherwise wait forever.
        """
        if self.buffer_since_ is None or self.buffer_timeout is None:
            return False
        now = time.monotonic() if now is None else now
        if now - self.buffer_since_ < self.buffer_timeout:
            return False
        if not self._flush(f"buffer timeout after {self.buffer_timeout:g} s"):
            return False
        self.timeouts_ += 1
        return True

    def _flush(self, why: str) -> bool:
        """Step with what the buffer holds now (never to a model that is not finite); True if it did."""
        pending = self.strategy.pending
        new = self.strategy.flush(self.params_)
        self.buffer_since_ = None
        if new is None:
            return False
        if not _finite_on_the_wire(new):
            self.rejected_["non_finite_model"] += pending
            return False
        log.info("%s: stepping with %d pending update(s)", why, pending)
        self._step(new)
        return True

    # --- feature statistics -------------------------------------------------------------

    def handle_statistics(self, topic: str, payload: bytes) -> str | None:
        """Take one agent's feature statistics; None if accepted, else the reason."""
        self.handled_ += 1  # a change to commit, like an update
        if self.statistics is None:
            return "statistics_off"
        return self.statistics.handle(topic, payload)

    def handle_agent_status(self, topic: str, payload: bytes) -> str | None:
        """Take one agent's retained status (or last will): the buffer follows the agents online.

        A buffer that is full for the fewer agents left steps at once. None if used, else the
        refusal reason (counted with the rejections)."""
        if self.presence is None:
            return "presence_off"
        reason = self.presence.handle(topic, payload)
        if reason is not None:
            self.rejected_[reason] += 1
        elif self._fit_buffer():
            self._flush(f"{self.presence.count} agent(s) online")
        return reason

    def handle_schema(self, topic: str, payload: bytes) -> str | None:
        """Take one agent's schema announcement; None if decoded (matching or not), else the reason."""
        self.handled_ += 1
        if self.schema is None:
            return "schema_off"
        return self.schema.handle(topic, payload)

    @property
    def ready(self) -> bool:
        """A model may be published: no statistics are awaited, or a scaling exists or can be made."""
        return self.statistics is None or self.rescales.current is not None or self.statistics.ready

    def _scaling_due(self) -> bool:
        return self.statistics is not None and self.statistics.ready and self.statistics.changes_ != self.stats_seen_

    def _refresh_scaling(self) -> None:
        """Adopt the merged statistics' scaling, re-expressing the model, buffer and history exactly."""
        if not self._scaling_due():
            return
        self.stats_seen_ = self.statistics.changes_
        try:
            new = self.statistics.scaling()
        except Exception:  # a bug of ours (or statistics we failed to bound) must not end the coordinator
            log.exception("cannot merge the fleet's statistics; keeping the scaling in force")
            self.statistics.rejected_["merge"] = self.statistics.rejected_.get("merge", 0) + 1
            return
        if new is None or new == self.rescales.current:
            return
        buffer = self.strategy.state()
        deltas = list(buffer.get("deltas", []))
        history = list(self.published_.items())
        old = self.rescales.current
        with np.errstate(all="ignore"):
            out = self.rescales.change(self.version_ + 1, new, [self.params_, *deltas, *(p for _, p in history)])
        if not all(np.isfinite(v).all() for v in out) or not _finite_on_the_wire(out[0]):
            self.rescales.current = old  # the model re-expressed would not be finite on the wire: keep it as it is
            self.rescales.history.pop()
            self.statistics.rejected_["scaling_overflow"] = self.statistics.rejected_.get("scaling_overflow", 0) + 1
            log.warning("refused a fleet scaling that would take the model beyond float32; keeping the one in force")
            return
        self.params_ = out[0]
        if deltas:
            self.strategy.restore(dict(buffer, deltas=out[1:1 + len(deltas)]))
        self.published_ = OrderedDict((v, p) for (v, _), p in zip(history, out[1 + len(deltas):]))
        # they were measured in the old scaling's units: converted, they judge until fresh ones come in
        self.validator.norm.forget_norms(reexpress_gain(old or identity(self.spec.n_features), new, self.rescales.shift))
        self.version_ += 1
        log.info("feature scaling from %d agent(s)' statistics; model re-expressed at version %d",
                 len(self.statistics.by_agent), self.version_)

    # --- publishing ------------------------------------------------------------------

    def publish_due(self, now: float | None = None, *, ignore_version: bool = False) -> bool:
        """The model changed since the last publish and its publish policy says now."""
        now = time.monotonic() if now is None else now
        scaling = self._scaling_due()
        if not (ignore_version or self.version_ != self.published_version_ or scaling):
            return False
        policy, since = self.publish_policy, now - self.last_publish_
        if publish_due(policy, since_last=since, changed=True, waiting=self.waiting_.waiting, active=self.waiting_.active):
            return True
        if policy.kind == CLOCK or since < floor(policy):
            return False
        change = math.inf if scaling or ignore_version else relative_change(self.params_, self.published_params_)
        return publish_due(policy, since_last=since, changed=True, change=change)

    def model_payload(self, now: float | None = None) -> bytes:
        """Encode the model for publishing and mark it published (scores it on the eval set)."""
        self._refresh_scaling()
        self.published_version_ = self.version_
        self.published_params_ = self.params_.copy()
        self.waiting_.publishing(self.version_)
        self.last_publish_ = time.monotonic() if now is None else now
        if self.eval_data is not None:
            try:
                X, y = self.eval_data
                scaling = self.rescales.current
                self.scores_ = score(self.spec, self.params_, X if scaling is None else standardize(X, scaling), y)
            except Exception:  # a score is worth a log line, not the coordinator
                log.exception("cannot score version %d on the eval set", self.version_)
                self.scores_ = {}
        # agents receive the model through the codec: remember exactly that as the base of their
        # updates (float32, as agents decode it: half the memory of float64 for the history)
        data, scales = encode_params(self.params_, self.model_codec, self.spec.n_features)
        self.published_[self.version_] = decode_params(data, scales, self.model_codec, self.spec.n_params,
                                                       self.spec.n_features)
        while len(self.published_) > self.history:
            self.published_.popitem(last=False)
        return encode_model(ModelMessage(self.topics.fleet, self.version_, self.spec, self.params_,
                                         started_at=self.started_at, scaling=self.rescales.current,
                                         codec=self.model_codec, steps=self.steps, pace=self.pace,
                                         acks=self.acks_served))

    @property
    def pace(self) -> Pace | None:
        """The report interval asked of every device now (None: not steered)."""
        return None if self.steering is None else self.steering.pace(self.presence.count)

    @property
    def steps(self) -> int:
        """The rows a typical agent has trained on so far: its rounds (rounds counted, at most one per
        agent per published model, / agents that sent them) x a typical update's rows (the lower median
        of the recent agents' counts, of two agents at least).

        A restarted device continues its learning-rate schedule from there, not from step 1
        (with the default learning_rate 'optimal', step 1 is a large step: accuracy dipped ~15
        points for ~20 s after every restart of the agents). Claimed counts never add up here:
        summed, two claims of 10^9 before the sample cap's warm-up set steps to 10^8 for good,
        and every device that started later trained with a learning rate of about zero.
        """
        typical = self.validator.norm.typical_samples(self.typical_samples_)
        return self.rounds_ // max(1, len(self.validator.highest_seq)) * typical

    def adopt(self, model: ModelMessage) -> bool:
        """Continue from a newer model of this fleet and spec (the broker's retained one).

        Versions never go backwards: if the broker holds a later version than the
        checkpoint (or there is no checkpoint), agents would ignore anything older.
        """
        if model.fleet != self.topics.fleet or model.spec != self.spec or model.version <= self.version_:
            return False
        log.info("continuing from the retained model at version %d (this coordinator was at %d)",
                 model.version, self.version_)
        self.params_ = np.asarray(model.params, dtype=np.float64).copy()
        self.version_ = model.version
        if model.scaling is not None and model.scaling != self.rescales.current:
            self.rescales.current = model.scaling  # the params are for the scaling they came with
            self.rescales.history.clear()
        return True

    def status(self, now: float | None = None) -> dict:
        """The retained JSON status (see coordinator.status)."""
        status = build_status(
            fleet=self.topics.fleet,
            strategy=self.strategy.name,
            version=self.version_,
            published_version=self.published_version_,
            accepted=self.accepted_,
            rejected=self.rejected_,
            clipped=self.clipped_,
            pending=self.strategy.pending,
            staleness_sum=self.staleness_sum_,
            staleness_max=self.staleness_max_,
            is_classifier=self.spec.is_classifier,
            scores=self.scores_,
            fleet_eval=self.fleet_eval.summary(),
            agents=len(self.validator.highest_seq),
            max_agents=self.validator.max_agents,
            gaps=self.validator.gaps_,
            buffer_timeouts=self.timeouts_,
            checkpoint_failing=self.checkpoint_failing_,
            checkpoints=self.checkpoints_,
            started_at=self.started_at,
            now=time.time() if now is None else now,
        )
        if self.statistics is not None:
            status["statistics"] = dict(self.statistics.summary(), scaled=self.rescales.current is not None)
        if self.schema is not None:
            status["schema"] = self.schema.summary()
        if isinstance(bounded := getattr(self.strategy, "bounded_", None), Counter):  # fedbuff, fedavg
            status["bounded"] = {"repeat_agent": bounded["repeat_agent"], "weight_cap": bounded["weight_cap"]}
        if (buffer := self.strategy.buffer()) is not None:
            if self.presence is not None:  # the agents online, and those refused since the step that K leaves out
                buffer = dict(buffer, live_agents=self.presence.count, refused_since_step=self._refused_absent())
            status["buffer"] = buffer
        if (pace := self.pace) is not None:
            status["pace"] = dict(pace.to_wire(), agents_online=self.presence.count)
        return status

    # --- durability --------------------------------------------------------------------

    def state(self) -> dict:
        """What a checkpoint holds: the model, its version, the dedup state, the counters."""
        return {
            "fleet": self.topics.fleet,
            "spec": self.spec,
            "version": self.version_,
            "params": self.params_,
            "highest_seq": dict(self.validator.highest_seq),
            "gaps": self.validator.gaps_,
            "buffer": _wire_buffer(self.strategy.state()),
            "buffer_timeouts": self.timeouts_,
            "audit": dict(self.audit_position_),
            "accepted": self.accepted_,
            "rounds": self.rounds_,
            "typical_samples": self.validator.norm.typical_samples(self.typical_samples_),
            "rejected": dict(self.rejected_),
            "clipped": self.clipped_,
            "staleness_sum": self.staleness_sum_,
            "staleness_max": self.staleness_max_,
            "statistics": self.statistics.state() if self.statistics is not None else None,
            "scaling": self.rescales.state(),
            "schema_agents": self.schema.state() if self.schema is not None else None,
        }

    def durable_key(self, state: dict) -> tuple:
        """Changes exactly when `state` holds something a checkpoint must keep beyond counters.

        A refused payload leaves it as it was (issue 18: rejected payloads wrote a checkpoint
        each); any state key not listed in NOT_DURABLE_ALONE (schema agents, secure-aggregation
        rounds, whatever comes next) is followed by its digest, so a new kind of state is safe.
        """
        rest = {k: v for k, v in state.items() if k not in NOT_DURABLE_ALONE}
        packed = msgpack.packb(rest, use_bin_type=True, default=_packable)
        changes = self.statistics.changes_ if self.statistics is not None else 0
        return self.version_, self.accepted_, changes, hashlib.blake2b(packed, digest_size=16).digest()

    def checkpoint(self, state: dict | None = None) -> None:
        """Save `state` (default `state()`) atomically to `checkpoint_dir`, if any.

        CheckpointError on failure; until the next success the status carries
        `checkpoint_failing` (the error and since when), so the outage is visible.
        """
        if not self.checkpoint_dir:
            return
        try:
            save_checkpoint(self.checkpoint_dir, self.state() if state is None else state)
        except CheckpointError as exc:
            if self.checkpoint_failing_ is None:
                self.checkpoint_failing_ = {"error": str(exc), "since": time.time()}
            else:
                self.checkpoint_failing_["error"] = str(exc)
            raise
        self.checkpoints_["written"] += 1
        if self.checkpoint_failing_ is not None:
            log.info("checkpoints succeed again (failing since %.0f s)", time.time() - self.checkpoint_failing_["since"])
            self.checkpoint_failing_ = None

    def _restore(self, state: dict) -> None:
        if state["fleet"] != self.topics.fleet or state["spec"] != self.spec:
            raise ValueError(
                f"checkpoint is for fleet {state['fleet']!r} with spec {state['spec'].to_wire()}, "
                f"not fleet {self.topics.fleet!r} with {self.spec.to_wire()}: use another --checkpoint-dir"
            )
        self.params_ = state["params"].copy()
        self.version_ = state["version"]
        self.validator.restore(state.get("highest_seq", {}), state.get("gaps", 0))
        buffer = state.get("buffer") or {}
        try:
            self.strategy.restore(_array_buffer(buffer, self.spec.n_params))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"checkpoint buffer does not fit --strategy {self.strategy.name}: {exc}") from None
        if self.strategy.pending:
            self.buffer_since_ = time.monotonic()
        self.timeouts_ = state.get("buffer_timeouts", 0)
        self.audit_position_ = state.get("audit") or {}
        self.accepted_ = state.get("accepted", 0)
        self.rounds_ = state.get("rounds", self.accepted_)  # a checkpoint from before rounds were counted
        self.typical_samples_ = state.get("typical_samples", 0)
        self.rejected_.update(state.get("rejected", {}))
        self.clipped_ = state.get("clipped", 0)
        self.staleness_sum_ = state.get("staleness_sum", 0)
        self.staleness_max_ = state.get("staleness_max", 0)
        if self.statistics is not None and state.get("statistics"):
            self.statistics.restore(state["statistics"])
        self.rescales.restore(state.get("scaling"))
        if self.schema is not None:
            self.schema.restore(state.get("schema_agents"))
        self.stats_seen_ = self.statistics.changes_ if self.statistics is not None and self.rescales.current else -1
        log.info("resumed from checkpoint at version %d%s", self.version_,
                 f" with {self.strategy.pending} buffered update(s)" if self.strategy.pending else "")


def _packable(value: object) -> object:
    """msgpack's fallback in `durable_key`: arrays by their bytes, anything else by its repr."""
    if isinstance(value, np.ndarray):
        return value.tobytes()
    if isinstance(value, (set, frozenset)):
        return sorted(map(repr, value))
    return repr(value)


def _finite_on_the_wire(params: np.ndarray) -> bool:
    """Agents receive float32: a model finite in float64 but not in float32 would brick the fleet.

    Two reductions and no copy (NaN fails both comparisons); this runs once per update.
    """
    return bool(-FLOAT32_MAX <= params.min() and params.max() <= FLOAT32_MAX)


def _wire_buffer(buffer: dict) -> dict:
    """A strategy's state with its buffered float64 deltas as little-endian bytes (for msgpack)."""
    return dict(buffer, deltas=[np.ascontiguousarray(d, dtype="<f8").tobytes() for d in buffer.get("deltas", [])],
                samples=list(buffer.get("samples", [])))


def _array_buffer(buffer: dict, n_params: int) -> dict:
    """Inverse of `_wire_buffer`, checking every delta's length and finiteness."""
    deltas = [np.frombuffer(raw, dtype="<f8") for raw in buffer.get("deltas", [])]
    if any(d.shape != (n_params,) or not np.isfinite(d).all() for d in deltas):
        raise ValueError("a buffered delta has the wrong length or is not finite")
    return dict(buffer, deltas=deltas, samples=buffer.get("samples", []))
