"""A real headless Chromium (Debian's `chromium`) driven over the Chrome DevTools protocol.

    with Chromium(workdir) as browser:
        browser.open("http://127.0.0.1:8080/")
        browser.wait_for("document.querySelector('#version').textContent !== '–'", 20, "a version")
        browser.screenshot(path)

The browser runs with a fresh profile and the flags this machine needs (no sandbox as root,
no background networking: the network is closed); the protocol goes over the browser's own
WebSocket with the `websockets` package. Every wait is bounded.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import re
import shutil
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

from websockets.sync.client import connect

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-extensions", "--disable-dev-shm-usage", "--mute-audio", "--hide-scrollbars")


class BrowserError(AssertionError):
    pass


class Chromium:
    def __init__(self, workdir: Path, *, width: int = 1280, height: int = 1100, start_timeout: float = 60) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.size = (width, height)
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen | None = None
        self.ws = None
        self._ids = itertools.count(1)
        self.console: list[str] = []  # console messages and exceptions of the page

    def start(self) -> "Chromium":
        log = open(self.workdir / "chromium.log", "w")
        self.proc = subprocess.Popen(
            [CHROMIUM, *FLAGS, f"--user-data-dir={self.workdir / 'profile'}", "--remote-debugging-port=0",
             f"--window-size={self.size[0]},{self.size[1]}", "about:blank"],
            stdout=log, stderr=subprocess.PIPE, text=True, env={**os.environ, "HOME": str(self.workdir)})
        found: list[str] = []
        ready = threading.Event()

        def read() -> None:  # chromium prints its DevTools address on stderr; keep draining it after
            for line in self.proc.stderr:
                log.write(line)
                m = re.search(r"DevTools listening on (ws://\S+)", line)
                if m and not found:
                    found.append(m.group(1))
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(self.start_timeout) or not found:
            self.close()
            raise BrowserError(f"chromium did not start within {self.start_timeout} s (see {self.workdir / 'chromium.log'})")
        port = re.search(r":(\d+)/", found[0]).group(1)
        targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10))
        page = next(t for t in targets if t["type"] == "page")
        self.ws = connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=10)
        self.call("Page.enable")
        self.call("Runtime.enable")
        self.call("Emulation.setDeviceMetricsOverride", width=self.size[0], height=self.size[1],
                  deviceScaleFactor=1, mobile=False)
        return self

    def call(self, method: str, timeout: float = 30, **params) -> dict:
        """One DevTools command; its result (events that arrive meanwhile are noted, not returned)."""
        ident = next(self._ids)
        self.ws.send(json.dumps({"id": ident, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrowserError(f"no answer to {method} within {timeout} s")
            msg = json.loads(self.ws.recv(timeout=left))
            if msg.get("id") == ident:
                if "error" in msg:
                    raise BrowserError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self._note(msg)

    def _note(self, msg: dict) -> None:
        if msg.get("method") == "Runtime.consoleAPICalled":
            args = msg["params"].get("args", [])
            self.console.append(" ".join(str(a.get("value", a.get("description", ""))) for a in args))
        elif msg.get("method") == "Runtime.exceptionThrown":
            details = msg["params"]["exceptionDetails"]
            self.console.append("exception: " + str(details.get("exception", {}).get("description", details.get("text"))))

    def open(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression}: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float, what: str):
        """Re-evaluate `expression` until it is truthy; its value. Fails with what the page says."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                value = self.evaluate(expression)
            except BrowserError:
                value = None  # the page is still loading
            if value:
                return value
            if time.monotonic() > deadline:
                conn = self.evaluate("(document.getElementById('conn') || {}).textContent")
                raise BrowserError(f"timed out after {timeout} s waiting for {what}; the page says: {conn!r}; "
                                   f"console: {self.console[-5:]}")
            time.sleep(0.2)

    def heap_mb(self, collect: bool = False) -> float:
        """The page's used JavaScript heap in MB (DevTools Performance metrics), after a full GC if `collect`."""
        self.call("Performance.enable")
        if collect:
            self.call("HeapProfiler.collectGarbage")
        metrics = {m["name"]: m["value"] for m in self.call("Performance.getMetrics")["metrics"]}
        return metrics["JSHeapUsedSize"] / 1e6

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)["data"]
        Path(path).write_bytes(base64.b64decode(data))
        return Path(path)

    def close(self) -> None:
        if self.ws is not None:
            self.ws.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def __enter__(self) -> "Chromium":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
