"""Issue 19 points 3, 4, 5, 7: what central DP must not publish or accept, and its ledgers across restarts."""

import subprocess
import sys

import numpy as np
import pytest

from coordinator.metrics import StatusCollector
from coordinator.privacy import CentralDP, LocalDPLedger, PrivateCoordinator, guard
from coordinator.store import load_checkpoint
from coordinator.strategies import FedAsync, FedBuff
from coordinator.validation import UpdateValidator
from fleet import ROOT
from protocol import accounting, codec
from protocol.messages import UpdateMessage, encode_update
from protocol.model_spec import ModelSpec
from protocol.privacy import GaussianMechanism
from protocol.topics import Topics

pytest.importorskip("dp_accounting")
TOPICS = Topics("cdp")
SPEC = ModelSpec("sgd-regressor", 3)
DELTA = 1e-5
BASE = ["--broker", "mqtt://127.0.0.1:1", "--fleet", "f", "--model", "sgd-regressor", "--n-features", "3",
        "--strategy", "fedbuff", "--dp-mode", "central", "--dp-clip", "1", "--dp-noise", "1"]


def payload(agent, seq, delta):
    enc = codec.encode(np.asarray(delta, dtype=np.float64), codec.CodecSpec.parse("float32"), np.random.default_rng(0))
    return encode_update(UpdateMessage(agent_id=agent, seq=seq, base_version=0, n_samples=10, delta=enc))


def central(action, k=3):
    dp = CentralDP(FedBuff(buffer_size=k), GaussianMechanism(1.0, 1.0), DELTA, norm_action=action)
    return PrivateCoordinator(TOPICS, SPEC, dp, guard(UpdateValidator(TOPICS, SPEC.n_params), dp), privacy=dp), dp


@pytest.mark.parametrize("extra, says", [
    (["--checkpoint-dir", "{ckpt}", "--norm-factor", "3"], "--norm-factor"),
    (["--checkpoint-dir", "{ckpt}", "--feature-stats"], "--feature-stats"),
    ([], "--checkpoint-dir"),
])
def test_coordinator_cli_refuses_what_central_dp_cannot_carry(tmp_path, extra, says):
    argv = [a.replace("{ckpt}", str(tmp_path)) for a in BASE + extra]
    proc = subprocess.run([sys.executable, "-m", "coordinator", *argv], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.startswith("fedmq-coordinator: error")]
    assert len(lines) == 1 and says in lines[0] and "central DP" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_central_dp_clips_by_default_so_that_acceptance_says_nothing_of_a_norm(tmp_path):
    from coordinator.cli import parse_args

    args = parse_args(BASE + ["--checkpoint-dir", str(tmp_path)])
    assert args.strategy_obj.norm_action == "clip"  # a rejection would move `accepted` by one less


@pytest.mark.parametrize("action", ["reject", "clip"])
def test_no_clip_bit_reaches_the_status_or_prometheus(action):
    core, dp = central(action)
    before = core.status()
    assert core.handle_update(TOPICS.update("a"), payload("a", 1, [0.1, 0, 0, 0])) is None
    over = core.handle_update(TOPICS.update("b"), payload("b", 1, [30.0, 0, 0, 0]))  # over C = 1
    assert over == ("dp_norm" if action == "reject" else None)
    assert (core.rejected_["dp_norm"] if action == "reject" else core.clipped_) == 1  # it happened inside
    after = core.status()
    for status in (before, after):
        assert status["clipped"] is None and "dp_norm" not in status["rejected"] and "norm" not in status["rejected"]
    collector = StatusCollector()
    collector.update(after)
    families = {f.name: f for f in collector.collect()}
    assert "fedmq_updates_clipped" not in families
    assert all(s.labels["reason"] not in ("dp_norm", "norm") for s in families["fedmq_updates_rejected"].samples)


def test_a_re_expressed_buffer_is_clipped_to_c_again():
    core, dp = central("clip", k=3)
    assert core.handle_update(TOPICS.update("a"), payload("a", 1, [0.999, 0, 0, 0])) is None
    state = dp.state()
    grown = [d * 3.25 for d in state["deltas"]]  # what a scaling change's re-expression did (norm 3.25)
    dp.restore(dict(state, deltas=grown))  # the core's _refresh_scaling hands the buffer back this way
    assert all(np.linalg.norm(d) <= 1.0 + 1e-12 for d in dp.inner.state()["deltas"])


def test_the_local_dp_ledger_survives_a_checkpoint(tmp_path):
    ledger = LocalDPLedger(GaussianMechanism(1.0, 2.0), DELTA)
    core = PrivateCoordinator(TOPICS, SPEC, FedAsync(), guard(UpdateValidator(TOPICS, SPEC.n_params), ledger),
                              privacy=ledger, checkpoint_dir=str(tmp_path))
    for seq in (1, 2, 3):
        assert core.handle_update(TOPICS.update("a"), payload("a", seq, [0.1, 0, 0, 0])) is None
    core.checkpoint()
    again = LocalDPLedger(GaussianMechanism(1.0, 2.0), DELTA)
    resumed = PrivateCoordinator(TOPICS, SPEC, FedAsync(), guard(UpdateValidator(TOPICS, SPEC.n_params), again),
                                 privacy=again, resume=load_checkpoint(tmp_path))
    assert again.contributions == {"a": 3}
    assert resumed.status()["privacy"]["epsilon"] == pytest.approx(accounting.epsilon(2.0, 3, DELTA), abs=1e-9)
