"""Issue 14: differential privacy (clip + Gaussian noise, RDP accounting, budgets, central DP)."""

import json

import dp_accounting
import numpy as np
import pytest
from dp_accounting import rdp
from sklearn.datasets import load_digits

from coordinator.cli import parse_args as coordinator_args
from coordinator.metrics import StatusCollector
from coordinator.privacy import CentralDP, LocalDPLedger, PrivateCoordinator, guard
from coordinator.strategies import FedAsync, FedAvg, FedBuff
from coordinator.validation import UpdateValidator
from edge_agent.agent import BUDGET_SPENT, Agent
from edge_agent.cli import parse_args as agent_args
from edge_agent.data import ArraySource
from edge_agent.trainer import LocalTrainer
from fleet import TopicWatcher, spawn, stop
from protocol import accounting, codec
from protocol.messages import ModelMessage, UpdateMessage, decode_update, encode_model, encode_update
from protocol.model_spec import ModelSpec
from protocol.privacy import GaussianMechanism, clip, gaussian_noise, secure_rng
from protocol.tabular import write_csv
from protocol.topics import Topics

X, Y = load_digits(return_X_y=True)
TOPICS = Topics("dp")
SPEC = ModelSpec("sgd-classifier", 64, tuple(range(10)))
DELTA = 1e-5


def model_bytes(version, params=None):
    params = np.zeros(SPEC.n_params) if params is None else params
    return encode_model(ModelMessage(TOPICS.fleet, version, SPEC, params))


def dp_agent(codec_name="int8", *, clip_norm=1.0, sigma=1.0, budget=None, rows=200):
    return Agent("a1", TOPICS, ArraySource(X[:rows], Y[:rows]), LocalTrainer(random_state=0), codec_name, seed=0,
                 dp=GaussianMechanism(clip_norm, sigma), dp_delta=DELTA, dp_epsilon_budget=budget)


def update_payload(agent_id, seq, delta, base=0):
    enc = codec.encode(np.asarray(delta, dtype=np.float64), codec.CodecSpec.parse("float32"), np.random.default_rng(0))
    return encode_update(UpdateMessage(agent_id=agent_id, seq=seq, base_version=base, n_samples=10, delta=enc))


# --- the mechanism ---------------------------------------------------------------------


def test_noise_scale_is_sigma_times_c_over_many_draws():
    mech = GaussianMechanism(clip_norm=2.0, noise_multiplier=1.5)
    rng = secure_rng()
    draws = np.stack([mech.privatize(np.zeros(1000), rng)[0] for _ in range(200)])  # 200,000 coordinates
    # the sample std of n normal draws has relative standard error 1/sqrt(2n) = 0.16%: 1% is > 6 of them
    assert draws.std() == pytest.approx(3.0, rel=0.01)
    assert abs(draws.mean()) < 5 * 3.0 / np.sqrt(draws.size)
    # independent coordinates: no correlation between neighbours
    assert abs(np.corrcoef(draws[:, :-1].ravel(), draws[:, 1:].ravel())[0, 1]) < 0.02
    # the noise is centred on the clipped delta: the signal survives on average
    signal = np.full(1000, 0.01)  # norm 0.316 < C: not clipped
    noisy = np.stack([mech.privatize(signal, rng)[0] for _ in range(200)])
    assert noisy.mean() == pytest.approx(0.01, abs=5 * 3.0 / np.sqrt(noisy.size))


def test_noise_is_not_reproducible_from_any_seed():
    a, b = secure_rng(), secure_rng()
    assert not np.allclose(gaussian_noise(50, 1.0, a), gaussian_noise(50, 1.0, b))


def test_clipping_bounds_every_contribution():
    rng = np.random.default_rng(0)
    for scale in (1e-3, 0.5, 1.0, 3.0, 1e6):
        for _ in range(50):
            delta = rng.standard_normal(int(rng.integers(1, 700))) * scale
            clipped, was = clip(delta, 1.0)
            assert np.linalg.norm(clipped) <= 1.0 + 1e-12
            if np.linalg.norm(delta) <= 1.0:
                assert not was and np.array_equal(clipped, delta)  # below C: untouched
            else:
                assert was and np.allclose(clipped / np.linalg.norm(clipped), delta / np.linalg.norm(delta))
    with pytest.raises(ValueError):
        clip(np.array([np.inf]), 1.0)
    with pytest.raises(ValueError):
        GaussianMechanism(1.0, 0.0)  # no noise is no privacy


