"""Every MQTT topic name fedmq uses, built in one place, and the scale-out tier's subjects (TIER_SUBJECTS).

The tier's subject kinds live here rather than in tier/: a device's topics are mapped onto them by the NATS nodes
(tier/cluster.py), the monitor parses them off the wire (Topics.tier_topic) and neither should import the tier; the
tier's own modules build and parse its NATS subjects and MQTT filters through the same table, so the nodes' mapping,
the devices' allow-lists and the workers' and root's subscriptions cannot drift apart."""

from __future__ import annotations

import re
from dataclasses import dataclass

_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


def check_name(kind: str, value: str) -> str:
    """Return `value` if it is a valid fleet or agent id, else raise ValueError.

    Ids become topic levels, so MQTT wildcards and separators are refused.
    """
    if not isinstance(value, str) or not _NAME.match(value):
        raise ValueError(
            f"invalid {kind} {value!r}: use 1-64 characters from A-Z a-z 0-9 _ . -"
        )
    return value


@dataclass(frozen=True)
class Topics:
    """The topic tree of one fleet: ``<prefix>/<fleet>/...``."""

    fleet: str
    prefix: str = "fedmq"

    def __post_init__(self) -> None:
        check_name("fleet", self.fleet)
        if not self.prefix or any(c in self.prefix for c in "+#") or self.prefix.endswith("/"):
            raise ValueError(f"invalid topic prefix {self.prefix!r}")

    @property
    def base(self) -> str:
        return f"{self.prefix}/{self.fleet}"

    @property
    def model(self) -> str:
        """Global model, published retained by the coordinator (msgpack)."""
        return f"{self.base}/model"

    def model_chunk(self, index: int) -> str:
        """Chunk `index` of a model larger than the packet limit, retained (protocol/chunking.py)."""
        return f"{self.base}/model/chunk/{int(index)}"

    @property
    def all_model_chunks(self) -> str:
        """Subscription filter for every chunk of the model."""
        return f"{self.base}/model/chunk/+"

    def update_chunk(self, agent_id: str) -> str:
        """Where agent `agent_id` publishes the chunks of an update larger than the packet limit."""
        return f"{self.base}/update/{check_name('agent id', agent_id)}/chunk"

    @property
    def all_update_chunks(self) -> str:
        """Subscription filter for every agent's update chunks."""
        return f"{self.base}/update/+/chunk"

    def agent_of_update_chunk(self, topic: str) -> str | None:
        """The agent id of an update chunk topic, or None."""
        head, tail = f"{self.base}/update/", "/chunk"
        if topic.startswith(head) and topic.endswith(tail):
            agent = topic[len(head):-len(tail)]
            if _NAME.match(agent):
                return agent
        return None

    @property
    def coordinator_status(self) -> str:
        """Coordinator status, retained JSON."""
        return f"{self.base}/coordinator/status"

    @property
    def all_updates(self) -> str:
        """Subscription filter for every agent's updates."""
        return f"{self.base}/update/+"

    @property
    def all_stats(self) -> str:
        """Subscription filter for every agent's feature statistics."""
        return f"{self.base}/stats/+"

    @property
    def all_agent_statuses(self) -> str:
        return f"{self.base}/agent/+/status"

    @property
    def everything(self) -> str:
        return f"{self.base}/#"

    def update(self, agent_id: str) -> str:
        """Where agent `agent_id` publishes its model updates (msgpack)."""
        return f"{self.base}/update/{check_name('agent id', agent_id)}"

    def stats(self, agent_id: str) -> str:
        """Where agent `agent_id` publishes its feature statistics (msgpack, retained)."""
        return f"{self.base}/stats/{check_name('agent id', agent_id)}"

    def agent_of_stats(self, topic: str) -> str | None:
        """The agent id a statistics topic belongs to, or None if `topic` is not one."""
        return self._agent_after("stats", topic)

    def schema(self, agent_id: str) -> str:
        """Where agent `agent_id` announces its column names and labels (msgpack, retained; protocol/schema.py)."""
        return f"{self.base}/schema/{check_name('agent id', agent_id)}"

    @property
    def all_schemas(self) -> str:
        """Subscription filter for every agent's schema announcement."""
        return f"{self.base}/schema/+"

    def agent_of_schema(self, topic: str) -> str | None:
        """The agent id a schema topic belongs to, or None if `topic` is not one."""
        return self._agent_after("schema", topic)

    def agent_status(self, agent_id: str) -> str:
        """Retained JSON status of one agent; its last will says offline."""
        return f"{self.base}/agent/{check_name('agent id', agent_id)}/status"

    def ack(self, agent_id: str) -> str:
        """Where the coordinator says, retained, the highest seq of agent `agent_id` it durably accepted
        (protocol/acks.py); the broker's ACL lets only that agent read it."""
        return f"{self.base}/ack/{check_name('agent id', agent_id)}"

    def agent_of_ack(self, topic: str) -> str | None:
        """The agent id of an ack topic, or None."""
        return self._agent_after("ack", topic)

    def _agent_after(self, kind: str, topic: str) -> str | None:
        """The agent id of `<base>/<kind>/<agent>`, or None if `topic` is not one."""
        head = f"{self.base}/{kind}/"
        if topic.startswith(head):
            agent = topic[len(head):]
            if _NAME.match(agent):
                return agent
        return None

    def agent_of_update(self, topic: str) -> str | None:
        """The agent id an update topic belongs to, or None if `topic` is not one."""
        return self._agent_after("update", topic)

    def agent_of_status(self, topic: str) -> str | None:
        """The agent id of an agent status topic, or None."""
        head, tail = f"{self.base}/agent/", "/status"
        if topic.startswith(head) and topic.endswith(tail):
            agent = topic[len(head):-len(tail)]
            if _NAME.match(agent):
                return agent
        return None

    # --- secure aggregation (docs/security.md): keys and shares per agent, cohort and unmask public

    @property
    def secagg_cohort(self) -> str:
        """A secure-aggregation cohort, announced by the coordinator (msgpack)."""
        return f"{self.base}/secagg/cohort"

    @property
    def secagg_unmask(self) -> str:
        """The coordinator's request for the shares that unmask a round (msgpack)."""
        return f"{self.base}/secagg/unmask"

    def secagg(self, kind: str, agent_id: str) -> str:
        """Per-agent secure-aggregation topic: key (retained), share, masked, reveal (agent out), inbox (agent in)."""
        if kind not in SECAGG_KINDS:
            raise ValueError(f"unknown secure-aggregation topic {kind!r}")
        return f"{self.base}/secagg/{kind}/{check_name('agent id', agent_id)}"

    def all_secagg(self, kind: str) -> str:
        """Subscription filter for one per-agent secure-aggregation topic of every agent."""
        if kind not in SECAGG_KINDS:
            raise ValueError(f"unknown secure-aggregation topic {kind!r}")
        return f"{self.base}/secagg/{kind}/+"

    def secagg_of(self, topic: str) -> tuple[str, str] | None:
        """(kind, agent id) of a per-agent secure-aggregation topic, or None."""
        head = f"{self.base}/secagg/"
        if topic.startswith(head):
            kind, _, agent = topic[len(head):].partition("/")
            if kind in SECAGG_KINDS and _NAME.match(agent):
                return kind, agent
        return None


    # --- the scale-out tier (tier/cluster.py): its nodes map an agent's update, update chunks and secure-aggregation
    # messages to the agent's partition, and its workers hand partial sums to the root; a subscriber of `everything`
    # on the tier (the tier user) sees them under these names (TIER_SUBJECTS)

    @property
    def tier_patterns(self) -> dict[str, str]:
        """Filters of the tier's topics by the kind of message on them (the web view's `config.json`)."""
        return {f"tier_{kind}": tier_subject(self.base, kind, fill="+", sep="/") for kind in TIER_SUBJECTS}

    def tier_topic(self, topic: str) -> tuple[str, str | None] | None:
        """(kind, agent id) of a tier topic: update (`upd/<P>/<agent>`, the agent's update as it sent it),
        update_chunk (`updc/<P>/<agent>`), secagg (`psecagg/<P>/<kind>/<agent>`) or partial (`partial/<P>[/counts]`,
        a worker's, no agent); None for any other topic."""
        head = f"{self.base}/"
        parsed = parse_tier(topic[len(head):].split("/")) if topic.startswith(head) else None
        if parsed is None:
            return None
        kind, _, values = parsed
        return ("partial" if kind == "partial_counts" else kind), (values[-1] if values else None)


