"""fedbuff --buffer-memory (MIFA): every step aggregates each remembered agent's newest row, against
hand-computed values; the memory bound, checkpoints both ways, and the flags it refuses."""

import numpy as np
import pytest

from coordinator.cli import parse_args
from coordinator.staleness import Constant, Polynomial
from coordinator.strategies import FedBuff, FedBuffMemory, make_strategy


def test_a_slow_agents_row_enters_every_step_until_it_sends_again():
    s = FedBuffMemory(buffer_size=2, staleness=Constant(), memory=10)
    x = np.zeros(2)
    assert s.add(x, np.array([9.0, 0.0]), 1, 0, agent="slow") is None
    out = s.add(x, np.array([0.0, 3.0]), 1, 0, agent="fast")  # K = 2 fresh: step over both
    np.testing.assert_allclose(out, [4.5, 1.5])
    assert s.pending == 0 and s.buffer()["remembered"] == 2
    assert s.add(out, np.array([0.0, 6.0]), 1, 0, agent="fast") is None  # a repeat is one fresh row
    out = s.add(out, np.array([3.0, 0.0]), 2, 0, agent="other")
    # rows: slow [9,0] x1 (remembered), fast [0,6] x1, other [3,0] x2 capped at the lower median (1): / 3
    np.testing.assert_allclose(out, [4.5 + 4.0, 1.5 + 2.0])
    plain = FedBuff(buffer_size=2, staleness=Constant())  # the same updates without memory forget "slow"
    plain.add(x, np.array([9.0, 0.0]), 1, 0, agent="slow")
    y = plain.add(x, np.array([0.0, 3.0]), 1, 0, agent="fast")
    plain.add(y, np.array([0.0, 6.0]), 1, 0, agent="fast")
    np.testing.assert_allclose(plain.add(y, np.array([3.0, 0.0]), 2, 0, agent="other"), [4.5 + 1.5, 1.5 + 3.0])  # 2 -> 1


def test_rows_are_weighted_for_staleness_when_they_arrive():
    s = FedBuffMemory(buffer_size=1, server_lr=2.0, staleness=Polynomial(1.0), memory=10)
    out = s.add(np.zeros(1), np.array([4.0]), 1, 3, agent="a")  # w(3) = 1/4
    np.testing.assert_allclose(out, [2.0])


def test_the_least_recently_heard_agent_is_forgotten_beyond_the_memory():
    s = FedBuffMemory(buffer_size=5, staleness=Constant(), memory=2)
    x = np.zeros(1)
    for agent, v in (("a", 100.0), ("b", 1.0), ("c", 3.0)):
        s.add(x, np.array([v]), 1, 0, agent=agent)
    assert s.buffer()["remembered"] == 2 and s.buffered_agents() == {"b", "c"} and s.pending == 2
    np.testing.assert_allclose(s.flush(x), [2.0])  # a's 100 is gone


def test_one_agents_claimed_count_is_capped_across_the_memory():
    s = FedBuffMemory(buffer_size=3, staleness=Constant(), memory=10)
    x = np.zeros(1)
    s.add(x, np.array([0.0]), 1, 0, agent="a")
    s.add(x, np.array([0.0]), 1, 0, agent="b")
    out = s.add(x, np.array([10.0]), 10**9, 0, agent="liar")  # capped at the lower median count (1)
    np.testing.assert_allclose(out, [10.0 / 3])
    assert s.bounded_["weight_cap"] == 1


def test_checkpoint_round_trip_and_a_restart_without_memory_keeps_the_fresh_rows():
    s = FedBuffMemory(buffer_size=3, staleness=Constant(), memory=10)
    x = np.zeros(1)
    s.add(x, np.array([1.0]), 1, 0, agent="a")
    s.add(x, np.array([2.0]), 1, 0, agent="b")
    s.flush(x)
    s.add(x, np.array([5.0]), 1, 0, agent="c")
    state = s.state()
    back = FedBuffMemory(buffer_size=3, staleness=Constant(), memory=10)
    back.restore(state)
    assert back.pending == 1 and back.buffer()["remembered"] == 3 and back.buffered_agents() == {"c"}
    np.testing.assert_allclose(back.flush(x), s.flush(x))
    plain = FedBuff(buffer_size=3, staleness=Constant())
    plain.restore(state)  # --buffer-memory dropped at a restart: the fresh row is the buffer
    assert plain.pending == 1 and plain.buffered_agents() == {"c"}
    with pytest.raises(ValueError, match="does not fit"):
        FedBuffMemory(buffer_size=3, memory=2).restore(state)
    for strategy in (FedBuff(buffer_size=3), FedBuffMemory(buffer_size=3, memory=10)):  # a corrupt checkpoint
        with pytest.raises(ValueError, match="does not fit"):
            strategy.restore(dict(state, samples=state["samples"][:-1]))


def test_make_strategy_and_the_flags_it_refuses(capsys):
    assert isinstance(make_strategy("fedbuff", memory=5), FedBuffMemory)
    assert type(make_strategy("fedbuff")) is FedBuff
    for argv, match in ((["--strategy", "fedasync", "--buffer-memory", "5"], "needs --strategy fedbuff"),
                        (["--strategy", "fedbuff", "--buffer-memory", "5", "--dp-mode", "central", "--dp-clip", "1",
                          "--dp-noise", "1"], "does not combine")):
        with pytest.raises(SystemExit):
            parse_args(["--broker", "mqtt://127.0.0.1:1", "--fleet", "f", "--model", "sgd-classifier", "--n-features", "3", "--classes", "0,1", *argv])
        assert match in capsys.readouterr().err
    with pytest.raises(ValueError, match=">= 1"):
        FedBuffMemory(memory=0)


def test_a_coordinator_checkpoint_holds_the_memory_and_resumes_with_it(tmp_path):
    from coordinator.store import load_checkpoint
    from test_coordinator_core import make_core, update

    core = make_core(FedBuffMemory(buffer_size=2, staleness=Constant(), memory=10), checkpoint_dir=str(tmp_path))
    for agent, seq in (("slow", 1), ("fast", 1), ("fast", 2)):
        assert core.handle_update(*update(agent, seq, base=core.version_)) is None
    assert core.version_ == 1 and core.strategy.pending == 1
    core.checkpoint()
    resumed = make_core(FedBuffMemory(buffer_size=2, staleness=Constant(), memory=10), resume=load_checkpoint(tmp_path))
    assert resumed.strategy.buffer()["remembered"] == 2 and resumed.strategy.buffered_agents() == {"fast"}
    for c in (core, resumed):  # the next step aggregates the same three rows in both
        c.handle_update(*update("other", 1, base=c.version_))
    np.testing.assert_array_equal(resumed.params_, core.params_)
