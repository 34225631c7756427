"""Deciding whether an update may touch the global model, with a counted reason when not.

Checks run cheapest first: the agent id in the topic, its rate limit, decoding, shape, base version,
replay (highest seq per agent, never forgotten; seq at most a day ahead of our clock), staleness, the strategy's own admission (fedavg rounds),
decoding the delta (finiteness), and the norm bound (reject or clip), which also caps
the sample count an update may claim. Nothing in a payload can raise out of
`UpdateValidator.check`.
"""

from __future__ import annotations

import bisect
import logging
import statistics
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from coordinator.rate_limit import RateLimit
from protocol import codec
from protocol.errors import ProtocolError
from protocol.messages import MAX_MESSAGE_BYTES, UpdateMessage, decode_update
from protocol.sequence import missing_between
from protocol.topics import Topics

log = logging.getLogger(__name__)


@dataclass
class Verdict:
    """The outcome for one payload: `reason` is None when accepted."""

    reason: str | None
    update: UpdateMessage | None = None
    delta: np.ndarray | None = None
    staleness: int = 0
    clipped: bool = False
    n_samples: int = 0  # the weight to give it: its sample count, capped by the relative bound
    norm: float | None = None  # what the norm bound judged, and the bound it was held to (the audit log's)
    limit: float | None = None


# The replay state (the highest seq of every agent, never forgotten) costs at most
# BYTES_PER_AGENT per agent with 64-character ids (the longest), counting the copy and the
# msgpack a commit makes of it (tests/test_replay_bound.py measures it); a budget of
# REPLAY_BUDGET_BYTES sets the default bound on agents (--max-agents): 131,072.
REPLAY_BUDGET_BYTES = 64 * 1024 * 1024
BYTES_PER_AGENT = 512
DEFAULT_MAX_AGENTS = REPLAY_BUDGET_BYTES // BYTES_PER_AGENT
DEFAULT_MAX_NORM = 1e6  # far above any real SGD delta, far below what overflows float32 in a sum
DEFAULT_SAMPLE_FACTOR = 4.0
# The relative norm bound is on by default (issue 18): one sign-flipping agent of 6 took plain
# fedasync from 0.961 to 0.521 and a fedbuff mean to 0.170; rejecting above 2x the median keeps
# both within a point (docs/security.md). Off under central DP and secure aggregation (coordinator/cli.py).
DEFAULT_NORM_FACTOR = 2.0
NORM_WARMUP = 3  # agents seen before the relative norm bound starts: no one agent owns a median of 3
REFRESH = 8
# An update over the relative bound that agrees with the fleet's heading is taken at the others' median norm
# (NormBound.shrink_to; bench/results/norm_lockout.json, docs/security.md):
HEADING_KEEP = 0.8  # the heading: an average of the accepted deltas, each new one weighing 1 - this
HEADING_MARGIN = 0.05  # the cosine with the heading it must exceed (a sign flip's is mostly below it)
STANDING = 6  # norm refusals in a row after which an agent's updates over the bound are refused again
REACH = 4.0  # over this many times the bound an update is refused whatever its heading: no honest drift
STREAKS = 4096  # agents whose refusal streak is kept (only agents refused since their last accepted update)