# per-agent secure-aggregation topics: the agent publishes key/share/masked/reveal, reads its inbox
SECAGG_KINDS = ("key", "share", "masked", "reveal", "inbox")


# The scale-out tier's subjects after `<prefix>.<fleet>` (NATS) or `<prefix>/<fleet>` (MQTT), by kind: literal levels
# and placeholders. The nodes map a device's update, update chunks and secure-aggregation messages onto the first three
# (tier/cluster.py); a partition worker sends its partial sums and, alone, its refusal counts on the last two.
PARTITION, AGENT, SECAGG_KIND = "<partition>", "<agent>", "<secagg kind>"
TIER_SUBJECTS: dict[str, tuple[str, ...]] = {
    "update": ("upd", PARTITION, AGENT),
    "update_chunk": ("updc", PARTITION, AGENT),
    "secagg": ("psecagg", PARTITION, SECAGG_KIND, AGENT),
    "partial": ("partial", PARTITION),
    "partial_counts": ("partial", PARTITION, "counts"),
}


def tier_levels(kind: str, *values: str | int, fill: str | None = None) -> list[str]:
    """The levels of a `kind` tier subject after the fleet, its placeholders filled in order by `values` (a value,
    a wildcard or a mapping function), then by `fill`; without `fill` the levels stop at the first placeholder left
    unfilled (a prefix, or a filter with `>` last). ValueError on more values than placeholders."""
    out, rest = [], list(values)
    for level in TIER_SUBJECTS[kind]:
        if level.startswith("<"):
            if not rest and fill is None:
                break
            level = str(rest.pop(0)) if rest else fill
        out.append(level)
    if rest:
        raise ValueError(f"a {kind} tier subject has no place for {rest!r}")
    return out


def tier_subject(base: str, kind: str, *values: str | int, fill: str | None = None, sep: str = ".") -> str:
    """`base` (`<prefix>.<fleet>`, or `<prefix>/<fleet>` with sep `/`) and tier_levels(kind, *values, fill=fill)."""
    return sep.join([base, *tier_levels(kind, *values, fill=fill)])


def _fits(shape: str, level: str) -> bool:
    if shape == PARTITION:
        return level.isascii() and level.isdigit()
    if shape == AGENT:
        return bool(_NAME.match(level))
    if shape == SECAGG_KIND:
        return level in SECAGG_KINDS
    return level == shape


def parse_tier(levels: list[str]) -> tuple[str, int, tuple[str, ...]] | None:
    """(kind, partition, the other placeholders' values) of a tier subject's levels after the fleet, or None unless
    they fit one of TIER_SUBJECTS (a partition number, valid agent ids, a known secure-aggregation kind)."""
    for kind, shape in TIER_SUBJECTS.items():
        if len(shape) == len(levels) and all(_fits(s, v) for s, v in zip(shape, levels)):
            values = [v for s, v in zip(shape, levels) if s.startswith("<")]
            return kind, int(values[0]), tuple(values[1:])
    return None
