"""Secure aggregation at the coordinator: cohorts of K agents, one masking round each, the
unmasked *sum* handed to fedbuff as one step (protocol/secagg.py has the math, docs/security.md
the threat model).

A round, driven by messages in (`handle`) and the clock (`tick`), with messages out in `outbox`:

1. cohort: K agents whose retained key announcement (`secagg/key/<id>`) is fresh and whose
   status is not offline are announced on `secagg/cohort` with their public keys, the
   threshold t, the clip and the quantization scale; their keys are then spent (an agent
   announces a new key for every delta it holds, so every round has fresh keys);
2. shares: each member sends its encrypted Shamir shares (`secagg/share/<id>`); those that
   did form U1 (|U1| >= t, else the round aborts); each member of U1 gets the shares
   addressed to it and U1 on `secagg/inbox/<id>`;
3. masked: each member of U1 sends its masked input (`secagg/masked/<id>`); those that did
   form U2 (|U2| >= t, else abort); `secagg/unmask` names U2 and the dropped U1 - U2;
4. reveal: survivors send the shares of U2's self-mask seeds and of the dropped agents'
   mask keys (`secagg/reveal/<id>`); from t of them the coordinator removes every mask and
   decodes the sum of |U2| quantized deltas, which `SecureFedBuff` applies as one step.

A stage that has not completed `timeout` seconds after it began closes with whoever
answered; fewer than t aborts the round (counted by reason). Only one round runs at a time;
agents outside it keep training and announcing, and join the next. No single update is ever
held unmasked here: clear updates on `update/<id>` are refused (`plaintext`).
The round in flight is part of the checkpoint (`state`, committed with the model before any
of its messages is acknowledged, and before the messages it produced are published), so a
coordinator killed mid-round resumes it: the restored round republishes its stage's messages
(cohort, inboxes or unmask request; an agent answers each round once, so it ignores one it has
already answered), the broker redelivers what was not acknowledged, and the round completes
once, from the same masked inputs, with fresh deadlines. The key ids spent are kept too, so a
key still retained from a finished round is not taken again.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from coordinator.presence import MAX_STATUS_BYTES, status_state
from coordinator.server import Coordinator, _finite_on_the_wire
from coordinator.strategies import FedBuff, Strategy
from protocol import accounting
from protocol import secagg as sa
from protocol.privacy import GaussianMechanism, gaussian_noise, secure_rng
from protocol.topics import Topics

log = logging.getLogger(__name__)

DEFAULT_CLIP = 10.0
DEFAULT_TIMEOUT = 10.0
DEFAULT_GRACE = 2.0  # seconds a stage waits for the rest once t members have answered
DEFAULT_BACKOFF = 30.0  # first exclusion of a member that misbehaved; doubles per strike
MAX_BACKOFF = 3600.0


class SecureCentralDP:
    """Central DP over secure aggregation: N(0, (sigma C)^2 I) added to each cohort's decoded sum.

    The coordinator cannot see a single delta, so the L2 clip to C is the agents' (the cohort
    message carries C; edge_agent/secagg.py clips so that even the quantized delta is within C).
    One agent takes part in a cohort at most once, so removing one agent moves the sum by at most
    C, as for `CentralDP`; each agent's epsilon is the RDP composition of the cohorts it was
    summed in, and with `epsilon_budget` an agent is no longer taken into a cohort once one more
    would exceed it. With `noise_by="coordinator"` the guarantee is for what is published (the
    models): the coordinator decodes the sum before adding the noise. With `noise_by="agents"`
    (distributed DP) each member adds N_Z(0, (sigma C)^2 / t) itself, on the quantization lattice,
    inside its masked input: any t or more honest survivors put at least (sigma C)^2 of noise in
    the sum, so the coordinator only ever decodes a noised sum and adds nothing.
    """

    def __init__(self, mechanism: GaussianMechanism, delta: float, *, epsilon_budget: float | None = None,
                 rng: np.random.Generator | None = None, noise_by: str = "coordinator") -> None:
        if noise_by not in ("coordinator", "agents"):
            raise ValueError(f"--dp-noise-by must be coordinator or agents, got {noise_by!r}")
        self.noise_by = noise_by
        accounting.epsilon(mechanism.noise_multiplier, 1, delta)  # checks delta and that dp-accounting is installed
        if epsilon_budget is not None and not epsilon_budget > 0:
            raise ValueError(f"--dp-epsilon-budget must be > 0, got {epsilon_budget}")
        self.mechanism = mechanism
        self.delta = delta
        self.epsilon_budget = epsilon_budget
        self.rng = rng if rng is not None else secure_rng()
        self.contributions: Counter[str] = Counter()  # agent -> cohorts summed with its delta
        self.releases = 0

    def eligible(self, agent: str) -> bool:
        """May `agent` join a cohort: one more contribution stays within the budget."""
        return self.epsilon_budget is None or accounting.epsilon(
            self.mechanism.noise_multiplier, self.contributions[agent] + 1, self.delta) <= self.epsilon_budget

    def release(self, total: np.ndarray, members: list[str]) -> np.ndarray:
        """The sum with its noise (already in it when the agents add it); the members' contributions counted."""
        noisy = np.asarray(total, dtype=np.float64)
        if self.noise_by == "coordinator":
            noisy = noisy + gaussian_noise(np.shape(total), self.mechanism.std, self.rng)
        self.contributions.update(members)
        self.releases += 1
        return noisy

    def agent_noise(self, threshold: int) -> float | None:
        """Distributed DP: the std each of a cohort's members adds, sigma C / sqrt(t); None if the coordinator noises."""
        return self.mechanism.std / float(np.sqrt(threshold)) if self.noise_by == "agents" else None

    def state(self) -> dict:
        return {"contributions": dict(self.contributions), "releases": self.releases}

    def restore(self, state: dict | None) -> None:
        state = state or {}
        self.contributions = Counter({str(k): int(v) for k, v in (state.get("contributions") or {}).items()})
        self.releases = int(state.get("releases", 0))

    def report(self) -> dict:
        report = accounting.fleet_report(self.contributions, self.mechanism.noise_multiplier, self.delta,
                                         "central", self.mechanism.clip_norm, self.releases)
        report.update(epsilon_budget=self.epsilon_budget, secure_aggregation=True, noise_by=self.noise_by)
        return report


