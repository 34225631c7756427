"""Per-agent rate limit: a token bucket per agent, refused updates counted as `rate`."""

import pytest

from coordinator.rate_limit import RateLimit
from coordinator.server import Coordinator
from coordinator.strategies import FedAsync
from coordinator.validation import UpdateValidator
from test_coordinator_core import SPEC, TOPICS, update


class Clock:
    """A settable clock, so refill is tested without waiting."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_burst_then_refill_at_the_rate():
    clock = Clock()
    limit = RateLimit(6, clock=clock)  # 6 per minute: one token every 10 s, bursts of 6
    assert [limit.allow("a") for _ in range(7)] == [True] * 6 + [False]
    clock.now += 9.9
    assert not limit.allow("a")
    clock.now += 0.2  # 10.1 s since the bucket emptied: one token back
    assert limit.allow("a") and not limit.allow("a")
    clock.now += 3600  # a long pause refills to the burst size, not beyond
    assert sum(limit.allow("a") for _ in range(10)) == 6


def test_agents_have_their_own_buckets_and_memory_is_bounded():
    clock = Clock()
    limit = RateLimit(1, max_agents=2, clock=clock)
    assert limit.allow("a") and limit.allow("b") and not limit.allow("a")
    assert limit.allow("c")  # "a" is the least recently seen of three: forgotten
    assert len(limit._buckets) == 2


def test_refused_rates():
    with pytest.raises(ValueError, match="max-agent-rate"):
        RateLimit(0)


def test_flooding_agent_is_refused_before_decoding_and_others_carry_on():
    clock = Clock()
    validator = UpdateValidator(TOPICS, SPEC.n_params, rate=RateLimit(3, clock=clock))
    core = Coordinator(TOPICS, SPEC, FedAsync(alpha=0.5), validator)
    outcomes = [core.handle_update(*update("flood", seq=s, base=core.version_)) for s in range(1, 11)]
    assert outcomes == [None] * 3 + ["rate"] * 7
    assert core.handle_update(TOPICS.update("flood"), b"\x00 garbage") == "rate"  # not even decoded
    assert core.handle_update(*update("honest", seq=1, base=core.version_)) is None
    assert core.rejected_["rate"] == 8 and core.accepted_ == 4
    clock.now += 20  # one token back after 60 / 3 = 20 s; seq 4-10 were never seen, so 11 is fresh
    assert core.handle_update(*update("flood", seq=11, base=core.version_)) is None