# --- the accountant --------------------------------------------------------------------


@pytest.mark.parametrize("sigma, n, delta", [(0.8, 1, 1e-5), (1.1, 20, 1e-5), (4.0, 100, 1e-6), (10.0, 7, 1e-3)])
def test_accountant_matches_dp_accounting_called_directly(sigma, n, delta):
    direct = rdp.RdpAccountant()
    for _ in range(n):  # one event per contribution, composed one by one
        direct.compose(dp_accounting.GaussianDpEvent(sigma))
    expected = direct.get_epsilon(delta)
    assert accounting.epsilon(sigma, n, delta) == pytest.approx(expected, rel=1e-9)
    budget = accounting.Budget(sigma, delta)
    for _ in range(n):
        budget.record()
    assert budget.epsilon == pytest.approx(expected, rel=1e-9)
    assert budget.report()["epsilon"] == pytest.approx(expected, abs=1e-6)


def test_accountant_helpers():
    assert accounting.epsilon(1.0, 0, DELTA) == 0.0
    n = accounting.max_contributions(2.0, DELTA, 5.0)
    assert accounting.epsilon(2.0, n, DELTA) <= 5.0 < accounting.epsilon(2.0, n + 1, DELTA)
    sigma = accounting.calibrate_noise(3.0, 20, DELTA)
    assert accounting.epsilon(sigma, 20, DELTA) <= 3.0 < accounting.epsilon(sigma * 0.99, 20, DELTA)
    report = accounting.fleet_report({"a": 1, "b": 5, "c": 2}, 2.0, DELTA, "central", 1.0)
    assert report["epsilon"] == pytest.approx(accounting.epsilon(2.0, 5, DELTA), abs=1e-6)
    assert report["contributions_max"] == 5 and report["agents"] == 3


def test_replace_one_is_sensitivity_2c_from_dp_accounting():
    """Issue 19.6: replace-one doubles the sensitivity; the bench's 1 / 3 / 8 read 2.14 / 6.64 / 18.83."""
    for sigma, n in ((18.0938, 20), (6.6797, 20), (2.8535, 20), (1.5, 7)):
        direct = rdp.RdpAccountant()
        direct.compose(dp_accounting.GaussianDpEvent(sigma / 2), n)  # std sigma C over a shift of 2C
        assert accounting.epsilon(sigma, n, DELTA, "replace-one") == pytest.approx(direct.get_epsilon(DELTA), rel=1e-9)
    assert [round(accounting.epsilon(s, 20, DELTA, "replace-one"), 2) for s in (18.0938, 6.6797, 2.8535)] == [2.14, 6.64, 18.83]
    with pytest.raises(ValueError, match="--dp-neighbours"):
        accounting.epsilon(1.0, 1, DELTA, "swap")
    agent = agent_args(["--broker", "mqtt://127.0.0.1:1", "--fleet", "f", "--id", "a", "--data", "x.csv",
                        "--dp-clip", "1", "--dp-noise", "1", "--state-file", "s"])
    assert agent.dp_neighbours == "replace-one"
    base = ["--broker", "mqtt://127.0.0.1:1", "--fleet", "f", "--model", "sgd-regressor", "--n-features", "3",
            "--strategy", "fedbuff", "--dp-clip", "1", "--dp-noise", "1"]
    assert coordinator_args(base + ["--dp-mode", "local"]).dp_policy.neighbours == "replace-one"
    central = coordinator_args(base + ["--dp-mode", "central", "--checkpoint-dir", "/tmp/unused"]).dp_policy
    assert central.neighbours == "add-remove" and central.report()["neighbours"] == "add-remove"
    swapped = coordinator_args(base + ["--dp-mode", "central", "--checkpoint-dir", "/tmp/unused",
                                       "--dp-neighbours", "replace-one"]).dp_policy
    assert swapped.neighbours == "replace-one"


# --- the agent (local DP) ----------------------------------------------------------------