class SecureFedBuff(Strategy):
    """fedbuff whose buffer is a secure-aggregation round: it only ever sees the sum of K deltas."""

    def __init__(self, inner: FedBuff, dp: SecureCentralDP | None = None) -> None:
        if not isinstance(inner, FedBuff) or inner.name != "fedbuff":
            raise ValueError("secure aggregation needs --strategy fedbuff")
        if inner.aggregate_name != "mean":
            raise ValueError(f"secure aggregation yields only a sum: --aggregate mean, not {inner.aggregate_name!r}")
        self.inner = inner
        self.dp = dp
        self.name = "fedbuff+secagg" + ("+central-dp" if dp is not None else "")

    @property
    def buffer_size(self) -> int:
        """K: agents per cohort."""
        return self.inner.buffer_size

    def admit(self, staleness: int) -> str | None:
        return "plaintext"  # an update in the clear is never taken under secure aggregation

    def add(self, params, delta, n_samples, staleness, base=None):
        raise RuntimeError("SecureFedBuff takes sums only (add_sum)")

    def add_sum(self, params: np.ndarray, total: np.ndarray, count: int, members: list[str] = ()) -> np.ndarray:
        """x <- x + eta * total / count: the equal-weight fedbuff step over a cohort's sum (with central
        DP: over the sum plus its noise, the `members` counted)."""
        if self.dp is not None:
            total = self.dp.release(total, list(members))
        return params + self.inner.server_lr * np.asarray(total, dtype=np.float64) / count


@dataclass
class Announcement:
    """An agent's retained key announcement."""

    key_id: bytes
    c: bytes
    s: bytes
    version: int
    b_hash: bytes = b""  # SHA-256 commitment to the self-mask seed (sa.seed_commitment)


@dataclass
class Round:
    """One cohort's masking round."""

    id: bytes
    members: dict[str, Announcement]
    threshold: int
    scale: float
    stage: str  # shares, masked, reveal
    deadline: float
    started: float
    clip: float = DEFAULT_CLIP  # the per-coordinate clip this round's members quantized with
    count_clipped: bool = False  # the masked inputs carry one more coordinate: how many were clipped
    shares: dict[str, dict[str, bytes]] = field(default_factory=dict)
    u1: list[str] = field(default_factory=list)
    masked: dict[str, np.ndarray] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)
    reveals: dict[str, dict] = field(default_factory=dict)
    complaints: dict[str, list[str]] = field(default_factory=dict)  # member -> members whose share to it did not open


@dataclass
class Result:
    """A completed round: the float sum of `count` deltas."""

    total: np.ndarray
    count: int
    round_id: bytes
    seconds: float
    members: list[str] = field(default_factory=list)  # whose deltas are in the sum
    base_version: int = 0  # the oldest model version the members trained on (their key announcements)


