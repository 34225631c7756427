"""The schema from the fleet: fix the spec from the first agents' announcements, then judge every agent's.

`SchemaDiscovery` collects announcements before the coordinator has a spec and says when
enough came (`--schema-agents`, `--schema-wait`); `discover` runs it over its own short MQTT
connection (it reads only retained and live announcements and commits nothing: the spec it
fixes is made durable by the coordinator's first checkpoint). `FleetSchema` then judges
each agent's announcement against the spec the coordinator publishes, and counts the ones
that do not match (the agents see the same reason in their own status).
"""

from __future__ import annotations

import logging
import threading
import time

from protocol.errors import ProtocolError
from protocol.model_spec import ModelSpec
from protocol.schema import Schema, decode_schema, fix_spec, mismatch, unknown_labels
from protocol.topics import Topics
from protocol.transport import BrokerSettings, connect, make_client

log = logging.getLogger(__name__)

MAX_AGENTS = 100_000  # announcements held: a bound on memory against a flood of ids
SHOW_REASONS = 20  # mismatched agents named in the status (all are counted)


class SchemaDiscovery:
    """Announcements in arrival order until `agents` came, or `wait` seconds after the first."""

    def __init__(self, agents: int = 1, wait: float | None = None) -> None:
        if agents < 1 or (wait is not None and wait < 0):
            raise ValueError("--schema-agents must be >= 1 and --schema-wait >= 0")
        self.agents = agents
        self.wait = wait
        self.first: dict[str, Schema] = {}  # agent -> schema, in arrival order
        self.first_at: float | None = None  # monotonic time of the first announcement
        self.rejected_ = 0

    def add(self, topics: Topics, topic: str, payload: bytes, now: float | None = None) -> None:
        """Take one announcement (a later one of the same agent replaces its schema, keeping its place)."""
        agent = topics.agent_of_schema(topic)
        if agent is None or not payload or (agent not in self.first and len(self.first) >= MAX_AGENTS):
            return
        try:
            self.first[agent] = decode_schema(payload)
        except ProtocolError as exc:
            self.rejected_ += 1
            log.warning("ignoring the schema announced on %s: %s", topic, exc)
            return
        if self.first_at is None:
            self.first_at = time.monotonic() if now is None else now

    def done(self, now: float | None = None) -> bool:
        """Enough agents announced, or the wait after the first is over."""
        if len(self.first) >= self.agents:
            return True
        now = time.monotonic() if now is None else now
        return self.first_at is not None and self.wait is not None and now - self.first_at >= self.wait

    def spec(self, estimator: str, hyperparameters: dict, *, n_features: int | None = None,
             classes: tuple = ()) -> ModelSpec:
        """The spec from the announcements so far (the flags given win); ValueError when none fits."""
        return fix_spec(list(self.first.values()), estimator, hyperparameters, n_features=n_features, classes=classes)


def discover(settings: BrokerSettings, topics: Topics, discovery: SchemaDiscovery, *, connect_timeout: float,
             stop: threading.Event, log_every: float = 30.0) -> bool:
    """Read announcements on ``schema/+`` until `discovery` is done; False if `stop` came first.

    BrokerError (one line) when the broker cannot be reached.
    """
    lock, arrived = threading.Lock(), threading.Event()

    def on_message(client, userdata, msg) -> None:
        with lock:
            discovery.add(topics, msg.topic, msg.payload)
        arrived.set()

    def on_connect(client, userdata, flags, reason_code, properties) -> None:
        if not reason_code.is_failure:
            client.subscribe(topics.all_schemas, qos=1)

    client = make_client(settings, f"fedmq-coordinator-{topics.fleet}-schema", persistent=False)
    client.on_message, client.on_connect = on_message, on_connect
    connect(client, settings, timeout=connect_timeout)
    said = time.monotonic()
    try:
        while not stop.is_set():
            with lock:
                if discovery.done():
                    return True
                waiting = len(discovery.first)
            if time.monotonic() - said >= log_every:
                log.info("waiting for the fleet's schema: %d of %d agent(s) announced on %s",
                         waiting, discovery.agents, topics.all_schemas)
                said = time.monotonic()
            arrived.wait(0.2)  # also the poll of --schema-wait's deadline
            arrived.clear()
        return False
    finally:
        client.disconnect()
        client.loop_stop()


class FleetSchema:
    """Every agent's announcement judged against `spec`: matching, or mismatched with the reason."""

    def __init__(self, topics: Topics, spec: ModelSpec) -> None:
        self.topics = topics
        self.spec = spec
        self.by_agent: dict[str, str | None] = {}  # agent -> None (matches) or why not
        self.unknown_labels: dict[str, list[int]] = {}  # agent -> labels it holds the model lacks (rows skipped)
        self.rejected_: dict[str, int] = {}

    def handle(self, topic: str, payload: bytes) -> str | None:
        """Take one announcement; None if decoded (matching or not), else the rejection reason."""
        agent = self.topics.agent_of_schema(topic)
        if agent is None:
            reason = "topic"
        elif not payload:  # an agent clearing its retained announcement
            self.by_agent.pop(agent, None)
            self.unknown_labels.pop(agent, None)
            return None
        elif agent not in self.by_agent and len(self.by_agent) >= MAX_AGENTS:
            reason = "too_many_agents"
        else:
            try:
                schema = decode_schema(payload)
            except ProtocolError as exc:
                reason = exc.reason
            else:
                why = mismatch(schema, self.spec)
                if why is not None and self.by_agent.get(agent, "") != why:
                    log.warning("agent %s cannot train the fleet's model: %s", agent, why)
                self.by_agent[agent] = why
                extra = unknown_labels(schema, self.spec)
                if extra:
                    self.unknown_labels[agent] = extra[:10]
                else:
                    self.unknown_labels.pop(agent, None)
                return None
        self.rejected_[reason] = self.rejected_.get(reason, 0) + 1
        return reason

    def summary(self) -> dict:
        """For the coordinator status: the columns, agents matching and mismatched (some named, with why)."""
        bad = {a: why for a, why in sorted(self.by_agent.items()) if why is not None}
        return {"columns": list(self.spec.columns), "agents": len(self.by_agent) - len(bad),
                "mismatched": len(bad), "reasons": dict(list(bad.items())[:SHOW_REASONS]),
                "unknown_labels": dict(list(sorted(self.unknown_labels.items()))[:SHOW_REASONS]),
                "rejected": dict(self.rejected_)}

    def state(self) -> dict:
        """Checkpointable form: agent -> reason (None: matches), and the labels the model lacks."""
        return {"agents": dict(self.by_agent), "unknown_labels": dict(self.unknown_labels)}

    def restore(self, state: dict | None) -> None:
        """Take back `state()`."""
        state = state or {}
        self.by_agent = dict(state.get("agents", {}))
        self.unknown_labels = {a: list(v) for a, v in state.get("unknown_labels", {}).items()}


