"""Stop a process on SIGINT/SIGTERM without doing anything in the signal handler (stdlib only).

A Python signal handler runs in the main thread between two bytecodes, wherever that thread is. One
that sets a `threading.Event` takes the event's lock, and deadlocks when the main thread holds that
very lock at the moment (inside the event's own `wait` or `clear`, which the agent's and the
coordinator's main loops call every poll): the process then hangs silently until SIGKILL, its
--stop-timeout watchdog never started (a fresh-clone CI's red at load ~15, reproduced by a main thread
holding the lock longer: tests/test_signals.py). Here the interpreter's C-level handler writes the
signal number to a pipe (`signal.set_wakeup_fd`, at once, from whichever thread the kernel chose),
the Python-level handler does nothing, and a relay thread reading the pipe runs the callback, where
taking locks is safe: at worst it waits for the main thread to let go of one.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Callable

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class SignalRelay:
    """Runs `callback(signum)` in a relay thread on each of `signals` (install from the main thread);
    `close()` (or leaving the `with` block) puts the previous handlers back."""

    def __init__(self, callback: Callable[[int], None], signals: tuple = STOP_SIGNALS) -> None:
        self._callback = callback
        self._signals = {int(s) for s in signals}
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)  # the C handler must never block; a full pipe drops a byte
        self._previous_fd = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        self._previous = {sig: signal.signal(sig, _nothing) for sig in signals}
        self._thread = threading.Thread(target=self._relay, name="signal-relay", daemon=True)
        self._thread.start()

    def _relay(self) -> None:
        try:
            while data := os.read(self._read, 64):
                for signum in data:
                    if signum in self._signals:
                        self._callback(signum)
        finally:
            os.close(self._read)

    def close(self) -> None:
        """The previous handlers and wakeup fd back; the relay thread ends."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        signal.set_wakeup_fd(self._previous_fd)
        os.close(self._write)  # the relay reads the end of the pipe and closes its side
        self._thread.join(5)

    def __enter__(self) -> SignalRelay:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _nothing(signum, frame) -> None:
    """The Python-level handler: replaces the default action (termination); the relay does the work."""


def stop_event_on_signals(signals: tuple = STOP_SIGNALS) -> tuple[threading.Event, SignalRelay]:
    """An event the relay sets on any of `signals`, and the relay (to close when done)."""
    stop = threading.Event()
    return stop, SignalRelay(lambda signum: stop.set(), signals)
