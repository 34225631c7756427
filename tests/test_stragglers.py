"""The simulator's straggler models: heavy-tailed speeds, duty cycles, mid-round dropouts."""

from __future__ import annotations

import numpy as np
import pytest

from protocol.transport import BrokerSettings
from simulation.datasets import load_dataset
from simulation.fleet import SimConfig, Simulation
from simulation.stragglers import first_sleep, parse_duty_cycle, parse_speed, slowdowns


def test_lognormal_speeds_have_a_heavy_tail_around_a_median_of_one():
    s = slowdowns(np.random.default_rng(0), 20_000, "lognormal:1")
    assert np.median(s) == pytest.approx(1.0, abs=0.05)
    assert np.mean(s > 3.6) == pytest.approx(0.10, abs=0.01)  # exp(1.2816): the 90th percentile
    assert np.mean(s > 10.2) == pytest.approx(0.01, abs=0.003)  # exp(2.326)
    np.testing.assert_array_equal(slowdowns(np.random.default_rng(0), 5, "fixed"), np.ones(5))


def test_bad_straggler_options_say_what_is_wrong():
    for bad in ("lognormal", "lognormal:-1", "lognormal:x", "pareto:2", "fixed:1"):
        with pytest.raises(ValueError, match="speed"):
            parse_speed(bad)
    for bad in ("10", "10,0", "a,b", "-1,5"):
        with pytest.raises(ValueError, match="duty cycle"):
            parse_duty_cycle(bad)
    assert parse_duty_cycle("20,10") == (20.0, 10.0) and parse_duty_cycle(None) is None


def test_duty_cycle_phase_is_uniform_over_the_cycle():
    rng = np.random.default_rng(1)
    phases = [first_sleep(rng, 3.0, 1.0) for _ in range(4000)]
    assert np.mean([awake for awake, _ in phases]) == pytest.approx(0.75, abs=0.03)
    assert all(0 <= left <= (3.0 if awake else 1.0) for awake, left in phases)


def test_sleeping_and_dropping_agents_still_train_a_model(mosquitto):
    """Through a real mosquitto: agents sleep (duty cycle 1 s on, 1 s off), lose rounds to
    mid-round dropouts and differ in speed, and the fleet still learns (seen red with sleeps
    never scheduled: no sleeps counted)."""
    config = SimConfig(agents=8, duration=6.0, partition="iid", speed="lognormal:1", duty_cycle="1,1",
                       dropout=0.3, dropout_mode="lose", dropout_time=0.5, round_time=0.05, publish_interval=0.2)
    result = Simulation(config, load_dataset("wine", seed=1), BrokerSettings.from_url(mosquitto.url)).run()
    assert result["sleeps"] >= 8  # every agent sleeps at least once in 6 s of a 2 s cycle
    assert result["lost_rounds"] > 0
    assert result["accepted"] > 0 and result["final_score"] > 0.5