class SecAggRounds:
    """The coordinator's cohort/round state machine; pure (messages in, messages out)."""

    def __init__(
        self, topics: Topics, n_params: int, k: int, threshold: int, *,
        clip: float = DEFAULT_CLIP, timeout: float = DEFAULT_TIMEOUT, l2_clip: float | None = None,
        eligible=None, grace: float = DEFAULT_GRACE, backoff: float = DEFAULT_BACKOFF,
        clip_target: float | None = None, noise: float | None = None,
    ) -> None:
        for flag, value in (("--secagg-timeout", timeout), ("--secagg-grace", grace), ("--secagg-backoff", backoff)):
            if not value > 0:
                raise ValueError(f"{flag} must be > 0, got {value}")
        if k < 2:
            raise ValueError(f"a secure-aggregation cohort needs K >= 2 agents, got {k}")
        if not k // 2 < threshold <= k:
            raise ValueError(f"threshold t must be in {k // 2 + 1}..{k} for K = {k} (a majority), got {threshold}")
        self.topics = topics
        self.n_params = n_params
        self.k = k
        self.threshold = threshold
        if clip_target is not None and not 0 < clip_target < 1:
            raise ValueError(f"--secagg-clip-target must be in (0, 1), got {clip_target}")
        if l2_clip is not None:  # a delta of L2 norm <= C has every coordinate within C: clip nothing more
            clip, clip_target = l2_clip, None  # and no clip count, an un-noised statistic, under central DP
        self.clip = clip
        self.clip_target = clip_target  # adapt the clip after each round towards this fraction clipped
        self.clipped_fraction_: float | None = None  # of the last completed round's coordinates
        self.timeout = timeout
        self.grace = grace
        self.backoff = backoff
        if noise is not None and (l2_clip is None or not noise > 0):
            raise ValueError("agents' noise (distributed DP) needs an L2 clip and a std > 0")
        self.noise = noise  # distributed DP: the std each member adds (float units)
        self.scale = sa.choose_scale(clip, k, noise or 0.0)
        # central DP: agents clip each delta to L2 norm l2_clip, quantization included (edge_agent/secagg.py)
        if l2_clip is not None and not l2_clip > 2 * sa.quantization_margin(n_params, self.scale):
            raise ValueError(f"--dp-clip {l2_clip} is below the quantization step of {n_params} coordinates")
        self.l2_clip = l2_clip
        self.eligible = eligible  # agent -> may it join a cohort (a DP budget); None: all
        # deltas trained before this version (the newest feature-scaling change) wait for a retrain:
        # a cohort's sum is re-expressed as a whole, so its members share one scaling
        self.min_version = 0
        self.keys: dict[str, Announcement] = {}
        self.spent: set[bytes] = set()  # key ids already used in a cohort
        self.offline: set[str] = set()
        self.round: Round | None = None
        self.outbox: list[tuple[str, bytes, bool]] = []
        self.completed_ = 0
        self.aborted_: Counter[str] = Counter()
        self.refused_: Counter[str] = Counter()
        self.summed_ = 0  # deltas that entered the model through completed rounds
        self.last_seconds_: float | None = None
        self.last_round_: bytes | None = None  # id of the newest completed round
        self.resumed_ = 0  # rounds taken up again from a checkpoint after a restart
        self._result: Result | None = None
        # members that misbehaved in a round (no answer, garbage shares, a bad reveal) are left out of
        # cohorts for backoff * 2^(strikes - 1) seconds; a round they complete clears their strikes
        self.strikes: Counter[str] = Counter()
        self.banned: dict[str, tuple[float, str]] = {}  # agent -> (monotonic time it may return, why)
        self.excluded_: Counter[str] = Counter()  # exclusions by reason
        self.now_ = 0.0

    @property
    def subscriptions(self) -> list[str]:
        """The filters the coordinator subscribes to."""
        t = self.topics
        return [t.all_secagg("key"), t.all_secagg("share"), t.all_secagg("masked"), t.all_secagg("reveal"),
                t.all_agent_statuses]

    def owns(self, topic: str) -> bool:
        """A topic `handle` takes."""
        kind = self.topics.secagg_of(topic)
        return (kind is not None and kind[0] != "inbox") or self.topics.agent_of_status(topic) is not None

    # --- messages in -------------------------------------------------------------------

    def handle(self, topic: str, payload: bytes, now: float | None = None) -> str | None:
        """Take one message; None if used, else why it was refused (counted)."""
        now = time.monotonic() if now is None else now
        self.now_ = now
        try:
            agent = self.topics.agent_of_status(topic)
            if agent is not None:
                if len(payload) > MAX_STATUS_BYTES:  # bounded before json, as in coordinator/presence.py
                    self.refused_["status_oversize"] += 1
                    return "status_oversize"
                self._status(agent, payload)
                if self.round is not None:
                    self._hurry(now)
                return None
            kind, agent = self.topics.secagg_of(topic) or (None, None)
            if kind == "key":
                self._key(agent, payload)
            elif kind in ("share", "masked", "reveal"):
                getattr(self, f"_{kind}")(agent, sa.decode(payload, kind, members=self.k, n_params=self.n_params + 1), now)  # + a clipped count
            else:
                raise sa.SecAggError(f"not a secure-aggregation topic: {topic}")
        except sa.SecAggError as exc:
            log.debug("refused %s: %s", topic, exc)
            self.refused_[topic.rsplit("/", 2)[-2]] += 1
            return str(exc)
        except Exception:  # a bug of ours must not stop the network thread
            log.exception("unexpected error on %s", topic)
            self.refused_["internal"] += 1
            return "internal"
        return None

    def _status(self, agent: str, payload: bytes) -> None:
        state = status_state(payload)
        if state is not None:
            (self.offline.add if state == "offline" else self.offline.discard)(agent)

    def _key(self, agent: str, payload: bytes) -> None:
        if not payload:  # retained key cleared
            self.keys.pop(agent, None)
            return
        m = sa.decode(payload, "key", members=self.k)
        key_id, c, s, version, b_hash = m.get("key_id"), m.get("c"), m.get("s"), m.get("version"), m.get("b_hash")
        for value, n, what in ((key_id, 16, "key id"), (c, 32, "c key"), (s, 32, "s key"), (b_hash, 32, "seed commitment")):
            sa._check_len(value, n, what)
        if not isinstance(version, int):
            raise sa.SecAggError("key announcement without a model version")
        self.keys[agent] = Announcement(key_id, c, s, version, b_hash)
        r = self.round
        if r is not None and r.stage == "shares" and agent in r.members and agent not in r.shares:
            self._hurry(self.now_)  # a member re-keyed before sharing: it (and whoever saw its new key) will not answer

    def _current(self, m: dict, agent: str, stage: str) -> Round:
        r = self.round
        if r is None or m.get("round") != r.id:
            raise sa.SecAggError("not the current round")
        if r.stage != stage:
            raise sa.SecAggError(f"round is at stage {r.stage}, not {stage}")
        if agent not in r.members:
            raise sa.SecAggError(f"{agent} is not in the cohort")
        return r

    def _share(self, agent: str, m: dict, now: float) -> None:
        r = self._current(m, agent, "shares")
        to = m.get("to")
        if not isinstance(to, dict) or set(to) != set(r.members) - {agent} or agent in r.shares:
            raise sa.SecAggError("shares must go to every other member, once")
        if any(not isinstance(v, bytes) or len(v) > 1024 for v in to.values()):
            raise sa.SecAggError("malformed share")
        r.shares[agent] = to
        if len(r.shares) == len(r.members):
            self._close_shares(now)
        else:
            self._hurry(now)

    def _masked(self, agent: str, m: dict, now: float) -> None:
        r = self._current(m, agent, "masked")
        if agent not in r.u1 or agent in r.masked:
            raise sa.SecAggError("masked input from outside U1, or twice")
        bad = m.get("bad", [])
        if not isinstance(bad, list) or not set(bad) <= set(r.u1) - {agent} or len(set(bad)) != len(bad):
            raise sa.SecAggError("a masked input names members outside U1 as bad")
        r.masked[agent] = sa.unpack_vector(m.get("y"), self.n_params + r.count_clipped)
        if bad:
            r.complaints[agent] = sorted(bad)
        if len(r.masked) == len(r.u1):
            self._close_masked(now)
        else:
            self._hurry(now)

    def _reveal(self, agent: str, m: dict, now: float) -> None:
        r = self._current(m, agent, "reveal")
        b, s = m.get("b"), m.get("s")
        if agent not in r.masked or agent in r.reveals:
            raise sa.SecAggError("reveal from a non-survivor, or twice")
        bad = set(r.complaints.get(agent, ()))  # it holds no share of the members it named
        if not isinstance(b, dict) or not isinstance(s, dict) or set(b) != set(r.masked) - bad \
                or set(s) != set(r.dropped) - bad:
            raise sa.SecAggError("a reveal must hold a share of every survivor's seed and every dropped agent's key")
        r.reveals[agent] = {"b": b, "s": s}
        if len(r.reveals) == len(r.masked):
            self._finish(now)
        else:
            self._hurry(now)

    # --- the clock ---------------------------------------------------------------------

    def tick(self, now: float | None = None) -> Result | None:
        """Close a stage past its deadline, start a cohort when K agents are ready; a completed round's sum."""
        now = time.monotonic() if now is None else now
        self.now_ = now
        r = self.round
        if r is not None and now >= r.deadline:
            if r.stage == "shares":
                self._close_shares(now)
            elif r.stage == "masked":
                self._close_masked(now)
            elif len(r.reveals) >= r.threshold:
                self._finish(now)
            else:
                self._exclude(set(r.masked) - set(r.reveals), "no_reveal", now)
                self._abort("too_few_reveals", f"{len(r.reveals)} of {r.threshold} reveals")
        if self.round is None:
            self._maybe_start(now)
        result, self._result = self._result, None
        return result

    def ready(self) -> list[str]:
        """Agents a cohort may take now: a fresh key, not offline, not excluded."""
        return [a for a, ann in self.keys.items() if ann.key_id not in self.spent and a not in self.offline
                and ann.version >= self.min_version and not self._banned(a)
                and (self.eligible is None or self.eligible(a))]

    # --- members that misbehave ----------------------------------------------------------

    def _banned(self, agent: str) -> bool:
        ban = self.banned.get(agent)
        if ban is not None and ban[0] <= self.now_:
            del self.banned[agent]
            return False
        return ban is not None

    def _exclude(self, agents, reason: str, now: float) -> None:
        """Leave `agents` out of the next cohorts for a back-off that doubles with each strike."""
        for agent in sorted(agents):
            self.strikes[agent] += 1
            seconds = min(self.backoff * 2 ** (self.strikes[agent] - 1), MAX_BACKOFF)
            self.banned[agent] = (now + seconds, reason)
            self.excluded_[reason] += 1
            log.warning("secure aggregation: %s excluded from cohorts for %g s (%s, strike %d)",
                        agent, seconds, reason, self.strikes[agent])

    def _stage_sets(self, r: Round) -> tuple[set, set]:
        """(who answered, who is expected) at the round's stage."""
        return {"shares": (set(r.shares), set(r.members)), "masked": (set(r.masked), set(r.u1)),
                "reveal": (set(r.reveals), set(r.masked))}[r.stage]

    def _rekeyed(self, r: Round) -> set[str]:
        """Members that announced a new key before sending their shares: the model moved and they trained
        afresh (an agent re-keys for every delta), so they never answer this cohort, and a member that
        already holds the new key refuses the cohort as substituted. Benign, so nobody is struck for it,
        only when the new key is for a newer model: a member re-keying on the same version is not let off."""
        if r.stage != "shares":
            return set()
        return {a for a, ann in r.members.items() if a not in r.shares and a in self.keys
                and self.keys[a].key_id != ann.key_id and self.keys[a].version > ann.version}

    def _hurry(self, now: float) -> None:
        """Bring the stage's deadline forward: `grace` seconds once t have answered; now if everyone
        not yet answered is offline (a member that joined and left), or once members that re-keyed leave
        fewer than t who can still answer."""
        r = self.round
        answered, expected = self._stage_sets(r)
        rekeyed = self._rekeyed(r)
        if len(answered) >= r.threshold:
            r.deadline = min(r.deadline, now + self.grace)
            if expected - answered <= self.offline | rekeyed:
                r.deadline = min(r.deadline, now)
        elif rekeyed and len(expected - rekeyed) < r.threshold:
            r.deadline = min(r.deadline, now)

    def _maybe_start(self, now: float) -> None:
        ready = self.ready()
        if len(ready) < self.k:
            return
        order = np.random.default_rng(int.from_bytes(os.urandom(8), "big")).permutation(len(ready))
        ready = [ready[i] for i in order]
        ready.sort(key=lambda a: -self.keys[a].version)  # the freshest deltas first, ties at random
        members = {a: self.keys[a] for a in sorted(ready[: self.k])}
        self.spent.update(ann.key_id for ann in members.values())
        r = Round(os.urandom(16), members, self.threshold, self.scale, "shares", now + self.timeout, now,
                  clip=self.clip, count_clipped=self.clip_target is not None)
        self.round = r
        self.outbox.append(self._cohort_message(r))
        log.info("secure aggregation: cohort of %d agents, round %s, threshold %d", len(members), r.id.hex()[:8], r.threshold)

    def _cohort_message(self, r: Round) -> tuple[str, bytes, bool]:
        return (self.topics.secagg_cohort, sa.encode(
            "cohort", round=r.id, threshold=r.threshold, clip=r.clip, scale=r.scale, n=self.n_params,
            **({"count_clipped": True} if r.count_clipped else {}),
            **({"noise": float(self.noise)} if self.noise is not None else {}),
            members=[[a, ann.key_id, ann.c, ann.s] for a, ann in r.members.items()],
            **({"l2_clip": float(self.l2_clip)} if self.l2_clip is not None else {})), False)

    def _inboxes(self, r: Round) -> None:
        for j in r.u1:
            inbox = {i: r.shares[i][j] for i in r.u1 if i != j}
            self.outbox.append((self.topics.secagg("inbox", j), sa.encode("inbox", round=r.id, u1=r.u1, shares=inbox), False))

    def _unmask_request(self, r: Round) -> None:
        self.outbox.append((self.topics.secagg_unmask, sa.encode(
            "unmask", round=r.id, survivors=sorted(r.masked), dropped=r.dropped), False))

    def _close_shares(self, now: float) -> None:
        r = self.round
        r.u1 = sorted(r.shares)
        rekeyed = self._rekeyed(r)
        if not rekeyed:
            self._exclude(set(r.members) - set(r.shares), "no_shares", now)
        else:  # the others' silence may be their refusal of its old key: not struck, and their keys, which
            # they still hold (an agent spends its key only by sending shares), may go into the next cohort
            self.spent -= {ann.key_id for a, ann in r.members.items() if a not in r.shares and a not in rekeyed}
        if len(r.u1) < r.threshold:
            self._abort("rekeyed" if rekeyed else "too_few_shares",
                        f"{len(r.u1)} of {len(r.members)} sent shares, {r.threshold} needed"
                        + (f"; {', '.join(sorted(rekeyed))} announced a new key" if rekeyed else ""))
            return
        r.stage, r.deadline = "masked", now + self.timeout
        self._inboxes(r)

    def _close_masked(self, now: float) -> None:
        r = self.round
        self._exclude(set(r.u1) - set(r.masked), "no_masked_input", now)
        if len(r.masked) < r.threshold:
            self._abort("too_few_inputs", f"{len(r.masked)} of {len(r.u1)} sent a masked input, {r.threshold} needed")
            return
        r.dropped = [a for a in r.u1 if a not in r.masked]
        # a member named by two others (or by every other member) as sending a share that does not open
        accusers = Counter(b for bad in r.complaints.values() for b in bad)
        self._exclude({b for b, n in accusers.items() if n >= min(2, len(r.u1) - 1)}, "bad_shares", now)
        # every secret the unmasking needs must have t holders of a good share among the survivors
        short = [a for a in r.u1 if len([h for h in r.masked if a not in r.complaints.get(h, ())]) < r.threshold]
        if short:
            self._abort("bad_shares", f"too few good shares of {', '.join(short)}'s secrets")
            return
        r.stage, r.deadline = "reveal", now + self.timeout
        self._unmask_request(r)

    def _finish(self, now: float) -> None:
        """Unmask from the reveals: every secret checked against its commitment (a seed's hash, a mask
        key's announced public key), shares off the polynomial named and their holders excluded, the
        decoded sum range-checked."""
        r = self.round
        self._exclude(set(r.masked) - set(r.reveals), "no_reveal", now)
        points = sa.share_points(list(r.members))
        holder = {x: a for a, x in points.items()}
        off: set[str] = set()
        try:
            seeds = {}
            for a in r.masked:
                ann = r.members[a]
                seeds[a], bad = self._combine(r, "b", a, lambda sec, ann=ann: sa.seed_commitment(sec, ann.key_id) == ann.b_hash)
                off.update(holder.get(x, "?") for x in bad)
            keys = {}
            for a in r.dropped:
                ann = r.members[a]
                keys[a], bad = self._combine(r, "s", a, lambda sec, ann=ann: sa.KeyPair.from_private(sec).public == ann.s)
                off.update(holder.get(x, "?") for x in bad)
            total = sa.unmask(r.masked, seeds, keys, {a: r.members[a].s for a in r.u1}, r.id)
        except sa.SecAggError as exc:
            self._exclude(off, "bad_reveal", now)
            self._abort("bad_reveal", str(exc))
            return
        self._exclude(off, "bad_reveal", now)  # the sum below is from the other members' good shares
        count = len(r.masked)
        clipped = int(total[-1]) if r.count_clipped else 0
        total = total[:self.n_params]
        try:
            sa.check_sum_range(total, count, r.scale, r.clip, self.noise or 0.0)
            if clipped > count * self.n_params:
                raise sa.SecAggError(f"{clipped} clipped coordinates claimed of {count * self.n_params}")
        except sa.SecAggError as exc:
            self._abort("out_of_range", str(exc))
            return
        if r.count_clipped:  # the next cohorts' clip, from this one's (summed) count of clipped coordinates
            self.clipped_fraction_ = clipped / (count * self.n_params)
            self.clip = sa.adapt_clip(r.clip, self.clipped_fraction_, self.clip_target)
            self.scale = sa.choose_scale(self.clip, self.k)
        for a in set(r.reveals) - off:
            self.strikes.pop(a, None)  # a whole round answered well clears the strikes
        self._result = Result(sa.dequantize_sum(total, r.scale), count, r.id, now - r.started, sorted(r.masked),
                              min(r.members[a].version for a in r.masked))
        self.completed_ += 1
        self.summed_ += count
        self.last_seconds_ = now - r.started
        self.last_round_ = r.id
        log.info("secure aggregation: round %s summed %d masked inputs (%d dropped after masking) in %.2f s",
                 r.id.hex()[:8], count, len(r.dropped), now - r.started)
        self.round = None

    def _combine(self, r: Round, which: str, agent: str, check) -> tuple[bytes, list[int]]:
        shares = {}
        for reveal in r.reveals.values():
            if agent not in reveal[which]:
                continue  # its holder named the member's share as bad
            x, y = reveal[which][agent]
            if not isinstance(x, int) or not isinstance(y, bytes) or x in shares:
                raise sa.SecAggError("malformed or repeated share point")
            shares[x] = int.from_bytes(y, "big")
        return sa.combine_verified(shares, r.threshold, check)

    def _abort(self, reason: str, detail: str) -> None:
        r = self.round
        log.warning("secure aggregation: round %s aborted (%s): %s", r.id.hex()[:8], reason, detail)
        self.aborted_[reason] += 1
        self.round = None

    def take_outbox(self) -> list[tuple[str, bytes, bool]]:
        """The messages to publish, (topic, payload, retain), oldest first."""
        out, self.outbox = self.outbox, []
        return out

    # --- durability --------------------------------------------------------------------

    def state(self) -> dict:
        """For the checkpoint: the round in flight, the key ids spent, the counters (msgpack types)."""
        r = self.round
        live = {ann.key_id for ann in self.keys.values()} | ({ann.key_id for ann in r.members.values()} if r else set())
        return {
            "round": None if r is None else {
                "id": r.id, "threshold": r.threshold, "scale": r.scale, "stage": r.stage, "clip": r.clip,
                "count_clipped": r.count_clipped,
                "members": {a: [ann.key_id, ann.c, ann.s, ann.version, ann.b_hash] for a, ann in r.members.items()},
                "shares": r.shares, "u1": r.u1, "masked": {a: sa.pack_vector(y) for a, y in r.masked.items()},
                "dropped": r.dropped, "reveals": r.reveals, "complaints": r.complaints,
            },
            "strikes": dict(self.strikes), "excluded": dict(self.excluded_), "clip": self.clip,
            "banned": {a: [max(0.0, until - self.now_), why] for a, (until, why) in self.banned.items()},
            "spent": sorted(self.spent & live),  # only ids that may still come back (retained keys)
            "completed": self.completed_, "aborted": dict(self.aborted_), "summed": self.summed_,
            "resumed": self.resumed_,
        }

    def restore(self, state: dict | None, now: float | None = None) -> None:
        """Take a checkpoint's `state()`; a round in flight resumes, its stage's messages queued to go out again."""
        if not state:
            return
        now = time.monotonic() if now is None else now
        self.spent = set(state.get("spent", []))
        self.completed_ = state.get("completed", 0)
        self.aborted_ = Counter(state.get("aborted", {}))
        self.summed_ = state.get("summed", 0)
        self.resumed_ = state.get("resumed", 0)
        if self.clip_target is not None and state.get("clip"):
            self.clip = float(state["clip"])  # the adapted clip goes on where it was
            self.scale = sa.choose_scale(self.clip, self.k)
        self.strikes = Counter(state.get("strikes", {}))
        self.excluded_ = Counter(state.get("excluded", {}))
        self.now_ = now
        self.banned = {a: (now + float(left), why) for a, (left, why) in state.get("banned", {}).items()}
        m = state.get("round")
        if m is None:
            return
        if m["threshold"] != self.threshold or len(m["members"]) != self.k \
                or bool(m.get("count_clipped")) != (self.clip_target is not None):
            log.warning("secure aggregation: the checkpoint's round is for another K, threshold or clip rule; not resumed")
            self.aborted_["restart"] += 1
            return
        wire = self.n_params + bool(m.get("count_clipped"))
        r = Round(m["id"], {a: Announcement(*e) for a, e in m["members"].items()}, m["threshold"], m["scale"],
                  m["stage"], now + self.timeout, now, clip=float(m.get("clip", self.clip)),
                  count_clipped=bool(m.get("count_clipped")), shares=m["shares"], u1=list(m["u1"]),
                  masked={a: sa.unpack_vector(y, wire) for a, y in m["masked"].items()},
                  dropped=list(m["dropped"]), reveals=m["reveals"], complaints=m.get("complaints", {}))
        self.round = r
        self.resumed_ += 1
        if r.stage == "shares":
            self.outbox.append(self._cohort_message(r))
        elif r.stage == "masked":
            self._inboxes(r)
        else:
            self._unmask_request(r)
        log.info("secure aggregation: resumed round %s at stage %s (%d of %d answered)", r.id.hex()[:8], r.stage,
                 len({"shares": r.shares, "masked": r.masked, "reveal": r.reveals}[r.stage]), len(r.members))

    def report(self) -> dict:
        """For the status: rounds completed and aborted, the current stage, agents ready."""
        r = self.round
        return {"k": self.k, "threshold": self.threshold, "clip": self.clip, "scale": self.scale,
                "clip_target": self.clip_target, "clipped_fraction": self.clipped_fraction_,
                "completed": self.completed_, "aborted": dict(self.aborted_), "summed": self.summed_,
                "refused": dict(self.refused_), "ready": len(self.ready()),
                "excluded": dict(self.excluded_),  # members left out of cohorts, by reason
                "excluded_now": {a: why for a, (until, why) in sorted(self.banned.items())[:20] if until > self.now_},
                "grace": self.grace, "backoff": self.backoff,
                "stage": r.stage if r else None, "round": r.id.hex() if r else None, "resumed": self.resumed_,
                "last_round": self.last_round_.hex() if self.last_round_ else None,
                "last_round_seconds": self.last_seconds_}