def test_agent_update_is_clipped_and_noised_and_carries_no_data_fields():
    agent = dp_agent("float32", clip_norm=0.5, sigma=1e-6)  # noise negligible: the clip is visible
    agent.on_model(model_bytes(1))
    agent.due()
    msg = decode_update(agent.make_update(), "a1")
    sent = codec.decode(msg.delta).astype(np.float64)
    assert np.linalg.norm(sent) == pytest.approx(0.5, rel=1e-3)  # the digits delta is far longer than 0.5
    assert msg.n_samples == 1 and msg.metrics == {}  # nothing un-noised about the data travels
    status = json.loads(json.dumps(agent.status(), allow_nan=False))
    assert "metrics" not in status and status["samples"] is None
    assert status["privacy"]["epsilon"] == pytest.approx(accounting.epsilon(1e-6, 1, DELTA), abs=1e-6)


def test_budget_stops_the_agent():
    sigma = 2.0
    budget = accounting.epsilon(sigma, 3, DELTA) + 1e-9  # room for exactly three updates
    agent = dp_agent(sigma=sigma, budget=budget)
    sent = 0
    for version in range(1, 8):
        agent.on_model(model_bytes(version))
        if agent.due() and agent.make_update() is not None:
            sent += 1
    assert sent == 3 and agent.updates_sent_ == 3
    assert agent.state == BUDGET_SPENT and agent.status()["state"] == "budget_spent"
    assert not agent.due() and agent.make_update() is None
    assert agent.status()["privacy"]["epsilon"] <= budget


def test_error_feedback_never_carries_noise_free_residue():
    """top-k keeps what it dropped; under local DP that residue is of the privatized delta only."""
    agent = dp_agent("topk:0.05+int8", clip_norm=1.0, sigma=0.01)
    agent.on_model(model_bytes(1, np.full(SPEC.n_params, 50.0)))  # a far-off model: raw deltas are huge
    agent.due()
    msg = decode_update(agent.make_update(), "a1")
    raw_norm = np.linalg.norm(agent.trainer.train(agent.model_, X[:200], Y[:200]).delta)
    assert raw_norm > 100  # what an unclipped residue would carry
    # privatized = clip(delta) + noise has norm ~ sqrt(1 + 650 * 0.01^2); the residual is that minus what was sent
    assert np.linalg.norm(agent.feedback.residual_) <= 1.0 + 5 * 0.01 * np.sqrt(SPEC.n_params)
    sent = codec.decode(msg.delta).astype(np.float64)
    assert np.linalg.norm(sent + agent.feedback.residual_) <= 1.0 + 5 * 0.01 * np.sqrt(SPEC.n_params)


def test_agent_cli_refuses_half_given_dp(capsys):
    base = ["--broker", "mqtt://127.0.0.1:1", "--fleet", "f", "--id", "a", "--data", "x.csv"]
    for extra in (["--dp-clip", "1"], ["--dp-noise", "1"], ["--dp-epsilon-budget", "3"],
                  ["--dp-clip", "1", "--dp-noise", "0"], ["--dp-clip", "1", "--dp-noise", "1", "--dp-delta", "2"]):
        with pytest.raises(SystemExit):
            agent_args(base + extra)
    with pytest.raises(SystemExit):  # issue 19.1: the ledger must survive a restart
        agent_args(base + ["--dp-clip", "1", "--dp-noise", "1.2"])
    args = agent_args(base + ["--dp-clip", "1", "--dp-noise", "1.2", "--dp-epsilon-budget", "8", "--state-file", "s"])
    assert args.dp == GaussianMechanism(1.0, 1.2) and args.dp_epsilon_budget == 8


# --- the coordinator (central DP) -----------------------------------------------------------


def central_core(k=2, *, clip_norm=1.0, sigma=1.0, action="reject", budget=None, strategy=None):
    spec = ModelSpec("sgd-regressor", 3)
    dp = CentralDP(strategy or FedBuff(buffer_size=k), GaussianMechanism(clip_norm, sigma), DELTA,
                   epsilon_budget=budget, norm_action=action)
    validator = guard(UpdateValidator(TOPICS, spec.n_params), dp)
    return PrivateCoordinator(TOPICS, spec, dp, validator, privacy=dp), dp


