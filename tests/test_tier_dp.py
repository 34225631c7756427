"""Issue 20: central DP in the scale-out tier, real processes on a real 3-node JetStream cluster.

Two roots (one active, one standby) with --dp-mode central, one partition worker, two devices
sending the same pre-encoded update. The buffer is K=3 and there are only two agents, so a buffer
can fill only by taking an agent twice: the root must defer such partials and release each buffer
at its timeout with each agent once. The active root is killed -9 mid-run; the standby carries the
ledger on. At the end: every update folded exactly once, no release holds an agent twice, the
published model is the noise-free steps plus noise of the calibrated size, and the status's epsilon
is what the single coordinator's CentralDP accountant gives for the same releases."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from coordinator.privacy import CentralDP
from coordinator.strategies import FedBuff
from protocol import codec
from protocol.privacy import GaussianMechanism
from tier.fleet import ModelWatch, Publisher, Tier, check_exactly_once, wait_folded, wait_until

pytest.importorskip("dp_accounting")

CLIP, SIGMA, K = 1.0, 1.0, 3


_wait = wait_until


def test_central_dp_at_the_root_noises_each_release_once_and_accounts_as_the_coordinator(tmp_path, nats_cluster):
    tier = Tier(nats_cluster, tmp_path, partitions=nats_cluster.partitions, buffer_size=K,
                root_args=("--dp-mode", "central", "--dp-clip", CLIP, "--dp-noise", SIGMA))
    watch = ModelWatch(nats_cluster)
    publisher = None
    try:
        tier.start_root()
        tier.start_root()
        tier.start_worker()
        assert watch.wait_version_above(-1, 60) is not None, "no retained model from the root\n" + tier.logs()
        publisher = Publisher(nats_cluster, watch, agents=2, rate=2.0)
        publisher.start()
        assert watch.wait_version_above(2, 60) is not None, "the model never advanced\n" + tier.logs()
        active = watch.status.get("root")
        assert active in tier.roots, f"status names root {active!r}"
        tier.kill(active)  # the ledger must survive the failover
        at = watch.version
        assert watch.wait_version_above(at + 1, 60) is not None, "no release after the root kill\n" + tier.logs()
        assert publisher.stop_and_drain(30), f"{len(publisher.outstanding)} update(s) never acknowledged"
        records = wait_folded(tier.audit, publisher.sent, 45)
        check_exactly_once(records, publisher.sent)

        releases = collections.defaultdict(list)  # version folded at -> the agents of that release
        for r in records:
            releases[r["version"]].append(r["agent"])
        assert sorted(releases) == list(range(len(releases))), "a release is missing from the audit log"
        for version, agents in releases.items():
            assert len(agents) == len(set(agents)), f"release {version} took an agent twice: {agents}"
        assert _wait(lambda: watch.status.get("version") == len(releases) and watch.latest.version == len(releases),
                     30), f"the last release never came: {watch.status}\n" + tier.logs()

        twin = CentralDP(FedBuff(K), GaussianMechanism(CLIP, SIGMA), 1e-5)  # the coordinator's accountant
        for version in sorted(releases):
            twin.release(np.zeros(1), releases[version])
        privacy = watch.status["privacy"]
        assert privacy["releases"] == len(releases) == twin.releases
        assert privacy["epsilon"] == pytest.approx(twin.report()["epsilon"], rel=1e-9) and privacy["epsilon"] > 0

        # noise-free, every release steps by the one update all devices send (norm < C, weight 1, lr 1)
        residual = watch.latest.params - len(releases) * codec.decode(publisher.delta)
        expected = np.sqrt(sum((SIGMA * CLIP / len(agents)) ** 2 for agents in releases.values()))
        ratio = float(np.sqrt(np.mean(residual ** 2))) / expected
        print(f"{len(publisher.sent)} updates in {len(releases)} releases, epsilon {privacy['epsilon']:.3f}, "
              f"noise rms / expected std {ratio:.2f}")
        assert 0.35 < ratio < 1.9, f"noise rms {ratio:.2f} x the calibrated std"
    finally:
        if publisher is not None:
            publisher.close()
        watch.close()
        tier.stop()
