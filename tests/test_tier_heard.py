"""The root's K shrinks to the agents it heard from recently (tier/heard.py; issue 18 point 5 on the tier): the pure
rule K_eff = max(1, min(K, heard)), its window and warm-up, its bound on memory, its checkpoint, and that a repeating
hostile agent counts once beside the honest ones. tests/test_tier_small_fleet.py runs it on real processes."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from tier.heard import Heard, effective_k
from tier.steps import RootFedAsync, RootFedBuff

W = 15.0  # the window
T0 = 1000.0  # when listening began


@pytest.mark.parametrize(("k", "live", "want"), [(5, None, 5), (5, 2, 2), (5, 0, 1), (5, 5, 5), (5, 9, 5), (1, 3, 1)])
def test_k_shrinks_to_the_agents_heard_and_never_below_one(k, live, want):
    """Seen red with min(K, live) alone (0 for a window heard from nobody) and with K returned whatever was heard."""
    assert effective_k(k, live) == want


def test_the_agents_heard_count_within_the_window_once_a_whole_window_was_listened_to():
    """Before a window is over K stays K (a fresh root would step on its first agent alone); then the agents heard
    within it count, and one silent for longer drops out. Seen red without the warm-up (1 agent at T0 + 1)."""
    heard = Heard(W, 5, T0)
    heard.note(["a", "b", None], T0 + 1)  # an update without a name is not counted
    assert heard.live(T0 + 1) is None and heard.live(T0 + W - 0.1) is None
    heard.note(["b"], T0 + 10)
    assert heard.live(T0 + W) == 2
    assert heard.live(T0 + 1 + W + 0.5) == 1  # a's last partial is older than the window
    assert heard.live(T0 + 10 + W + 0.5) == 0
    assert Heard(0, 5, T0).live(T0 + 10 * W) is None  # --live-window 0: K always


def test_a_flood_of_ids_is_held_in_k_entries_and_only_raises_k():
    """10,000 ids cost K entries and leave K at K; the K newest are exact for min(K, heard) whatever came before.
    Seen red with the cap off (10,000 entries)."""
    heard = Heard(W, 5, T0)
    heard.note([f"sybil-{i}" for i in range(10_000)], T0 + W)
    assert len(heard.state(T0 + W)["agents"]) == 5 and effective_k(5, heard.live(T0 + W)) == 5
    heard.note(["a", "b"], T0 + 2 * W)  # the flood has gone quiet: only the two heard since count
    assert heard.live(T0 + 2 * W + W * 0.9) == 2


def test_four_honest_agents_and_a_repeating_hostile_one_count_five():
    """The hostile agent sends 4 updates, then 2 honest ones, 4 more, 2 honest: with all 5 heard within the window
    K stays 5, so the buffer steps once, on the fifth agent, and the hostile agent owns a fifth of it. Seen red with
    the newest K updates kept instead of the newest K agents (4 agents heard: K shrank to 4)."""
    heard, rule = Heard(W, 5, T0), RootFedBuff(6, 5)
    honest, evil = np.ones(6) / np.sqrt(6), -np.ones(6) / np.sqrt(6)
    now = T0 + W
    for agent in ["evil", "h0", "h1", "h2", "h3"]:  # the round before: every agent sent once
        rule.add(honest * 50, 50.0, 1, np.array([50.0]), [agent])
        heard.note([agent], now)
    rule.resize(heard.live(now))
    assert rule.ready()
    rule.step(np.zeros(6))
    steps = []
    for agent in ["evil"] * 4 + ["h0", "h1"] + ["evil"] * 4 + ["h2", "h3"]:
        now += 0.5
        rule.add((evil if agent == "evil" else honest) * 50, 50.0, 1, np.array([50.0]), [agent])
        heard.note([agent], now)
        rule.resize(heard.live(now))
        assert rule.buffer() == {"size": 5, "effective": 5, "heard_agents": 5}
        if rule.ready():
            steps.append(rule.step(np.zeros(6)))
    assert len(steps) == 1 and rule.count == 0
    assert float((honest @ steps[0] - 1) / -2) == pytest.approx(0.2)  # the hostile agent's share of the step


def test_a_fleet_smaller_than_k_steps_once_each_of_its_agents_sent():
    """Two agents, K = 5: the buffer steps on both (and a lone agent, the only one heard, alone)."""
    heard, rule = Heard(W, 5, T0), RootFedBuff(6, 5)
    now = T0 + W
    for agent in ("a", "b"):
        rule.add(np.ones(6), 1.0, 1, np.array([1.0]), [agent])
        heard.note([agent], now)
        rule.resize(heard.live(now))
    assert rule.buffer()["effective"] == 2 and rule.ready()
    assert RootFedAsync(6).buffer() is None


def test_the_agents_heard_survive_a_takeover_and_an_old_checkpoint_listens_again():
    """A standby restores the entries and when listening began (no second warm-up); a checkpoint older than the
    window, or none, begins listening at the takeover. Seen red without `since` restored (None after the takeover)."""
    heard = Heard(W, 5, T0)
    heard.note(["a", "b"], T0 + W)
    state = msgpack.unpackb(msgpack.packb(heard.state(T0 + W)), raw=False)
    taken = Heard(W, 5, T0 + W + 1)
    taken.restore(state, T0 + W + 1)
    assert taken.live(T0 + W + 1) == 2
    taken.restore(state, T0 + 3 * W)
    assert taken.live(T0 + 3 * W) is None and taken.live(T0 + 4 * W) == 0
    taken.restore(None, T0)
    assert taken.live(T0 + 1) is None


def test_tier_up_hands_the_live_window_to_the_root():
    """scripts/tier-up --live-window reaches the roots' own flag; without it the root's default (3 buffer timeouts)."""
    from tier import root, up

    common = ["--nats", "nats://127.0.0.1:1", "--mqtt", "mqtt://127.0.0.1:1", "--fleet", "f"]
    given = root.build_parser().parse_args(common + up.root_args(up.build_parser().parse_args(["--live-window", "7"])))
    assert given.live_window == 7.0
    assert root.build_parser().parse_args(common + up.root_args(up.build_parser().parse_args([]))).live_window is None