def test_central_mode_refuses_an_update_above_c():
    core, dp = central_core(k=2)
    assert core.handle_update(TOPICS.update("a"), update_payload("a", 1, [3.0, 0, 0, 0])) == "dp_norm"
    assert core.handle_update(TOPICS.update("b"), update_payload("b", 1, [0.6, 0.0, 0.0, 0.0])) is None
    assert core.rejected_["dp_norm"] == 1 and core.accepted_ == 1 and core.version_ == 0
    status = core.status()
    assert "dp_norm" not in status["rejected"] and status["privacy"]["mode"] == "central"  # un-noised clip bit: hidden
    clipping, dp = central_core(k=1, action="clip", sigma=1e-9)
    assert clipping.handle_update(TOPICS.update("a"), update_payload("a", 1, [3.0, 4.0, 0, 0])) is None
    assert clipping.clipped_ == 1 and np.linalg.norm(clipping.params_) == pytest.approx(1.0, rel=1e-6)


def test_central_noise_is_sigma_c_on_the_sum_of_k_and_every_model_is_noised():
    k, sigma, c = 4, 2.0, 0.5
    steps = []
    for trial in range(300):
        core, dp = central_core(k=k, clip_norm=c, sigma=sigma)
        for i in range(k):
            assert core.handle_update(TOPICS.update(f"a{i}"), update_payload(f"a{i}", 1, [0.1, 0, 0, 0])) is None
        assert core.version_ == 1
        steps.append(core.params_.copy())
    steps = np.stack(steps)
    noise = steps - np.array([0.1, 0, 0, 0])  # the noise-free step is the mean, 0.1 on the first coordinate
    # the step is (sum + N(0, (sigma C)^2)) / K: std sigma C / K = 0.25
    assert noise.std() == pytest.approx(sigma * c / k, rel=0.06)  # 1200 draws: rel. s.e. 2%
    assert (np.abs(noise) > 0).all()  # no model is ever noise-free
    assert dp.report()["epsilon"] == pytest.approx(accounting.epsilon(sigma, 1, DELTA), abs=1e-6)


def test_central_one_update_per_agent_per_buffer_and_budget():
    sigma = 3.0
    core, dp = central_core(k=2, sigma=sigma, budget=accounting.epsilon(sigma, 2, DELTA) + 1e-9)
    small = [0.1, 0, 0, 0]
    assert core.handle_update(TOPICS.update("a"), update_payload("a", 1, small)) is None
    assert core.handle_update(TOPICS.update("a"), update_payload("a", 2, small)) == "dp_repeat"
    seq = 3
    for _ in range(2):  # two releases with a and b
        if dp.pending == 0:
            assert core.handle_update(TOPICS.update("a"), update_payload("a", seq, small)) is None
            seq += 1
        assert core.handle_update(TOPICS.update("b"), update_payload("b", seq, small)) is None
        seq += 1
    assert dp.contributions == {"a": 2, "b": 2} and dp.releases == 2
    assert core.handle_update(TOPICS.update("a"), update_payload("a", seq, small)) == "dp_budget"
    assert core.status()["privacy"]["epsilon"] <= accounting.epsilon(sigma, 2, DELTA) + 1e-6


def test_central_mode_needs_a_buffered_mean():
    mech = GaussianMechanism(1.0, 1.0)
    with pytest.raises(ValueError, match="fedbuff or fedavg"):
        CentralDP(FedAsync(), mech, DELTA)
    with pytest.raises(ValueError, match="mean"):
        CentralDP(FedBuff(aggregate="median"), mech, DELTA)
    assert CentralDP(FedAvg(3), mech, DELTA).admit(1) == "stale_round"
    base = ["--broker", "mqtt://127.0.0.1:1", "--fleet", "f", "--model", "sgd-regressor", "--n-features", "3"]
    with pytest.raises(SystemExit):
        coordinator_args(base + ["--dp-mode", "central", "--dp-clip", "1", "--dp-noise", "1"])  # fedasync
    with pytest.raises(SystemExit):
        coordinator_args(base + ["--dp-clip", "1"])  # no mode
    args = coordinator_args(base + ["--strategy", "fedbuff", "--dp-mode", "central", "--dp-clip", "1", "--dp-noise", "1",
                                    "--checkpoint-dir", "/tmp/unused"])
    assert isinstance(args.strategy_obj, CentralDP)


def test_fleet_epsilon_reaches_prometheus():
    core, dp = central_core(k=1, sigma=2.0)
    core.handle_update(TOPICS.update("a"), update_payload("a", 1, [0.1, 0, 0, 0]))
    collector = StatusCollector()
    collector.update(core.status())
    families = {f.name: f for f in collector.collect()}
    sample = families["fedmq_dp_epsilon"].samples[0]
    assert sample.labels == {"fleet": "dp", "mode": "central"}
    assert sample.value == pytest.approx(accounting.epsilon(2.0, 1, DELTA), abs=1e-6)


