"""SIGTERM stops a process whatever its main thread is doing (protocol/stopping.py).

The flake (test_privacy_restarts, fresh-clone CI at load ~15): an agent SIGTERMed printed nothing, not
even its --stop-timeout watchdog line, and was killed -9 after 20 s. Its handler, which Python runs in the
main thread between two bytecodes, set `session.wake` (taking the event's lock) while the main thread
held that very lock (inside the event's `wait` or `clear`, every poll): a deadlock. (The coordinator's,
the tier's and the monitor's handlers set a `stop` their main loops wait on: the same relay now.) Here
the main thread of a real agent process holds the lock 0.3 s of every wait and clear (a main thread
preempted there at load), and SIGTERM must still end it cleanly. Seen red on the handler before: each
trial hung (and 5 of 5 in a reproduction outside pytest, the main thread's stack in request_stop ->
Event.set -> Condition.__enter__, called from inside Event.clear).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

from sklearn.datasets import load_digits

from fleet import ROOT
from protocol.stopping import SignalRelay
from protocol.tabular import write_csv

# The module run as __main__ with threading.Event holding its lock longer in wait and clear.
HOLDING = r"""
import runpy, sys, threading, time

def clear(self):
    with self._cond:
        self._flag = False
        time.sleep(0.3)

def wait(self, timeout=None):
    with self._cond:
        signaled = self._flag or self._cond.wait(timeout)
        time.sleep(0.3)
        return signaled

threading.Event.clear, threading.Event.wait = clear, wait
module = sys.argv.pop(1)
sys.argv[0] = module
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


def test_the_relay_runs_the_callback_while_the_main_thread_holds_the_lock_it_takes():
    """In process: SIGTERM while this (main) thread holds the event's lock; the relay sets the event once
    the lock is let go, and the previous handler is back after close. (A handler setting the event itself
    would hang here.)"""
    event, previous = threading.Event(), signal.getsignal(signal.SIGTERM)
    with SignalRelay(lambda signum: event.set()):
        with event._cond:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)  # the Python-level handler has run in this thread by now, the lock held
            assert not event.is_set()
        assert event.wait(10), "the relay never set the event"
    assert signal.getsignal(signal.SIGTERM) is previous


def _started(log, words: str, proc, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while words not in log.read_text(errors="replace"):  # the process's own log: no event marks it otherwise
        assert proc.poll() is None and time.monotonic() < deadline, f"no {words!r}:\n{log.read_text()[-2000:]}"
        time.sleep(0.1)


def test_sigterm_while_the_agents_main_thread_holds_an_events_lock_stops_it(tmp_path, mosquitto):
    data = tmp_path / "a.csv"
    X, Y = load_digits(return_X_y=True)
    write_csv(data, X[:100], Y[:100])
    log = tmp_path / "agent.log"
    for trial in range(3):  # SIGTERM at different points of the poll (0.2 s, plus 0.3 s held)
        proc = subprocess.Popen(
            [sys.executable, "-c", HOLDING, "edge_agent", "--broker", mosquitto.url, "--fleet", "sig", "--id", "d1",
             "--data", str(data), "--poll-interval", "0.2"],
            stdout=open(log, "w"), stderr=subprocess.STDOUT, cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"})
        try:
            _started(log, "connected to", proc)
            time.sleep(0.5 + 0.17 * trial)  # into the main loop (the moment is the test's subject, not a sync)
            proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(15)  # the watchdog is 10 s (--stop-timeout): a clean stop is well before
            except subprocess.TimeoutExpired:
                code = "none: hung 15 s after SIGTERM"
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        text = log.read_text(errors="replace")
        assert code == 0 and "stopped after" in text and "still busy" not in text, f"trial {trial}: exit {code}\n{text[-2000:]}"
