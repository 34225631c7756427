"""Secure aggregation at the agent: announce a key, answer the cohort, mask, reveal (pure: messages
in, messages out; edge_agent/session.py does the MQTT).

The agent holds its newest float delta instead of publishing it. For each delta it holds it
announces fresh X25519 keys, retained on `secagg/key/<id>`. A cohort naming it with exactly
those keys takes the delta (spent, whatever becomes of the round: the agent then trains
afresh): it sends encrypted Shamir shares of its self-mask seed b and mask key s_sk, then,
given U1 and the shares addressed to it, its masked input (naming the members whose share to it
did not open: forged, altered, garbage), then, asked to unmask, the shares of the survivors' seeds
and of the dropped agents' keys (none of a member it named). It answers each round once and
never reveals both a seed share and a key share of the same agent.

The agent reads every member's retained key announcement itself (the ACL lets only agent X
write `secagg/key/X`) and refuses a cohort whose keys are not the announced ones: a coordinator
that substitutes a peer's keys (to hold both ends of the pairwise masks) gets no shares and no
masked input from it. A peer's newest announcement can reach the coordinator before this agent
(another broker node, a retained message still replicating): a cohort naming a key id this agent
has not read for a peer waits up to `KEY_WAIT` seconds for that peer's announcement, goes on once
the cohort's keys have come, and is refused if they have not by then. Waiting is not enough on a NATS
cluster: an announcement published on one node while this agent's subscription was reaching it is never
delivered (the node's retained store missed it at the subscription, the live route was not there yet;
probed: 4 of 40 such races lost), so the session subscribes to each missing peer's own key topic
(`missing_key_topics`), which brings the retained announcement again.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from protocol import secagg as sa
from protocol.topics import Topics

log = logging.getLogger(__name__)

Message = tuple[str, bytes, bool]  # topic, payload, retain

# At most this many peers' key announcements are held (a bound on memory against a flood of ids;
# a cohort naming a peer not held is refused, as one naming a substituted key).
MAX_DIRECTORY = 100_000

# Seconds a cohort naming a peer key id not read yet waits for that peer's announcement (a delay of
# the broker between two of its nodes): the coordinator's default --secagg-grace, since once t members
# have shared, the stage closes that long after them and a member sharing later is struck anyway.
KEY_WAIT = 2.0


@dataclass
class _Keys:
    key_id: bytes
    c: sa.KeyPair
    s: sa.KeyPair
    version: int
    seed: bytes  # the self-mask seed b, committed to (its hash) in the announcement


@dataclass
class _Round:
    id: bytes
    keys: _Keys
    members: dict[str, tuple[bytes, bytes]]  # id -> (c public, s public)
    threshold: int
    scale: float
    clip: float
    delta: np.ndarray
    seed: bytes
    l2_clip: float | None = None  # central DP's C: the delta is clipped to it, quantization included
    count_clipped: bool = False  # append how many coordinates the clip changed (summed inside the mask)
    noise: float | None = None  # distributed DP: the std (float units) of the noise this agent adds
    stage: str = "shares"  # shares sent -> masked sent -> revealed
    shares: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # sender -> (x, b share, s share)
    u1: list[str] = field(default_factory=list)
    bad: list[str] = field(default_factory=list)  # members of U1 whose share did not open (complained of)


@dataclass
class _Waiting:
    """A cohort naming peer keys not read yet, held until their announcements come or `deadline`."""

    cohort: dict
    missing: dict[str, tuple[bytes, bytes, bytes]]  # peer -> the (key id, c, s) the cohort names
    deadline: float  # monotonic


class SecAggClient:
    """One agent's side of secure aggregation; thread-safe (training and paho's thread call it)."""

    def __init__(self, agent_id: str, topics: Topics, key_wait: float = KEY_WAIT) -> None:
        self.agent_id = agent_id
        self.topics = topics
        self.key_wait = key_wait
        self._waiting: _Waiting | None = None
        self._lock = threading.Lock()
        self._delta: np.ndarray | None = None
        self._keys: _Keys | None = None
        self._round: _Round | None = None
        self._directory: dict[str, tuple[bytes, bytes, bytes]] = {}  # peer -> its announced (key id, c, s)
        self.rounds_ = 0  # rounds this agent masked an input in
        self.refused_ = 0

    @property
    def subscriptions(self) -> list[str]:
        """What the agent reads: the public cohort and unmask topics, its own inbox, every key announcement."""
        t = self.topics
        return [t.secagg_cohort, t.secagg_unmask, t.secagg("inbox", self.agent_id), t.all_secagg("key")]

    def owns(self, topic: str) -> bool:
        """A topic `on_message` takes."""
        kind = self.topics.secagg_of(topic)
        return topic in self.subscriptions or (kind is not None and kind[0] == "key")

    def wants_delta(self, model_version: int) -> bool:
        """Train now: no delta held, or the one held is older than the model."""
        with self._lock:
            return self._keys is None or self._keys.version < model_version

    def hold(self, delta: np.ndarray, version: int) -> Message:
        """Keep `delta` (trained on `version`) for the next cohort; the key announcement to publish."""
        with self._lock:
            self._delta = np.asarray(delta, dtype=np.float64).copy()
            self._keys = _Keys(os.urandom(16), sa.KeyPair.generate(), sa.KeyPair.generate(), version, sa.new_seed())
            if self._waiting is not None:  # it names the keys just replaced
                log.info("secure aggregation: a new delta; the cohort waiting for peers' keys is dropped")
                self._waiting = None
            return self._announcement()

    def announcement(self) -> Message | None:
        """The current key announcement (to republish on reconnection), if a delta is held."""
        with self._lock:
            return self._announcement() if self._keys is not None else None

    def _announcement(self) -> Message:
        k = self._keys
        return (self.topics.secagg("key", self.agent_id),
                sa.encode("key", key_id=k.key_id, c=k.c.public, s=k.s.public, version=k.version,
                          b_hash=sa.seed_commitment(k.seed, k.key_id)), True)

    def on_message(self, topic: str, payload: bytes, now: float | None = None) -> list[Message]:
        """The replies to one message; a refused message is logged and answered with nothing."""
        now = time.monotonic() if now is None else now
        with self._lock:
            self._expire(now)
            try:
                kind = self.topics.secagg_of(topic)
                if kind is not None and kind[0] == "key":
                    self._peer_key(kind[1], payload)
                    return self._key_came(kind[1], now)
                if topic == self.topics.secagg_cohort:
                    return self._cohort(sa.decode(payload, "cohort"), now)
                if topic == self.topics.secagg("inbox", self.agent_id):
                    return self._inbox(sa.decode(payload, "inbox"))
                if topic == self.topics.secagg_unmask:
                    return self._unmask(sa.decode(payload, "unmask"))
            except sa.SecAggError as exc:
                self.refused_ += 1
                log.warning("secure aggregation: refused a message on %s: %s", topic, exc)
            return []

    def missing_key_topics(self) -> list[str]:
        """The key topics of the peers the waiting cohort still lacks (to subscribe to: a new subscription brings
        their retained announcements, one a node lost to a race between a publish and a subscription)."""
        with self._lock:
            w = self._waiting
            return [] if w is None else [self.topics.secagg("key", peer) for peer in sorted(w.missing)]

    def tick(self, now: float | None = None) -> None:
        """Refuse a cohort whose wait for peers' keys is over (the session calls it every poll)."""
        with self._lock:
            self._expire(time.monotonic() if now is None else now)

    def _expire(self, now: float) -> None:
        w = self._waiting
        if w is not None and now >= w.deadline:
            self._waiting = None
            self.refused_ += 1
            log.warning("secure aggregation: refused a message on %s: the cohort's keys for %s are not the ones it "
                        "announced (substituted; no such announcement within %g s)", self.topics.secagg_cohort,
                        ", ".join(sorted(w.missing)), self.key_wait)

    def _key_came(self, peer: str, now: float) -> list[Message]:
        """A peer's announcement, for the waiting cohort: the cohort's key goes on (once all have come). Another
        key changes nothing: a node can hand a subscriber an older retained announcement after the newer one,
        and the cohort is refused at its deadline unless its key comes."""
        w = self._waiting
        if w is None or self._directory.get(peer) != w.missing.get(peer):
            return []
        del w.missing[peer]
        if w.missing:
            return []
        self._waiting = None
        return self._cohort(w.cohort, now, w.deadline)

    # --- the stages --------------------------------------------------------------------

    def _peer_key(self, peer: str, payload: bytes) -> None:
        """Remember `peer`'s announced keys, to check the coordinator's cohort against them."""
        if not payload:  # a retained announcement cleared
            self._directory.pop(peer, None)
            return
        m = sa.decode(payload, "key")
        entry = tuple(sa._check_len(m.get(f), n, f) for f, n in (("key_id", 16), ("c", 32), ("s", 32)))
        if peer not in self._directory and len(self._directory) >= MAX_DIRECTORY:
            raise sa.SecAggError(f"more than {MAX_DIRECTORY} peers' keys held")
        self._directory[peer] = entry

    def _cohort(self, m: dict, now: float, deadline: float | None = None) -> list[Message]:
        """Check a cohort naming this agent and send its shares; held (`_Waiting`) while peers' keys have not
        come, until `deadline` (`key_wait` from now for a new cohort)."""
        members = m.get("members")
        if not isinstance(members, list) or not all(isinstance(e, list) and len(e) == 4 for e in members):
            raise sa.SecAggError("malformed cohort")
        entry = {e[0]: e for e in members if isinstance(e[0], str)}
        mine = entry.get(self.agent_id)
        if mine is None:
            return []  # not in this cohort: keep the delta for the next one
        keys = self._keys
        if keys is None or self._delta is None or mine[1] != keys.key_id or mine[2] != keys.c.public or mine[3] != keys.s.public:
            raise sa.SecAggError("the cohort names a key of this agent that is not its current one")
        round_id, t, scale, clip, n = m.get("round"), m.get("threshold"), m.get("scale"), m.get("clip"), m.get("n")
        k = len(entry)
        if k != len(members) or k < 2 or not isinstance(round_id, bytes) or len(round_id) != 16:
            raise sa.SecAggError("a cohort needs distinct members and a 16-byte round id")
        if not isinstance(t, int) or not k // 2 < t <= k:
            raise sa.SecAggError(f"threshold {t!r} is not a majority of {k}")
        if not isinstance(scale, float) or not isinstance(clip, float) or n != self._delta.size:
            raise sa.SecAggError("cohort scale, clip or length does not fit this agent's delta")
        sa.check_scale(scale, clip, k)
        l2_clip = m.get("l2_clip")
        if l2_clip is not None and (not isinstance(l2_clip, float) or not 2 * sa.quantization_margin(n, scale) < l2_clip < 1e300):
            raise sa.SecAggError(f"cohort L2 clip {l2_clip!r} is not a usable bound")
        missing = {}
        for e in members:
            held = self._directory.get(e[0])
            if e[0] == self.agent_id or held == (e[1], e[2], e[3]):
                continue
            if held is not None and held[0] == e[1]:  # the announced key id with other keys: never a delay
                raise sa.SecAggError(f"the cohort's keys for {e[0]} are not the ones it announced (substituted)")
            missing[e[0]] = (e[1], e[2], e[3])
        count_clipped = m.get("count_clipped", False)
        if not isinstance(count_clipped, bool):
            raise sa.SecAggError("count_clipped must be true or false")
        noise = m.get("noise")
        if noise is not None and (l2_clip is None or not isinstance(noise, float) or not 0 < noise * scale < 2.0**46
                                  or scale * sa.noise_room(noise, k) >= sa.MODULUS // 2):
            raise sa.SecAggError(f"cohort noise {noise!r} is not usable (it needs an L2 clip, and must fit the sum)")
        if missing:
            self._waiting = _Waiting(m, missing, now + self.key_wait if deadline is None else deadline)
            log.info("secure aggregation: a cohort names keys of %s not read yet: waiting up to %g s for them",
                     ", ".join(sorted(missing)), self._waiting.deadline - now)
            return []
        self._waiting = None
        r = _Round(round_id, keys, {a: (e[2], e[3]) for a, e in entry.items()}, t, scale, clip,
                   self._delta, keys.seed, l2_clip, count_clipped, noise)
        self._delta, self._keys = None, None  # spent: a new delta brings new keys
        points = sa.share_points(list(r.members))
        b_shares = sa.split(r.seed, t, list(points.values()))
        s_shares = sa.split(keys.s.private, t, list(points.values()))
        sealed = {}
        for peer, (c_pub, _) in r.members.items():
            x = points[peer]
            if peer == self.agent_id:
                r.shares[peer] = (x, b_shares[x], s_shares[x])  # its own share stays here
                continue
            key = sa.share_key(keys.c.private, c_pub, round_id)
            sealed[peer] = sa.seal_share(key, round_id, self.agent_id, peer, x, b_shares[x], s_shares[x])
        self._round = r
        log.info("secure aggregation: in a cohort of %d (round %s), shares sent", k, round_id.hex()[:8])
        return [(self.topics.secagg("share", self.agent_id), sa.encode("share", round=round_id, to=sealed), False)]

    def _inbox(self, m: dict) -> list[Message]:
        r = self._round
        if r is None or m.get("round") != r.id or r.stage != "shares":
            raise sa.SecAggError("shares for a round this agent is not waiting on (replayed or late)")
        u1, shares = m.get("u1"), m.get("shares")
        if not isinstance(u1, list) or not set(u1) <= set(r.members) or len(set(u1)) != len(u1) \
                or self.agent_id not in u1 or len(u1) < r.threshold:
            raise sa.SecAggError("U1 must be at least t members of the cohort, this agent among them")
        if not isinstance(shares, dict) or set(shares) != set(u1) - {self.agent_id}:
            raise sa.SecAggError("a share from every other member of U1 is needed")
        points = sa.share_points(list(r.members))
        opened, bad = {}, []
        for sender, sealed in shares.items():
            key = sa.share_key(r.keys.c.private, r.members[sender][0], r.id)
            try:
                x, b, s = sa.open_share(key, r.id, sender, self.agent_id, sealed)
                if x != points[self.agent_id]:
                    raise sa.SecAggError(f"the share from {sender} is for another point")
            except sa.SecAggError as exc:  # masking needs no share: mask, and name the sender
                log.warning("secure aggregation: %s", exc)
                bad.append(sender)
                continue
            opened[sender] = (x, b, s)
        r.shares.update(opened)
        r.u1, r.bad = sorted(u1), sorted(bad)
        delta = sa.clip_l2(r.delta, r.l2_clip, r.scale) if r.l2_clip is not None else r.delta
        x = sa.quantize(delta, r.scale, r.clip)
        if r.noise is not None:  # distributed DP: the coordinator never decodes an un-noised sum
            x = sa.add_noise(x, r.noise, r.scale)
        if r.count_clipped:  # one more coordinate: the cohort's sum of it is all the coordinator learns
            x = np.append(x, np.uint32(sa.clipped_count(delta, r.clip)))
        y = sa.mask(self.agent_id, x, r.seed, r.keys.s.private,
                    {a: r.members[a][1] for a in r.u1}, r.id)
        r.stage = "masked"
        self.rounds_ += 1
        return [(self.topics.secagg("masked", self.agent_id),
                 sa.encode("masked", round=r.id, y=sa.pack_vector(y), bad=r.bad), False)]

    def _unmask(self, m: dict) -> list[Message]:
        r = self._round
        if r is None or m.get("round") != r.id:
            return []  # another cohort's round
        if r.stage != "masked":
            raise sa.SecAggError("asked to unmask twice, or before masking")
        survivors, dropped = m.get("survivors"), m.get("dropped")
        if not isinstance(survivors, list) or not isinstance(dropped, list) or set(survivors) & set(dropped) \
                or sorted(set(survivors) | set(dropped)) != r.u1 or len(survivors) + len(dropped) != len(r.u1):
            raise sa.SecAggError("survivors and dropped must split U1")
        if self.agent_id not in survivors or len(survivors) < r.threshold:
            raise sa.SecAggError("fewer survivors than the threshold, or this agent not among them")
        r.stage = "revealed"  # once, whatever follows
        n = sa.SHARE_BYTES
        # no share of a member whose share did not open (the coordinator knows: the masked input named it)
        b = {a: [r.shares[a][0], r.shares[a][1].to_bytes(n, "big")] for a in survivors if a not in r.bad}
        s = {a: [r.shares[a][0], r.shares[a][2].to_bytes(n, "big")] for a in dropped if a not in r.bad}
        self._round = None
        return [(self.topics.secagg("reveal", self.agent_id), sa.encode("reveal", round=r.id, b=b, s=s), False)]
