import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from simulation.mosquitto import Mosquitto  # noqa: E402


@pytest.fixture
def mosquitto(tmp_path):
    """A real mosquitto on a free loopback port, stopped after the test."""
    with Mosquitto(tmp_path / "broker") as broker:
        yield broker