class NormBound:
    """Norm limit: an absolute cap and/or `factor` x the median of recent norms; a sample cap.

    The references are medians over the last `window` distinct agents, one entry each: the norm
    of its newest update judged (accepted or not), its newest count accepted; so no agent owns
    them by volume: a flood from one id is one entry. An agent is judged against the median of the
    *other* agents' entries: a refused attacker's own huge norm (or its capped claim) would
    otherwise lift the median that judges its next update by half a rank. The
    relative norm bound starts once `norm_warmup` agents were seen, the judged one among them (a
    fleet of 3 keeps it, each agent judged by its two peers: counting only the others would leave
    a 1-of-3 sign flip unbounded), the sample cap once `warmup` were; the sorted entries are refreshed
    every REFRESH updates judged and whenever an agent joins (the hot path pays for a sort once in
    that many; dropping the judged agent's value is a bisect). The sample count an update claims
    is capped at `sample_factor` x the median count (on by default): in a sample-weighted
    mean, and in the fleet evaluation, a count is as much influence as a norm.

    Over the relative bound (up to REACH x it, never over the absolute cap) an update is refused unless it
    agrees with the fleet's heading (an average of the accepted deltas: cosine above `heading_margin`) and
    its agent was not refused `standing` times in a row; then it is taken at the others' median norm, a
    typical update's size (`shrink_to`; counted `clipped`). Why: an honest agent refused once went on being refused, its data
    no longer in the model so its distance grew, in 3 of 10 all-honest fedasync runs on the shards of
    tests/test_hostile_counts.py and 5 of 10 on Dirichlet(0.5) shards (bench/results/norm_lockout.json);
    a sign flip points against the heading, and a flipper refused `standing` times in a row keeps no way
    in. Taken at the limit rather than the median, the flips that agree cost more (docs/security.md).
    `heading_margin` None: the old rule, every update over the bound refused.
    """

    def __init__(self, max_norm: float | None = DEFAULT_MAX_NORM, factor: float | None = None, window: int = 50,
                 warmup: int = 10, sample_factor: float | None = DEFAULT_SAMPLE_FACTOR,
                 norm_warmup: int = NORM_WARMUP, heading_margin: float | None = HEADING_MARGIN,
                 standing: int = STANDING) -> None:
        for flag, value in (("--max-update-norm", max_norm), ("--norm-factor", factor), ("--sample-factor", sample_factor)):
            if value is not None and not value > 0:
                raise ValueError(f"{flag} must be > 0, got {value}")
        self.max_norm = max_norm
        self.factor = factor
        self.sample_factor = sample_factor
        self.window = window
        self.warmup = warmup
        self.norm_warmup = norm_warmup
        # agent -> its newest norm, agent -> its newest (capped) sample count: columns 0 and 1
        self.recent: tuple[OrderedDict[str, float], OrderedDict[str, int]] = (OrderedDict(), OrderedDict())
        # column -> (changes when taken, the entries then, their values sorted)
        self._sorted: dict[int, tuple[int, dict[str, float], list[float]]] = {}
        self._changes = 0
        self._converted: set[str] = set()  # agents whose norm entry predates the scaling in force (converted)
        self.heading_margin = heading_margin
        self.standing = standing
        self.heading: np.ndarray | None = None  # recent accepted deltas, averaged (`shrink_to`)
        # agent -> norm refusals since its last accepted update, for agents with one or more (the STREAKS latest)
        self.refusals: OrderedDict[str, int] = OrderedDict()

    def limit(self, agent: str | None = None) -> float:
        """The largest norm accepted now from `agent` (None: from an agent not seen yet)."""
        relative = self._relative(0, self.factor, self.norm_warmup, agent)
        return min(self.max_norm if self.max_norm is not None else np.inf, relative)

    def sample_limit(self, agent: str | None = None) -> float:
        """The largest sample count an update of `agent` is weighted by now."""
        return self._relative(1, self.sample_factor, self.warmup, agent)

    def typical_samples(self, prior: int = 0) -> int:
        """The lower median of the recent agents' newest (capped) sample counts, 0 before two.

        The lower one: with two agents, one claiming 10^9 rows, it is the other's count; of one agent
        alone, 0: a fresh fleet's first update claiming 10^12 rows was the models' steps until a second
        agent reported. `prior` (a checkpoint's typical count) votes once per agent the sample cap's
        warm-up still lacks: after a restart one device's first claim was the whole median, and the steps.
        """
        counts = list(self.recent[1].values())
        if prior > 0:
            counts += [prior] * max(0, self.warmup - len(counts))
        return int(statistics.median_low(counts)) if len(counts) >= 2 else 0

    def forget_norms(self, gain: float | None = None) -> None:
        """The model was re-expressed for a new feature scaling: the norms seen so far are in units no
        update has any more (a raw-unit fleet's refinement refused 32 of 147 honest updates against them).

        Without `gain` the reference is dropped and warms up again from `norm_warmup` agents: until then
        nothing is bounded, and a sign-flipping agent of 6 got one x-4 update in (a distance 10x the
        others') right after a re-expression. With `gain` (an upper bound of how much the re-expression
        lengthens a vector, protocol.statistics.reexpress_gain) each entry is converted (x gain) and
        judges until `norm_warmup` agents sent an entry in the new units; from then on only those do."""
        norms = self.recent[0]
        if gain is None or not np.isfinite(gain) or gain <= 0:
            norms.clear()
            self._converted = set()
        else:
            for agent in norms:
                norms[agent] *= gain
            self._converted = set(norms)
        self._sorted.pop(0, None)
        self.heading = None  # in units no update has any more

    def _relative(self, column: int, factor: float | None, warmup: int, agent: str | None) -> float:
        recent = self.recent[column]
        seen = len(recent) + (agent not in recent)  # the judged agent (None: a new one) is one of those seen
        if factor is None or seen < warmup:
            return np.inf
        # converted entries (forget_norms) judge only until `warmup` agents sent one in the scaling in force
        stale = self._converted if column == 0 and len(recent) - len(self._converted) >= warmup else ()
        at, entries, values = self._sorted.get(column, (-REFRESH, {}, []))
        if self._changes - at >= REFRESH or len(entries) != len(recent) - len(stale):  # a sort of 50, once per REFRESH
            entries = {a: v for a, v in recent.items() if a not in stale} if stale else dict(recent)
            values = sorted(entries.values())
            self._sorted[column] = (self._changes, entries, values)
        median = median_without(values, entries.get(agent) if agent in entries else None)
        if median > 0:  # a fleet of zero updates must not lock out every later one
            return factor * median
        return np.inf

    def observed(self, norm: float, agent: str = "") -> None:
        """Note the norm of an update judged, accepted or refused: a refused agent's entry kept its
        old norm, so in a small fleet the median shrank toward the one agent still accepted, the model
        followed that agent, and the others' norms grew: 31 of 108 honest updates of 3-4 agents refused."""
        self._changes += 1
        self._note(0, agent, norm)

    def accepted(self, n_samples: int = 1, agent: str = "", delta: np.ndarray | None = None) -> None:
        """Note the (capped) sample count of an accepted update, and its delta in the fleet's heading."""
        self._note(1, agent, n_samples)
        self._standing(agent, 0)
        if delta is None or self.factor is None or self.heading_margin is None:  # no relative bound: no heading
            return
        if self.heading is None or self.heading.shape != delta.shape:
            self.heading = np.array(delta, dtype=np.float64)
        else:
            self.heading *= HEADING_KEEP
            self.heading += (1 - HEADING_KEEP) * delta

    def refused(self, agent: str = "") -> None:
        """Note an update of `agent` refused by the norm bound."""
        self._standing(agent, self.refusals.get(agent, 0) + 1)

    def shrink_to(self, delta: np.ndarray, norm: float, bound: float, agent: str = "") -> float | None:
        """The norm at which an update judged `norm` over `bound` (`limit`) is accepted, or None: refused.

        Only the relative bound yields, up to REACH x it, for an agent accepted within its last `standing`
        updates whose `delta` agrees with the fleet's heading (cosine above `heading_margin`): it is taken at
        the others' median norm, the size of a typical update."""
        heading = self.heading  # None without a relative bound or a heading margin (`accepted` keeps none then)
        if heading is None or heading.shape != delta.shape:
            return None
        if norm > REACH * bound or (self.max_norm is not None and norm > self.max_norm) \
                or self.refusals.get(agent, 0) >= self.standing:
            return None
        if float(np.dot(heading, delta)) <= self.heading_margin * l2_norm(heading) * l2_norm(delta):
            return None
        return bound / self.factor

    def _standing(self, agent: str, refusals: int) -> None:
        """Only streaks are kept: bounded by the agents of the last `window` updates, a flipper's streak was gone
        in a fleet of more than 50 before its next update came, and it had standing again at every update."""
        if refusals == 0:
            self.refusals.pop(agent, None)
            return
        self.refusals[agent] = refusals
        self.refusals.move_to_end(agent)
        while len(self.refusals) > STREAKS:
            self.refusals.popitem(last=False)

    def _note(self, column: int, agent: str, value: float) -> None:
        recent = self.recent[column]
        recent[agent] = value
        recent.move_to_end(agent)
        while len(recent) > self.window:
            gone, _ = recent.popitem(last=False)
            if column == 0:
                self._converted.discard(gone)
        if column == 0:
            self._converted.discard(agent)


