"""The schema from the fleet: fix the spec from a majority of the agents' announcements, then judge every agent's.

`SchemaDiscovery` collects announcements before the coordinator has a spec and says when
a column set is held by at least `--schema-agents` agents and by more than half of those
that announced (`--schema-wait`: the most common set after that long); `discover` runs it
over its own short MQTT connection (it reads only retained and live announcements and
commits nothing: the spec it fixes is made durable by the coordinator's first checkpoint).
`FleetSchema` then judges each agent's announcement against the spec the coordinator
publishes, and counts the ones that do not match (the agents see the same reason in their
own status). One agent never decides for the fleet: an agent that disagrees is the outlier,
and a discovered spec whose column set another set out-votes (a majority of the agents
announced) is `lost_`: the coordinator discovers the schema again (coordinator/cli.py). A
label set that adds more than twice the labels all the other agents hold together (and more
than OWN_LABELS) is refused with a reason (`refused_labels`), so one agent cannot inflate the
classifier's classes.
"""

from __future__ import annotations

import logging
import threading
import time

from collections import Counter

from protocol.errors import ProtocolError
from protocol.model_spec import ModelSpec
from protocol.schema import Schema, decode_schema, fix_spec, mismatch, unknown_labels
from protocol.topics import Topics
from protocol.transport import BrokerSettings, connect, make_client

log = logging.getLogger(__name__)

MAX_AGENTS = 100_000  # announcements held: a bound on memory against a flood of ids
SHOW_REASONS = 20  # mismatched agents named in the status (all are counted)
GRACE_S = 0.5  # after the first announcement: time for the other retained ones to arrive before a majority counts
OWN_LABELS = 10  # labels one agent may bring that no other holds, beyond twice what the others hold


def inflated(own: int, others: int) -> bool:
    """One agent's `own` labels (held by no other agent, or unknown to the model) against the
    `others` the fleet holds: more than twice as many and more than OWN_LABELS is an inflated set."""
    return own > max(2 * others, OWN_LABELS)


def majority(schemas: dict[str, Schema], quorum: int = 1, among: int = 0) -> frozenset | None:
    """The column set held by at least `quorum` agents and by more than half of them all (or of
    `among` agents, when more are known than announced so far), else None."""
    if not schemas:
        return None
    (best, n), = Counter(frozenset(s.columns) for s in schemas.values()).most_common(1)
    return best if n >= quorum and 2 * n > max(len(schemas), among) else None


