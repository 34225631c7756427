"""`from mosquitto import Mosquitto, free_port` for tests (conftest puts tests/ on sys.path).

The helper itself lives in simulation/mosquitto.py because the benchmarks in bench/ start
real brokers too and must not import from tests/. API::

    Mosquitto(workdir, *, port=None, extra_conf="", allow_anonymous=True, persistence=False)
        .host ("127.0.0.1"), .port, .url ("mqtt://127.0.0.1:PORT"), .log (workdir/mosquitto.log)
        .start()    write workdir/mosquitto.conf, run `mosquitto -c`, wait (10 s) for the port
        .stop()     SIGTERM, bounded wait, then SIGKILL
        .kill()     SIGKILL, then wait (fault tests)
        .restart()  stop if running, start again on the same port (persistence keeps sessions)
        context manager: start on enter, stop on exit
    free_port() -> int
"""

from simulation.mosquitto import MOSQUITTO, Mosquitto, free_port

__all__ = ["MOSQUITTO", "Mosquitto", "free_port"]