class SecureCoordinator(Coordinator):
    """The coordinator core with secure aggregation: steps come only from completed rounds."""

    def __init__(self, *args, secagg: SecAggRounds, **kwargs) -> None:
        self.secagg = secagg
        super().__init__(*args, **kwargs)
        if not isinstance(self.strategy, SecureFedBuff):
            raise ValueError("SecureCoordinator needs a SecureFedBuff strategy")

    def state(self) -> dict:
        """The ordinary checkpoint with the secure-aggregation round in flight (`SecAggRounds.state`)."""
        dp = self.strategy.dp
        return dict(super().state(), secagg=self.secagg.state(), secagg_dp=dp.state() if dp is not None else None)

    def _restore(self, state: dict) -> None:
        super()._restore(state)
        self.secagg.restore(state.get("secagg"))
        if self.strategy.dp is not None:
            self.strategy.dp.restore(state.get("secagg_dp"))

    def handle_secagg(self, topic: str, payload: bytes, *, retained: bool = False) -> str | None:
        """One secure-aggregation or agent-status message; None if used, else why not."""
        self.handled_ += 1
        kind = self.topics.secagg_of(topic)
        if retained and kind is not None and kind[0] != "key":
            return "retained"  # only key announcements are retained by design
        return self.secagg.handle(topic, payload)

    def tick(self, now: float | None = None) -> bool:
        """Advance the round; True when a completed round stepped the model."""
        history = self.rescales.history
        self.secagg.min_version = history[-1][0] if history else 0
        result = self.secagg.tick(now)
        if result is None:
            return False
        # trained under the scaling of its members' base version (one for the whole cohort, as
        # cohorts are drawn within one scaling): the sum is re-expressed like a single delta
        total = self.rescales.catch_up(result.total, result.base_version)
        new = self.strategy.add_sum(self.params_, total, result.count, result.members)
        if not _finite_on_the_wire(new):
            self.rejected_["non_finite_model"] += result.count
            return False
        self.accepted_ += result.count
        self.rounds_ += result.count  # a member is in a round once
        self._step(new)
        return True

    def take_outbox(self) -> list[tuple[str, bytes, bool]]:
        """Secure-aggregation messages to publish."""
        return self.secagg.take_outbox()

    def status(self, now: float | None = None) -> dict:
        """The ordinary status with `secure_aggregation`: rounds, aborts, the stage."""
        status = super().status(now)
        status["secure_aggregation"] = self.secagg.report()
        if self.strategy.dp is not None:
            status["privacy"] = self.strategy.dp.report()
        return status