def refused_labels(schemas: dict[str, Schema]) -> dict[str, str]:
    """Agents whose label set is refused: it brings far more labels than all the other agents hold (`inflated`)."""
    held = Counter(v for s in schemas.values() if s.labels for v in s.labels)
    out = {}
    for agent, s in schemas.items():
        if not s.labels:
            continue
        own = sum(1 for v in s.labels if held[v] == 1)
        others = len(held) - own
        if others and inflated(own, others):
            out[agent] = f"labels refused: {own} label(s) no other agent holds, against the {others} the others hold"
    return out


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
        """A column set has its quorum and majority (after a short grace for the retained
        announcements to arrive), or the wait after the first is over."""
        if self.first_at is None:
            return False
        now = time.monotonic() if now is None else now
        if now - self.first_at >= min(GRACE_S, self.wait if self.wait is not None else GRACE_S) \
                and majority(self.usable(), self.agents) is not None:
            return True
        return self.wait is not None and now - self.first_at >= self.wait

    def spec(self, estimator: str, hyperparameters: dict, *, n_features: int | None = None,
             classes: tuple = ()) -> ModelSpec:
        """The spec from the announcements so far (the flags given win), refused label sets left out;
        ValueError when none fits."""
        for agent, why in refused_labels(self.first).items():
            log.warning("agent %s: %s", agent, why)
        return fix_spec(list(self.usable().values()), estimator, hyperparameters, n_features=n_features,
                        classes=classes)

    def usable(self) -> dict[str, Schema]:
        """The announcements so far but those whose label set is refused."""
        refused = refused_labels(self.first)
        return {a: s for a, s in self.first.items() if a not in refused}


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

    def __init__(self, topics: Topics, spec: ModelSpec, *, discovered: bool = False, quorum: int = 1,
                 known: dict[str, Schema] | None = None) -> None:
        self.topics = topics
        self.spec = spec
        self.discovered = discovered  # the spec came from the fleet (not the operator's flags): it may be lost
        self.quorum = quorum
        self.by_agent: dict[str, str | None] = {}  # agent -> None (matches) or why not
        self.unknown_labels: dict[str, list[int]] = {}  # agent -> labels it holds the model lacks (rows skipped)
        self.rejected_: dict[str, int] = {}
        # agent -> its newest announcement (not checkpointed: they are retained), from the discovery on
        self.schemas: dict[str, Schema] = dict(known or {})
        self.lost_ = False  # a discovered spec another column set out-votes: discover it again
        self.rediscovered_ = 0  # times this fleet's schema was discovered again (carried over by the CLI)

    def handle(self, topic: str, payload: bytes) -> str | None:
        """Take one announcement; None if decoded (matching or not), else the rejection reason."""
        agent = self.topics.agent_of_schema(topic)
        if agent is None:
            reason = "topic"
        elif not payload:  # an agent clearing its retained announcement
            self.by_agent.pop(agent, None)
            self.unknown_labels.pop(agent, None)
            self.schemas.pop(agent, None)
            return None
        elif agent not in self.by_agent and len(self.by_agent) >= MAX_AGENTS:
            reason = "too_many_agents"
        else:
            try:
                schema = decode_schema(payload)
            except ProtocolError as exc:
                reason = exc.reason
            else:
                self.schemas[agent] = schema
                extra = unknown_labels(schema, self.spec)
                why = mismatch(schema, self.spec)
                if why is None and inflated(len(extra), len(self.spec.classes)):  # one agent inflating the classes
                    why = (f"labels refused: {len(extra)} label(s) the fleet's model lacks, against "
                           f"its {len(self.spec.classes)} classes")
                    self.rejected_["labels"] = self.rejected_.get("labels", 0) + 1
                if why is not None and self.by_agent.get(agent, "") != why:
                    log.warning("agent %s cannot train the fleet's model: %s", agent, why)
                self.by_agent[agent] = why
                if extra:
                    self.unknown_labels[agent] = extra[:10]
                else:
                    self.unknown_labels.pop(agent, None)
                self._check_majority()
                return None
        self.rejected_[reason] = self.rejected_.get(reason, 0) + 1
        return reason

    def _check_majority(self) -> None:
        """A discovered spec whose column set is out-voted by another's majority is lost."""
        if not self.discovered or self.lost_ or not self.spec.columns:
            return
        best = majority(self.schemas, self.quorum, among=len(self.schemas.keys() | self.by_agent.keys()))
        if best is not None and best != frozenset(self.spec.columns):
            n = sum(1 for s in self.schemas.values() if frozenset(s.columns) == best)
            log.warning("the fleet's schema (%s) lost its majority: %d of %d agent(s) announce other columns; "
                        "discovering it again", ", ".join(self.spec.columns[:5]), n, len(self.schemas))
            self.lost_ = True

    def summary(self) -> dict:
        """For the coordinator status: the columns, agents matching and mismatched (some named, with why)."""
        bad = {a: why for a, why in sorted(self.by_agent.items()) if why is not None}
        return {"columns": list(self.spec.columns), "agents": len(self.by_agent) - len(bad),
                "mismatched": len(bad), "reasons": dict(list(bad.items())[:SHOW_REASONS]),
                "unknown_labels": dict(list(sorted(self.unknown_labels.items()))[:SHOW_REASONS]),
                "rejected": dict(self.rejected_), "discovered": self.discovered, "rediscovered": self.rediscovered_}

    def state(self) -> dict:
        """Checkpointable form: agent -> reason (None: matches), the labels the model lacks, the rediscovery count."""
        return {"agents": dict(self.by_agent), "unknown_labels": dict(self.unknown_labels),
                "rediscovered": self.rediscovered_}

    def restore(self, state: dict | None) -> None:
        """Take back `state()`."""
        state = state or {}
        self.by_agent = dict(state.get("agents", {}))
        self.unknown_labels = {a: list(v) for a, v in state.get("unknown_labels", {}).items()}
        self.rediscovered_ = state.get("rediscovered", 0)


