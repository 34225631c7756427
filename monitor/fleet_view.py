"""What a watcher of ``<prefix>/<fleet>/#`` has learnt about the fleet, as pure state.

`FleetView.feed(topic, payload, now)` takes every message the monitor receives; it has no
MQTT and no terminal in it, so it is tested with plain bytes. Nothing fed to it raises:
a payload it cannot read is counted under a reason and shown.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field

from monitor.values import counts, latest, mapping, number, numbers, text, whole
from protocol.agent_states import REASON_FIELDS, STATES
from protocol.errors import ProtocolError
from protocol.messages import MAX_METRICS, decode_model, decode_update
from protocol.model_spec import ModelSpec
from protocol.schema import decode_schema
from protocol.acks import decode_ack
from protocol.stats_message import decode_stats
from protocol.topics import Topics

log = logging.getLogger(__name__)

MAX_JSON_BYTES = 64 * 1024  # status documents are a few hundred bytes
# known topics whose contents are the coordinator's or the tier's business: model chunks, secure-aggregation
# messages, the tier's partial sums (the root's status counts what they folded)
IGNORED = ("model_chunk", "secagg", "partial")
# The largest model (float32 parameter bytes) the monitor decodes (fedmq-monitor --max-model-bytes): its spec is
# judged before its params are decoded, which cost ~26x an int4 model's bytes (a 5 MB one: ~128 MiB traced).
DEFAULT_MAX_MODEL_BYTES = 16 * 1024 * 1024  # 4x an agent's default (fedmq-agent --max-model-bytes)
# The most classes of a model the monitor shows (fedmq-monitor --max-classes), an agent's default (fedmq-agent
# --max-classes): judged on the count before any class is built; the protocol's 100,000 were ~11 MB from ~150 bytes.
DEFAULT_MAX_CLASSES = 1000


@dataclass
class AgentView:
    """One agent as seen from its retained status and the updates it published."""

    agent: str
    state: str | None = None  # None: no status seen yet
    reason: str | None = None  # why, in a state that says why (error, unheard)
    base_version: int | None = None  # model version its newest update was trained from
    model_version: int | None = None  # newest model it says it holds
    updates_seen: int = 0  # update messages this monitor received
    updates_sent: int | None = None  # what the agent's status says it sent
    last_update_time: float | None = None
    last_update_bytes: int | None = None
    last_seen: float | None = None  # newest status time or update arrival
    samples: int | None = None
    codec: str | None = None
    metrics: dict = field(default_factory=dict)
    bad: int = 0  # unreadable payloads on this agent's topics


@dataclass
class ModelView:
    """The newest global model message: its version and size, not its parameters."""

    version: int
    estimator: str
    n_params: int
    bytes: int
    time: float
    received_at: float


class FleetView:
    """Aggregates everything published under one fleet's topics; `snapshot()` reports it."""

    def __init__(self, topics: Topics, max_model_bytes: int = DEFAULT_MAX_MODEL_BYTES,
                 max_classes: int = DEFAULT_MAX_CLASSES) -> None:
        self.topics = topics
        self.max_model_bytes = max_model_bytes
        self.max_classes = max_classes
        self.agents: dict[str, AgentView] = {}
        self.model: ModelView | None = None
        self.coordinator: dict | None = None
        self.bad: Counter = Counter()  # "<topic kind>:<reason>" -> count
        self.last_bad: str | None = None
        self.messages = 0
        self.stats_rows: dict[str, int] = {}  # agent -> rows its feature statistics describe (stats/<agent>)
        self.schema_columns: dict[str, int] = {}  # agent -> feature columns it announced (schema/<agent>)

    def feed(self, topic: str, payload: bytes, now: float) -> str | None:
        """Take one message; returns the reason it was counted as bad, or None."""
        self.messages += 1
        kind, agent = self._classify(topic)
        try:
            if kind == "topic":
                raise ProtocolError("unknown", f"not a fedmq topic of fleet {self.topics.fleet}")
            if not payload:  # a retained message being cleared
                self._clear(kind, agent)
            elif kind == "model":
                self._on_model(payload, now)
            elif kind == "coordinator":
                self._on_coordinator(payload)
            elif kind == "update":
                self._on_update(agent, payload, now)
            elif kind == "stats":
                self.stats_rows[agent] = int(decode_stats(payload).count.max(initial=0))
            elif kind == "schema":
                self.schema_columns[agent] = len(decode_schema(payload).columns)
            elif kind == "ack":  # the coordinator's ack to one agent (only on a broker whose ACL lets us read it)
                decode_ack(payload)
            elif kind == "update_chunk":  # a piece of a large update: the agent is alive, the update counts once whole
                if agent in self.agents:
                    self.agents[agent].last_seen = now
            elif kind in IGNORED:
                pass
            else:
                self._on_agent_status(agent, payload)
            return None
        except ProtocolError as exc:
            return self._count_bad(kind, agent, exc.reason, f"{topic}: {exc}")
        except Exception as exc:  # noqa: BLE001 - nothing received may stop the monitor
            log.exception("internal error on %s", topic)
            return self._count_bad(kind, agent, "internal", f"{topic}: {type(exc).__name__}: {exc}")

    @property
    def global_version(self) -> int | None:
        """The newest version known: the coordinator's status may be ahead of the published model."""
        versions = ([self.model.version] if self.model else []) + \
            ([self.coordinator["version"]] if self.coordinator else [])
        return max(versions) if versions else None

    def staleness(self, agent: AgentView) -> int | None:
        """Global version minus the base of the agent's newest update, as the coordinator counts it."""
        version = self.global_version
        if version is None or agent.base_version is None:
            return None
        return version - agent.base_version

    def snapshot(self, now: float) -> dict:
        """Everything seen, as a JSON-ready dict (what --json prints and the table shows)."""
        return {
            "fleet": self.topics.fleet,
            "time": now,
            "version": self.global_version,
            "model": None if self.model is None else vars(self.model).copy(),
            "coordinator": None if self.coordinator is None else dict(self.coordinator),
            "agents": [
                {**vars(a), "metrics": dict(a.metrics), "staleness": self.staleness(a)}
                for _, a in sorted(self.agents.items())
            ],
            "bad": {"count": sum(self.bad.values()), "reasons": dict(sorted(self.bad.items())), "last": self.last_bad},
            "messages": self.messages,
            "statistics": dict(sorted(self.stats_rows.items())),
            "schema": dict(sorted(self.schema_columns.items())),
        }

    # one handler per topic kind -----------------------------------------------------------

    def _classify(self, topic: str) -> tuple[str, str | None]:
        """(kind, agent id) of a topic under the fleet: model, coordinator, update, status, ... or topic (unknown).
        On the scale-out tier an agent's update arrives on its partition's topic (Topics.tier_topic): an update still."""
        if topic == self.topics.model:
            return "model", None
        if topic == self.topics.coordinator_status:
            return "coordinator", None
        if topic.startswith(f"{self.topics.base}/model/chunk/"):
            return "model_chunk", None
        tier = self.topics.tier_topic(topic)
        if tier is not None:
            return tier
        agent = self.topics.agent_of_update_chunk(topic)
        if agent is not None:
            return "update_chunk", agent
        secagg = self.topics.secagg_of(topic)
        if secagg is not None:
            return "secagg", secagg[1]
        agent = self.topics.agent_of_update(topic)
        if agent is not None:
            return "update", agent
        agent = self.topics.agent_of_status(topic)
        if agent is not None:
            return "status", agent
        agent = self.topics.agent_of_stats(topic)
        if agent is not None:
            return "stats", agent
        agent = self.topics.agent_of_schema(topic)
        if agent is not None:
            return "schema", agent
        agent = self.topics.agent_of_ack(topic)
        if agent is not None:
            return "ack", agent
        return "topic", None

    def _clear(self, kind: str, agent: str | None) -> None:
        """An empty retained payload deletes what the topic said."""
        if kind == "model":
            self.model = None
        elif kind == "coordinator":
            self.coordinator = None
        elif kind == "status":
            self.agents.pop(agent, None)
        elif kind == "stats":
            self.stats_rows.pop(agent, None)
        elif kind == "schema":
            self.schema_columns.pop(agent, None)
        elif kind in ("ack", "update_chunk", *IGNORED):
            pass
        else:
            raise ProtocolError("empty", "empty update payload")

    def _on_model(self, payload: bytes, now: float) -> None:
        msg = decode_model(payload, fleet=self.topics.fleet, check_spec=self._check_size, check_classes=self._check_classes)
        self.model = ModelView(msg.version, msg.spec.estimator, msg.spec.n_params, len(payload), msg.time, now)

    def _check_classes(self, count: int) -> None:
        """ValueError (one line, naming the flag) for a model of more than --max-classes classes, before they are built."""
        if count > self.max_classes:
            raise ValueError(f"the model has {count} classes, the monitor shows at most {self.max_classes} (--max-classes)")

    def _check_size(self, spec: ModelSpec) -> None:
        """ValueError (one line, naming the flag) for a model beyond --max-model-bytes, before its params decode."""
        if 4 * spec.n_params > self.max_model_bytes:
            raise ValueError(f"the model has {spec.n_params} parameters ({4 * spec.n_params} bytes), the monitor "
                             f"decodes at most {self.max_model_bytes} bytes (--max-model-bytes)")

    def _on_coordinator(self, payload: bytes) -> None:
        doc = _json_object(payload)
        if doc.get("role") == "root":
            doc = root_as_coordinator(doc)
        version = whole(doc, "version")
        if version is None:
            raise ProtocolError("schema", "coordinator status without an integer version")
        staleness = mapping(doc, "staleness")
        self.coordinator = {
            "version": version,
            "published_version": whole(doc, "published_version"),
            "accepted": whole(doc, "accepted"),
            "rejected": counts(doc.get("rejected")),
            "clipped": whole(doc, "clipped"),
            "pending": whole(doc, "pending"),
            "staleness": {"mean": number(staleness, "mean"), "max": number(staleness, "max")},
            "accuracy": number(doc, "accuracy"),
            "r2": number(doc, "r2"),
            "fleet_eval": numbers(doc.get("fleet_eval")),
            "agents": whole(doc, "agents"),
            "strategy": text(doc, "strategy"),
            "uptime_s": number(doc, "uptime_s"),
            "updated_at": number(doc, "updated_at"),
            **({"root": text(doc, "root"), "partitions": whole(doc, "partitions"), "partials": whole(doc, "partials")}
               if "root" in doc else {}),
        }

    def _on_update(self, agent_id: str, payload: bytes, now: float) -> None:
        msg = decode_update(payload, agent_id)
        agent = self._agent(agent_id)
        agent.updates_seen += 1
        agent.base_version = msg.base_version
        agent.last_update_bytes = len(payload)
        agent.last_update_time = now
        agent.last_seen = now
        merged = {**agent.metrics, **msg.metrics}
        agent.metrics = merged if len(merged) <= 2 * MAX_METRICS else dict(msg.metrics)

    def _on_agent_status(self, agent_id: str, payload: bytes) -> None:
        doc = _json_object(payload)
        if doc.get("agent") != agent_id:
            raise ProtocolError("agent_mismatch", f"status of {doc.get('agent')!r} on the topic of {agent_id!r}")
        state = doc.get("state")
        if state not in STATES:  # the agent's own list (protocol/agent_states.py): every state it can say is shown
            raise ProtocolError("schema", f"unknown agent state {state!r}")
        agent = self._agent(agent_id)
        agent.state = state  # the last will says only offline: the other fields keep what was known
        agent.reason = text(doc, REASON_FIELDS.get(state, "reason"), limit=300)
        agent.base_version = whole(doc, "version", agent.base_version)
        agent.model_version = whole(doc, "model_version", agent.model_version)
        agent.updates_sent = whole(doc, "updates_sent", agent.updates_sent)
        agent.samples = whole(doc, "samples", agent.samples)
        agent.codec = text(doc, "codec") or agent.codec
        agent.last_update_time = latest(agent.last_update_time, number(doc, "last_update_time"))
        agent.last_seen = latest(agent.last_seen, number(doc, "time"))
        if "metrics" in doc:
            agent.metrics = numbers(doc["metrics"])

    def _agent(self, agent_id: str) -> AgentView:
        return self.agents.setdefault(agent_id, AgentView(agent_id))

    def _count_bad(self, kind: str, agent: str | None, reason: str, message: str) -> str:
        key = f"{kind}:{reason}"
        self.bad[key] += 1
        self.last_bad = message[:200]
        if agent in self.agents:  # garbage alone does not make an agent row
            self.agents[agent].bad += 1
        log.debug("bad payload (%s): %s", key, message)
        return key


def root_as_coordinator(doc: dict) -> dict:
    """The scale-out tier root's status (tier/root.py `Root.status`) under the coordinator's field names: what it
    folded is what it accepted, the devices' updates its partitions refused are the rejected, `time` is when."""
    pace = mapping(doc, "pace")
    return {**doc, "published_version": whole(doc, "version"), "accepted": whole(doc, "folded"),
            "rejected": doc.get("updates_rejected"), "agents": whole(pace, "agents_online"),
            "strategy": "tier root", "root": text(doc, "root") or "?", "updated_at": number(doc, "time")}


def _json_object(payload: bytes) -> dict:
    """A status payload as a JSON object, or ProtocolError (oversize, json, schema)."""
    if len(payload) > MAX_JSON_BYTES:
        raise ProtocolError("oversize", f"{len(payload)} bytes of JSON")
    try:
        doc = json.loads(payload)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise ProtocolError("json", f"not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ProtocolError("schema", f"expected a JSON object, got {type(doc).__name__}")
    return doc
