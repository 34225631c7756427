"""Issue 20: central DP in the scale-out tier without a broker: the partition's screen, the root's
buffer rule and noise (the coordinator's CentralDP), the ledger across a checkpoint, the flags."""

from __future__ import annotations

import numpy as np
import pytest

from coordinator.privacy import CentralDP, guard
from coordinator.server import Coordinator
from coordinator.strategies import FedBuff
from coordinator.validation import UpdateValidator
from protocol import accounting, codec
from protocol.messages import UpdateMessage, encode_update
from protocol.model_spec import ModelSpec
from protocol.privacy import GaussianMechanism
from protocol.topics import Topics
from tier import root as tier_root
from tier.partial import PartialSum
from tier.privacy import PartitionDP, RootDP, dp_changed, root_dp

pytest.importorskip("dp_accounting")

TOPICS = Topics("u")
SPEC = ModelSpec("sgd-regressor", 3, ())
CONFIG = {"mode": "central", "clip": 1.0, "noise": 0.8, "delta": 1e-5, "epsilon_budget": None,
          "norm_action": "clip", "neighbours": "add-remove"}


def _update(agent: str, seq: int, delta, n: int = 50) -> bytes:
    enc = codec.encode(np.asarray(delta, dtype=float), "float32", np.random.default_rng(0))
    return encode_update(UpdateMessage(agent, seq, 0, n, enc))


def _partition(config: dict) -> tuple[Coordinator, PartitionDP]:
    dp = PartitionDP(PartialSum(SPEC.n_params), config)
    core = Coordinator(TOPICS, SPEC, dp, guard(UpdateValidator(TOPICS, SPEC.n_params), dp), buffer_timeout=None)
    return core, dp


def test_a_partition_clips_to_c_weighs_one_and_takes_an_agent_once_per_partial():
    core, dp = _partition(CONFIG)
    assert core.handle_update(TOPICS.update("a"), _update("a", 1, [3.0, 4.0, 0.0, 0.0])) is None  # norm 5 -> 1
    assert core.handle_update(TOPICS.update("b"), _update("b", 1, [0.0, 0.0, 0.5, 0.0], n=900)) is None
    assert core.handle_update(TOPICS.update("a"), _update("a", 2, [0.1, 0, 0, 0])) == "dp_repeat"
    total, weight, count, _ = dp.take()
    assert np.allclose(total, [0.6, 0.8, 0.5, 0.0]) and weight == 2 and count == 2  # clipped, one each
    assert dict(dp.contributions) == {"a": 1, "b": 1}
    assert core.handle_update(TOPICS.update("a"), _update("a", 3, [0.1, 0, 0, 0])) is None  # the next partial
    restored = _partition(CONFIG)[1]
    restored.restore(dp.state())
    assert dict(restored.contributions) == {"a": 1, "b": 1}


def test_a_partition_refuses_an_update_over_the_budget():
    budget = (accounting.epsilon(0.8, 2, 1e-5) + accounting.epsilon(0.8, 3, 1e-5)) / 2  # two updates fit, not three
    core, dp = _partition(dict(CONFIG, epsilon_budget=budget))
    for seq in (1, 2):
        assert core.handle_update(TOPICS.update("a"), _update("a", seq, [0.1, 0, 0, 0])) is None
        dp.take()
    assert core.handle_update(TOPICS.update("a"), _update("a", 3, [0.1, 0, 0, 0])) == "dp_budget"


def test_the_root_defers_an_agent_already_in_its_buffer_and_noises_once_as_central_dp():
    central = CentralDP(FedBuff(3, 0.5), GaussianMechanism(1.0, 0.8), 1e-5, rng=np.random.default_rng(7))
    dp = RootDP(central)
    assert dp.verdict(["a", "b"], 1.0) is None
    dp.add(["a", "b"])
    assert dp.verdict(["c", "a"], 1.0) == "later"  # a is in the buffer: after the release
    assert dp.verdict(["c"], 2.0) == "rejected"  # made under a larger clip (the old settings): its updates exceed C
    assert dp.verdict(["c"], None) == "rejected"  # made without DP
    assert dp.verdict(["c"], 0.5) is None  # a smaller clip is within C
    assert dp.verdict(["c", "c"], 1.0) == "rejected"
    assert dp.verdict(["c"], 1.0) is None
    dp.add(["c"])
    step = np.full(4, 0.1)
    noisy = dp.release(step)
    twin = CentralDP(FedBuff(3, 0.5), GaussianMechanism(1.0, 0.8), 1e-5, rng=np.random.default_rng(7))
    twin._members = ["a", "b", "c"]
    assert np.array_equal(noisy, twin._release(step))  # the coordinator's own release, noise and all
    assert dp.members == [] and dp.verdict(["a"], 1.0) is None
    assert dp.report() == twin.report() and dp.report()["releases"] == 1
    dp.add(["a"])
    again = RootDP(CentralDP(FedBuff(3, 0.5), GaussianMechanism(1.0, 0.8), 1e-5))
    again.restore(dp.state())  # the ledger in the root's checkpoint survives a failover
    assert again.members == ["a"] and again.report() == dp.report()