def test_local_ledger_counts_agents():
    ledger = LocalDPLedger(GaussianMechanism(1.0, 2.0), DELTA)
    spec = ModelSpec("sgd-regressor", 3)
    core = PrivateCoordinator(TOPICS, spec, FedAsync(), guard(UpdateValidator(TOPICS, spec.n_params), ledger),
                              privacy=ledger)
    for seq in (1, 2, 3):
        assert core.handle_update(TOPICS.update("a"), update_payload("a", seq, [0.1, 0, 0, 0])) is None
    assert core.status()["privacy"]["epsilon"] == pytest.approx(accounting.epsilon(2.0, 3, DELTA), abs=1e-6)


# --- through a real mosquitto ----------------------------------------------------------------


def test_local_dp_agent_publishes_its_epsilon_over_mosquitto(tmp_path, mosquitto):
    data = tmp_path / "agent.csv"
    write_csv(data, X[:300], Y[:300])
    sigma, budget = 1.5, 25.0
    # issue 19.6: the CLIs' default relation under local DP is replace-one (sensitivity 2C)
    allowed = accounting.max_contributions(sigma, DELTA, budget, neighbours="replace-one")
    assert allowed < accounting.max_contributions(sigma, DELTA, budget)
    watcher = TopicWatcher(mosquitto.port, TOPICS.everything)
    coordinator = spawn(
        "coordinator", "--broker", mosquitto.url, "--fleet", TOPICS.fleet, "--model", "sgd-classifier",
        "--classes", ",".join(map(str, range(10))), "--n-features", 64, "--publish-interval", "0.2",
        "--dp-mode", "local", "--dp-clip", "1", "--dp-noise", sigma, log=tmp_path / "coordinator.log",
    )
    agent = spawn(
        "edge_agent", "--broker", mosquitto.url, "--fleet", TOPICS.fleet, "--id", "dev1", "--data", data,
        "--dp-clip", "1", "--dp-noise", sigma, "--dp-epsilon-budget", budget, "--status-interval", "0",
        "--state-file", tmp_path / "dev1.state", "--reset-privacy-state", log=tmp_path / "agent.log",
    )
    try:
        status = watcher.wait_for(
            lambda: (s := watcher.json(TOPICS.agent_status("dev1"))) and s.get("state") == "budget_spent" and s,
            60, "the agent to spend its budget")
        assert status["privacy"]["contributions"] == allowed == status["updates_sent"]
        assert status["privacy"]["epsilon"] == pytest.approx(accounting.epsilon(sigma / 2, allowed, DELTA), abs=1e-6)
        assert status["privacy"]["epsilon"] <= budget and status["privacy"]["delta"] == DELTA
        assert status["privacy"]["neighbours"] == "replace-one"
        assert "metrics" not in status and status["samples"] is None
        fleet = watcher.wait_for(
            lambda: (s := watcher.json(TOPICS.coordinator_status)) and (s.get("privacy") or {}).get("contributions_max") == allowed and s,
            30, "the coordinator to count every update")
        assert fleet["privacy"]["mode"] == "local" and fleet["privacy"]["epsilon"] == pytest.approx(status["privacy"]["epsilon"], abs=1e-6)
        assert fleet["privacy"]["neighbours"] == "replace-one"
    finally:
        stop(agent)
        stop(coordinator)
        watcher.close()
    # retained: a client connecting afterwards reads the agent's epsilon
    late = TopicWatcher(mosquitto.port, TOPICS.agent_status("dev1"))
    try:
        retained = late.wait_for(lambda: late.json(TOPICS.agent_status("dev1")), 10, "the retained status")
        assert retained["privacy"]["epsilon"] == pytest.approx(status["privacy"]["epsilon"])
    finally:
        late.close()


