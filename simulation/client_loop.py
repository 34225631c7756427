"""Many paho-mqtt clients on one thread: a selector loop instead of a thread per client.

paho supports external event loops (see its `loop_select.py` example): we watch each
client's socket and call `loop_read`/`loop_write`/`loop_misc` ourselves. Every paho call
happens on the loop thread; other threads hand work over with `call_soon`/`call_later`.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import queue
import selectors
import socket
import threading
import time
from typing import Callable

import paho.mqtt.client as mqtt

log = logging.getLogger(__name__)


class ClientLoop:
    """Drives any number of paho clients from one daemon thread."""

    def __init__(self) -> None:
        self.selector = selectors.DefaultSelector()
        self.clients: set[mqtt.Client] = set()
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._timers: list = []
        self._counter = itertools.count()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="client-loop", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> bool:
        """Stop the loop thread; True once it has ended (within `timeout`)."""
        self._stop.set()
        self._wake()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def attach(self, client: mqtt.Client) -> None:
        """Let this loop drive `client` (call before connecting it, on the loop thread)."""
        client.on_socket_open = self._on_open
        client.on_socket_close = self._on_close
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write
        self.clients.add(client)

    def call_soon(self, fn: Callable[[], object]) -> None:
        """Run `fn` on the loop thread (thread-safe)."""
        self._calls.put(fn)
        self._wake()

    def call_later(self, delay: float, fn: Callable[[], object]) -> None:
        """Run `fn` on the loop thread after `delay` seconds (thread-safe)."""
        self.call_soon(lambda: heapq.heappush(self._timers, (time.monotonic() + delay, next(self._counter), fn)))

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # already awake

    # paho socket callbacks (on the loop thread) ---------------------------------------------

    def _on_open(self, client, userdata, sock):
        self.selector.register(sock, selectors.EVENT_READ, client)

    def _on_close(self, client, userdata, sock):
        try:
            self.selector.unregister(sock)
        except (KeyError, ValueError):
            pass

    def _on_register_write(self, client, userdata, sock):
        self.selector.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, client)

    def _on_unregister_write(self, client, userdata, sock):
        try:
            self.selector.modify(sock, selectors.EVENT_READ, client)
        except (KeyError, ValueError):
            pass

    # the loop -------------------------------------------------------------------------------

    def _run(self) -> None:
        next_misc = time.monotonic()
        while not self._stop.is_set():
            timeout = 1.0
            if self._timers:
                timeout = max(0.0, min(timeout, self._timers[0][0] - time.monotonic()))
            for key, mask in self.selector.select(timeout):
                if self._stop.is_set():  # thousands of ready sockets: do not finish the pass first
                    break
                client = key.data
                if client is None:
                    try:
                        while self._wake_r.recv(4096):
                            pass
                    except BlockingIOError:
                        pass
                    continue
                if mask & selectors.EVENT_READ:
                    client.loop_read()
                if mask & selectors.EVENT_WRITE:
                    client.loop_write()
            self._run_calls()
            now = time.monotonic()
            while self._timers and self._timers[0][0] <= now:
                self._guard(heapq.heappop(self._timers)[2])
            if now >= next_misc:
                for client in list(self.clients):
                    client.loop_misc()  # keepalive pings and retries
                next_misc = now + 1.0

    def _run_calls(self) -> None:
        while True:
            try:
                fn = self._calls.get_nowait()
            except queue.Empty:
                return
            self._guard(fn)

    @staticmethod
    def _guard(fn) -> None:
        try:
            fn()
        except Exception:
            log.exception("error in a simulated client callback")