def test_a_worker_follows_the_roots_dp_settings_when_they_change():
    assert not dp_changed(CONFIG, dict(CONFIG)) and not dp_changed(None, {})
    assert dp_changed(None, CONFIG) and dp_changed(CONFIG, None) and dp_changed(CONFIG, dict(CONFIG, clip=2.0))


@pytest.mark.parametrize("flags, message", [
    (["--dp-mode", "central", "--dp-clip", "1", "--dp-noise", "1", "--strategy", "fedasync"], "needs a buffer"),
    (["--dp-clip", "1"], "need --dp-mode"),
    (["--dp-mode", "central", "--dp-clip", "1"], "needs --dp-clip and --dp-noise"),
    (["--dp-mode", "local", "--dp-clip", "1", "--dp-noise", "1"], "central only"),
    (["--dp-mode", "central", "--dp-clip", "1", "--dp-noise", "1", "--dp-noise-by", "agents"], "--secure-aggregation"),
    (["--dp-mode", "central", "--dp-clip", "1", "--dp-noise", "1", "--dp-epsilon-budget", "0"], "must be > 0"),
])
def test_the_root_refuses_what_the_coordinator_refuses(flags, message):
    args = tier_root.build_parser().parse_args(["--nats", "n", "--mqtt", "m", "--fleet", "f", "--model", "sgd-regressor",
                                                "--n-features", "3", *flags])
    with pytest.raises(ValueError, match=message):
        root_dp(args)


def test_a_partition_holds_an_agents_second_update_for_the_next_partial_rather_than_refusing_it():
    from types import SimpleNamespace

    from coordinator.staleness import Constant
    from protocol.messages import ModelMessage
    from tier.worker import Partition

    worker = SimpleNamespace(topics=TOPICS, model=ModelMessage("u", 0, SPEC, np.zeros(SPEC.n_params)), staleness=Constant(),
                             max_staleness=10, max_norm=1e6, dp=CONFIG, secagg=None, nats=None, worker_id="w",
                             max_held_chunks=10, chunk_timeout=60.0, partitions=1)
    part = Partition(worker, 0, SimpleNamespace(epoch=1))
    part.adopt(worker.model)
    part.link = SimpleNamespace(connection=1)
    for seq in (1, 2, 3):
        msg = SimpleNamespace(topic=f"fedmq/u/upd/0/a", payload=_update("a", seq, [0.1, 0, 0, 0]), retain=False,
                              mid=seq, qos=1)
        part._on_message(None, None, msg)
    assert len(part.unacked) == 1 and len(part.held) == 2  # one per partial; the others wait, unacknowledged
    for want in (1, 1, 1):
        assert part.strategy.take()[2] == want
        part.release_held()
    assert part.held == [] and len(part.unacked) == 3 and part.core.rejected_.get("dp_repeat", 0) == 0


def test_the_roots_metrics_build_its_status_once_per_change_not_per_scrape():
    """Every Prometheus scrape read Root.metrics(), which rebuilt the status and ran the accountant over every
    agent's count (RootDP.report). Now scrapes between two changes take the same status; a fold, a release
    or a partition's new refusal counts build it again. Seen red without the cache: 3 reports for 3 scrapes."""
    from types import SimpleNamespace

    from tier.mqtt_link import parse_urls
    from tier.partial import Counts, Partial, encode_counts, encode_partial
    from tier.steps import RootFedBuff

    dp = RootDP(CentralDP(FedBuff(2, 1.0), GaussianMechanism(1.0, 0.8), 1e-5, rng=np.random.default_rng(1)))
    reports = []
    report = dp.report
    dp.report = lambda: reports.append(1) or report()
    root = tier_root.Root(SimpleNamespace(), parse_urls("mqtt://127.0.0.1:1"), TOPICS, SPEC, RootFedBuff(SPEC.n_params, 2),
                          root_id="r", dp=dp)
    n = SPEC.n_params

    def partial(seq, agent):
        return encode_partial(Partial(0, 1, seq, np.full(n, 0.1), 1.0, 1, [(agent, seq, 0)], clip=1.0))

    def scrape() -> dict:  # but its uptime, which each scrape reads afresh
        return {k: v for k, v in root.metrics().items() if k != "uptime_s"}

    scrapes = [scrape() for _ in range(3)]
    assert len(reports) == 1 and scrapes[1] == scrapes[0] == scrapes[2]  # three scrapes, one report
    assert root._fold(partial(1, "a"), []) == "folded"
    assert root.metrics()["folded"] == 1 and len(reports) == 2
    assert root._fold(partial(2, "b"), []) == "folded"
    root._step()  # the buffer of 2 is released
    released = scrape()
    assert released["privacy"]["releases"] == 1 and released["privacy"]["agents"] == 2 and len(reports) == 3
    assert scrape() == released and len(reports) == 3
    assert root._fold(encode_counts(Counts(0, {"decode": 4}, {})), []) == "counts"
    assert root.metrics()["updates_rejected"] == {"decode": 4} and len(reports) == 4