def test_central_dp_fleet_epsilon_over_mosquitto(tmp_path, mosquitto):
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"a{i}.csv")
        write_csv(paths[-1], X[i * 300:(i + 1) * 300], Y[i * 300:(i + 1) * 300])
    watcher = TopicWatcher(mosquitto.port, TOPICS.everything)
    argv = ("coordinator", "--broker", mosquitto.url, "--fleet", TOPICS.fleet, "--model", "sgd-classifier",
            "--classes", ",".join(map(str, range(10))), "--n-features", 64, "--publish-interval", "0.2",
            "--strategy", "fedbuff", "--buffer-size", "2", "--dp-mode", "central", "--dp-clip", "5", "--dp-noise", "2",
            "--dp-norm-action", "clip", "--dp-epsilon-budget", "10", "--checkpoint-dir", tmp_path / "ckpt")
    coordinator = spawn(*argv, log=tmp_path / "coordinator.log")
    agents = [spawn("edge_agent", "--broker", mosquitto.url, "--fleet", TOPICS.fleet, "--id", f"a{i}", "--data", p,
                    log=tmp_path / f"a{i}.log") for i, p in enumerate(paths)]
    allowed = accounting.max_contributions(2.0, DELTA, 10.0)
    try:
        status = watcher.wait_for(
            lambda: (s := watcher.json(TOPICS.coordinator_status)) and (s.get("privacy") or {}).get("contributions_max") == allowed
            and s.get("rejected", {}).get("dp_budget") and s, 90, "the agents to reach the central budget")
        privacy = status["privacy"]
        assert privacy["mode"] == "central" and privacy["epsilon"] <= 10.0
        assert privacy["epsilon"] == pytest.approx(accounting.epsilon(2.0, allowed, DELTA), abs=1e-6)
        assert status["strategy"] == "fedbuff+central-dp" and status["fleet_eval"] == {}
        # issue 19.7: a restarted coordinator continues the fleet's epsilon (it was 0 after a restart)
        assert stop(coordinator) == 0
        coordinator = spawn(*argv, log=tmp_path / "coordinator2.log")
        again = watcher.wait_for(
            lambda: (s := watcher.json(TOPICS.coordinator_status)) and s.get("started_at") != status["started_at"]
            and s, 60, "the restarted coordinator's status")
        assert privacy["epsilon"] > 0 and again["privacy"]["epsilon"] == pytest.approx(privacy["epsilon"], abs=1e-9)
        assert again["privacy"]["contributions_max"] == allowed
    finally:
        for proc in agents:
            stop(proc)
        stop(coordinator)
        watcher.close()


def test_docs_quote_the_privacy_results_exactly():
    from fleet import ROOT

    results = json.loads((ROOT / "bench/results/privacy.json").read_text())
    docs = {name: (ROOT / "docs" / name).read_text() for name in ("benchmarks.md", "security.md")}
    for name in ("digits", "linear"):
        metric = results[name]["metric"]
        for mode in ("local", "central"):
            for eps in ("1", "3", "8"):
                cell = results[name][mode][f"epsilon_{eps}"]
                row = f"| {eps} | {results[name]['local'][f'epsilon_{eps}'][f'median_{metric}']} | "
                for text in docs.values():
                    assert row in text and f"{cell[f'median_{metric}']} | ({cell['epsilon']:.4f}, {cell['delta']:g})" in text
            local = results[name]["local"][f"epsilon_{eps}"]
            for text in docs.values():  # issue 19.6: the replace-one epsilon of the same releases
                assert f"| {local['noise_multiplier']} | {local['epsilon_replace_one']:.4f} |" in text


def test_central_account_and_buffer_survive_a_checkpoint(tmp_path):
    from coordinator.store import load_checkpoint

    core, dp = central_core(k=2)
    small = [0.1, 0, 0, 0]
    for seq, agent in enumerate(("a", "b", "a"), start=1):
        assert core.handle_update(TOPICS.update(agent), update_payload(agent, seq, small)) is None
    core.checkpoint_dir = str(tmp_path)
    core.checkpoint()
    spec = ModelSpec("sgd-regressor", 3)
    again = CentralDP(FedBuff(buffer_size=2), GaussianMechanism(1.0, 1.0), DELTA)
    resumed = PrivateCoordinator(TOPICS, spec, again, guard(UpdateValidator(TOPICS, spec.n_params), again),
                                 privacy=again, resume=load_checkpoint(tmp_path))
    assert again.contributions == {"a": 1, "b": 1} and again.releases == 1 and again.pending == 1
    assert resumed.status()["privacy"]["epsilon"] == core.status()["privacy"]["epsilon"]