def median_without(values: list[float], own: float | None) -> float:
    """The median of sorted `values` with one occurrence of `own` left out (None: all of them); 0 if none left."""
    skip = len(values) if own is None else bisect.bisect_left(values, own)
    n = len(values) - (own is not None)
    if n <= 0:
        return 0.0
    at = lambda k: values[k if k < skip else k + 1]  # noqa: E731
    return at(n // 2) if n % 2 else (at(n // 2 - 1) + at(n // 2)) / 2


NORM_CHUNK = 8192  # below the length at which OpenBLAS splits a dot product over its threads


def l2_norm(x: np.ndarray) -> float:
    """The Euclidean norm of a float64 vector, one BLAS thread at a time.

    np.linalg.norm hands a vector of 1e5 values to a multi-threaded dot product; on a host whose
    cores are busy each call waits for a descheduled BLAS thread, on every update (the norm rows
    of bench/throughput.py's stage costs, docs/benchmarks.md).
    """
    total = 0.0
    for i in range(0, x.size, NORM_CHUNK):
        c = x[i:i + NORM_CHUNK]
        total += float(np.dot(c, c))
    return float(np.sqrt(total))


def _delta_norm(delta: np.ndarray, base_version: int) -> float:
    """The norm bound's default measure: the delta's own norm (float64: float32 squares can overflow)."""
    return l2_norm(delta)


def judged_norm(delta: np.ndarray, base: np.ndarray | None, current: np.ndarray, mixes_models: bool) -> float:
    """What the norm bound judges of `delta`, computed from the published `base` (None: no longer held).

    Always at most the distance of the agent's model from the current one, |base + delta - current|
    (an honest late agent whose model lands near ours passes), and never more than what the strategy
    applies. A strategy that mixes the agent's model in (fedasync: x + a (base + delta - x)) applies that
    distance, so it is judged alone. One that adds the delta (fedbuff, fedavg, a tier partition) applies
    the delta: there the smaller of the delta's norm and the distance. A slow device's honest delta from a
    base many versions old has a typical norm while its distance holds the fleet's movement since, which
    refused every update of the slowest devices at the defaults (docs/benchmarks.md section 16). An
    attacker gains nothing by it: a delta of norm within the bound is a row it could send from a fresh base.
    """
    if base is None:
        return l2_norm(delta)
    local = np.add(base, delta, dtype=np.float64)
    local -= current
    distance = l2_norm(local)
    return distance if mixes_models else min(distance, l2_norm(delta))


def metrics_problem(metrics: dict[str, float]) -> str | None:
    """Why reported metrics are impossible (accuracy outside [0, 1], a negative loss, r2 > 1), else None."""
    for key, value in metrics.items():
        if "accuracy" in key and not 0.0 <= value <= 1.0:
            return f"{key}={value} outside [0, 1]"
        if "loss" in key and value < 0:
            return f"{key}={value} is negative"
        if key.endswith("r2") and value > 1.0:
            return f"{key}={value} above 1"
    return None


class UpdateValidator:
    """Stateful checks: remembers the highest sequence number of each agent and counts gaps.

    The replay state is never evicted (an evicted agent could replay its old updates): an
    agent beyond `max_agents` is refused (too_many_agents) instead; the broker's ACL bounds
    who can publish at all. A seq more than `max_seq_ahead` seconds ahead of our clock is
    refused (future_seq), so one message cannot lock its agent out with seq 2**63-1.
    """

    def __init__(
        self,
        topics: Topics,
        n_params: int,
        *,
        max_staleness: int = 1000,
        norm: NormBound | None = None,
        norm_action: str = "reject",
        max_agents: int = DEFAULT_MAX_AGENTS,
        max_bytes: int = MAX_MESSAGE_BYTES,
        rate: RateLimit | None = None,
        max_seq_ahead: float = 86_400.0,
        clock=time.time,
        reorder_window: int = 0,
    ) -> None:
        if max_agents < 1:
            raise ValueError(f"--max-agents must be at least 1, got {max_agents}")
        if norm_action not in ("reject", "clip"):
            raise ValueError(f"norm action must be reject or clip, got {norm_action!r}")
        self.topics = topics
        self.n_params = n_params
        self.max_staleness = max_staleness
        self.norm = norm or NormBound()
        self.norm_action = norm_action
        self.max_agents = max_agents
        self.max_bytes = max_bytes
        self.rate = rate
        self.max_seq_ahead = max_seq_ahead
        self.clock = clock
        self.highest_seq: dict[str, int] = {}
        self.gaps_ = 0  # updates agents made that never arrived (see protocol.sequence)
        # seqs of a hole (at most `reorder_window` per agent) that may still arrive late: a broker that
        # redelivers out of order (NATS JetStream after a failover) delivers them after a newer one
        self.reorder_window = reorder_window
        self.missing: dict[str, set[int]] = {}
        # the lowest seq accepted of each agent seen lately for the first time: its own predecessors (a
        # device's resend, a redelivery) may still arrive after it, within the window below its highest
        self.first: dict[str, int] = {}

    def check(self, topic: str, payload: bytes, version: int, admit=None, distance=None) -> Verdict:
        """Validate one payload against the model at `version`.

        `admit(staleness) -> reason | None` lets the strategy refuse (e.g. fedavg rounds).
        `distance(delta, base_version) -> float` is what the norm bound judges (default: the
        delta's norm); the coordinator passes `judged_norm` of the update against the current model.
        """
        try:
            return self._check(topic, payload, version, admit, distance or _delta_norm)
        except ProtocolError as exc:
            return Verdict(exc.reason)
        except Exception:  # a bug of ours must not take the coordinator down
            log.exception("unexpected error validating an update on %s", topic)
            return Verdict("internal")

    def _check(self, topic, payload, version, admit, distance) -> Verdict:
        agent = self.topics.agent_of_update(topic)
        if agent is None:  # the id is the topic's, which the broker's ACL ties to the sender
            return Verdict("topic")
        if self.rate is not None and not self.rate.allow(agent):
            return Verdict("rate")
        msg = decode_update(payload, agent, max_bytes=self.max_bytes)
        if metrics_problem(msg.metrics):
            return Verdict("metrics", msg)
        if msg.delta.n != self.n_params:
            return Verdict("shape", msg)
        if msg.base_version > version:
            return Verdict("future_base", msg)
        last = self.highest_seq.get(msg.agent_id)
        late = last is not None and msg.seq <= last and msg.seq in self.missing.get(msg.agent_id, ())
        head = last is not None and not late and self._head(msg.agent_id, last, msg.seq)
        if last is not None and msg.seq <= last and not late and not head:
            return Verdict("replay", msg)
        if msg.seq > (self.clock() + self.max_seq_ahead) * 1e6:
            return Verdict("future_seq", msg)
        if last is None and len(self.highest_seq) >= self.max_agents:
            return Verdict("too_many_agents", msg)
        if late:  # a hole filled after all: once only
            self.missing[msg.agent_id].discard(msg.seq)
            self.gaps_ -= 1
        elif head:  # older than anything accepted of this agent: what lies between is a hole
            self._hole(msg.agent_id, msg.seq, self.first[msg.agent_id])
            self.first[msg.agent_id] = msg.seq
        else:
            if last is not None:
                self._hole(msg.agent_id, last, msg.seq)
            elif self.reorder_window:
                self.first[msg.agent_id] = msg.seq
            self.highest_seq[msg.agent_id] = msg.seq
            if self.first.get(msg.agent_id, msg.seq) < msg.seq - self.reorder_window:
                del self.first[msg.agent_id]  # nothing older can still be within the window
        staleness = version - msg.base_version
        if staleness > self.max_staleness:
            return Verdict("too_stale", msg, staleness=staleness)
        if admit is not None and (reason := admit(staleness)):
            return Verdict(reason, msg, staleness=staleness)
        try:
            delta = codec.decode(msg.delta).astype(np.float64)
        except ProtocolError as exc:  # keep the update: the audit log names its agent and seq
            return Verdict(exc.reason, msg, staleness=staleness)
        norm = distance(delta, msg.base_version)
        bound = self.norm.limit(msg.agent_id)  # the others' median: its own entry does not judge it
        self.norm.observed(norm, msg.agent_id)
        clipped = False
        if norm > bound:
            to = bound if self.norm_action == "clip" else self.norm.shrink_to(delta, norm, bound, msg.agent_id)
            if to is None:
                self.norm.refused(msg.agent_id)
                return Verdict("norm", msg, staleness=staleness, norm=norm, limit=bound)
            delta *= to / norm  # a stale update (distance from the current model) shrinks as a whole
            norm, clipped = to, True
        n_samples = int(min(msg.n_samples, self.norm.sample_limit(msg.agent_id)))  # inf is never the min: counts are finite
        self.norm.accepted(n_samples, msg.agent_id, delta)
        return Verdict(None, msg, delta, staleness, clipped, n_samples, norm, bound)

    def _hole(self, agent: str, last: int, seq: int) -> None:
        hole = missing_between(last, seq)
        self.gaps_ += hole
        if self.reorder_window and hole:
            missing = self.missing.setdefault(agent, set())
            missing.update(range(max(last + 1, seq - self.reorder_window), seq))
            while len(missing) > self.reorder_window:  # the oldest count as lost for good
                missing.discard(min(missing))

    def _head(self, agent: str, last: int, seq: int) -> bool:
        """`seq` is below the first one accepted of an agent seen lately, within the window below its highest:
        an update made before that one and delivered after it, never seen here (so not a replay)."""
        first = self.first.get(agent)
        return first is not None and last - self.reorder_window <= seq < first

    def restore(self, highest_seq: dict[str, int], gaps: int = 0, missing: dict | None = None,
                first: dict | None = None) -> None:
        """Take over the per-agent sequence numbers, the gap count, the open holes and the first seqs of
        agents seen lately of a checkpoint."""
        self.highest_seq.update(highest_seq)
        self.gaps_ = gaps
        self.missing.update({agent: set(seqs) for agent, seqs in (missing or {}).items()})
        self.first.update(first or {})
