"""fedmq-sim: a short simulated fleet through a real mosquitto, and the CLI on the embedded broker."""

from __future__ import annotations

import json
import subprocess
import sys

from fleet import ROOT, TopicWatcher
from protocol.transport import BrokerSettings
from simulation.datasets import load_dataset
from simulation.fleet import SimConfig, Simulation


def test_short_simulation_through_mosquitto(mosquitto):
    config = SimConfig(agents=10, duration=8.0, partition="dirichlet:0.5", stragglers=0.2, dropout=0.1,
                       dropout_time=1.0, round_time=0.05, target=0.85, seed=3, fleet="simtest")
    result = Simulation(config, load_dataset("digits", seed=3), BrokerSettings.from_url(mosquitto.url)).run()
    assert result["final_score"] >= 0.85
    assert result["time_to_target_s"] is not None and result["time_to_target_s"] < 8.0
    assert result["accepted"] >= 20 and result["version"] >= 20
    assert result["updates_sent"] >= result["accepted"]
    assert result["bytes_up"] > 0 and result["bytes_down"] > 0
    assert not result["rejected"]
    versions = [p["version"] for p in result["timeline"]]
    assert versions == sorted(versions)


def test_fedavg_rounds_wait_for_every_agent(mosquitto):
    config = SimConfig(agents=5, duration=4.0, strategy="fedavg", buffer_size=5, partition="iid",
                       round_time=0.05, seed=1, fleet="simsync")
    result = Simulation(config, load_dataset("wine", seed=1), BrokerSettings.from_url(mosquitto.url)).run()
    assert result["version"] >= 2
    assert result["accepted"] >= 5 * result["version"]  # every round took all five agents
    assert result["staleness"]["max"] == 0


def test_cli_on_the_embedded_broker(tmp_path):
    out = tmp_path / "r.json"
    png = tmp_path / "p.png"
    proc = subprocess.run(
        [sys.executable, "-m", "simulation", "--agents", "5", "--duration", "4", "--no-progress",
         "--json", str(out), "--plot", str(png)],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["accepted"] > 0 and result["final_score"] > 0.5
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "centralized accuracy" in proc.stdout + proc.stderr


def test_simulated_agents_obey_the_coordinators_pace(mosquitto):
    """Steered (--target-updates-per-s), the virtual agents report their statuses, the coordinator
    counts them and asks for one report per agents / target seconds, and the fleet keeps to it:
    unsteered, these 20 agents send on every model (hundreds of updates in 8 s). Seen red without the
    agents' statuses (the coordinator counts no agents online) and without the pause
    between rounds (a download per published model, and the fleet stalls after its first round:
    the pace gate holds every agent back and no one is left to move the model)."""
    agents, target, duration = 20, 4.0, 8.0
    config = SimConfig(agents=agents, duration=duration, partition="iid", round_time=0.05, seed=2,
                       fleet="simpace", target_updates_per_s=target)
    result = Simulation(config, load_dataset("digits", seed=2), BrokerSettings.from_url(mosquitto.url)).run()
    assert result["pace"] is not None, "the coordinator was not steered"
    assert result["pace"]["agents_online"] == agents
    assert result["pace"]["interval"] == agents / target
    # the first round of each agent comes at once, then about `target` a second (and the fleet keeps
    # going); room for the rounds started under the first model's interval (1 s: no agents counted yet)
    assert agents + 2 * target <= result["updates_sent"] <= 2 * agents + 1.5 * target * duration, result["updates_sent"]
    assert result["accepted"] >= agents
    # and like a real agent it downloads the model once per round (its subscription paused between)
    assert result["models_received"] <= 2 * result["updates_sent"], (result["models_received"], result["updates_sent"])
    # and on a clean stop each says offline (retained), as a real agent does: the coordinator counts none
    # of them online afterwards (seen red without say_offline: all 20 stayed "online")
    watcher = TopicWatcher(mosquitto.port, "fedmq/simpace/agent/+/status")
    try:
        states = watcher.wait_for(lambda: len(watcher.latest) == agents and watcher.latest, 10, "20 retained statuses")
        assert {json.loads(p)["state"] for p in states.values()} == {"offline"}, states
    finally:
        watcher.close()


def test_the_harder_tasks_run_in_the_simulator(mosquitto):
    """`--dataset many_classes` and `--dataset sensors` (issue 23): the sensor regression through a real
    mosquitto, scored by r2, moves towards its ceiling from a one-decile-per-device split."""
    from simulation.cli import config_from_args, parse_args

    assert config_from_args(parse_args(["--dataset", "many_classes", "--partition", "shards:4"])).dataset == "many_classes"
    config = config_from_args(parse_args(["--dataset", "sensors", "--agents", "10", "--partition", "shards:1",
                                          "--duration", "6", "--round-time", "0.05", "--seed", "2"]))
    config.fleet = "simsensors"
    result = Simulation(config, load_dataset("sensors", seed=2), BrokerSettings.from_url(mosquitto.url)).run()
    assert (result["dataset"], result["metric"]) == ("sensors", "r2")
    assert result["version"] >= 5 and result["final_score"] > 0.5, result["final_score"]


def test_a_model_arriving_as_the_run_ends_does_not_raise():
    """At 5,000 agents the client loop was still delivering models when the training pool had shut down:
    'RuntimeError: cannot schedule new futures after shutdown' killed the loop thread with a traceback."""
    from concurrent.futures import ThreadPoolExecutor

    from simulation.client_loop import ClientLoop

    sim = Simulation(SimConfig(agents=2, partition="iid", fleet="simend"), load_dataset("wine", seed=1),
                     BrokerSettings.from_url("mqtt://127.0.0.1:1"))
    loop, pool = ClientLoop(), ThreadPoolExecutor(1)
    agent = sim.build_agents(loop, pool)[0]
    pool.shutdown()
    agent._maybe_train()  # what a model delivered now does
    assert not agent.busy  # free to train again should another run reuse it
    loop.start()
    assert loop.stop(5), "the client loop did not end"
