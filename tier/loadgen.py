"""An asyncio MQTT 3.1.1 load generator: thousands of real connections from one process.

Each connection is a raw socket speaking just what a device needs (CONNECT, QoS 1 PUBLISH and
its PUBACK, PINGREQ); payloads are encoded before the clock starts, so the generator measures
the tier, not msgpack. paho's one thread per client is what stalls the simulator near 5,000
agents; here a connection costs a coroutine and two buffers. Used by bench/scale_out.py.
"""

from __future__ import annotations

import asyncio
import struct
import time
from typing import Iterable


def _remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _string(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("!H", len(b)) + b


def connect_packet(client_id: str, keepalive: int = 600) -> bytes:
    body = _string("MQTT") + bytes([4, 0x02]) + struct.pack("!H", keepalive) + _string(client_id)
    return bytes([0x10]) + _remaining_length(len(body)) + body


def publish_packet(topic: str, payload: bytes, packet_id: int) -> bytes:
    body = _string(topic) + struct.pack("!H", packet_id) + payload
    return bytes([0x32]) + _remaining_length(len(body)) + body


class Connection:
    """One MQTT 3.1.1 client (clean session); `publish` resolves when the broker's PUBACK arrives."""

    def __init__(self, client_id: str) -> None:
        self.client_id = client_id
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.pending: dict[int, asyncio.Future] = {}
        self.next_id = 0
        self.task: asyncio.Task | None = None
        self.lost = False  # the broker closed it: every later publish fails at once
        self.address: tuple | None = None  # (host, port, local_host) of the last open, for `reopen`
        self.generation = 0  # opens so far: a publish's failure names the connection it was sent on
        self.reopens = 0
        self.resent = 0
        self._reopening: asyncio.Lock | None = None

    async def open(self, host: str, port: int, timeout: float = 30.0, local_host: str | None = None) -> None:
        self.address = (host, port, local_host)
        if self.writer is not None:  # a lost connection's
            self.writer.close()
        self.reader, self.writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, local_addr=(local_host, 0) if local_host else None), timeout)
        self.writer.write(connect_packet(self.client_id))
        head = await asyncio.wait_for(self.reader.readexactly(4), timeout)
        if head[0] != 0x20 or head[3] != 0:
            raise ConnectionError(f"{self.client_id}: CONNACK refused ({head.hex()})")
        self.generation += 1
        self.lost = False
        self.task = asyncio.get_running_loop().create_task(self._read())

    async def reopen(self, generation: int, timeout: float = 30.0, attempts: int = 20) -> None:
        """Open again (a device reconnecting) unless that was done since open number `generation` was lost;
        ConnectionError after `attempts` failed tries, 0.5 s apart."""
        self._reopening = self._reopening or asyncio.Lock()
        async with self._reopening:
            if self.generation != generation:
                return
            for _ in range(attempts):
                try:
                    await self.open(*self.address[:2], timeout, local_host=self.address[2])
                    self.reopens += 1
                    return
                except (ConnectionError, OSError, asyncio.IncompleteReadError, asyncio.TimeoutError):
                    await asyncio.sleep(0.5)
            raise ConnectionError(f"{self.client_id}: cannot connect again")

    async def _read(self) -> None:
        try:
            while True:
                first = (await self.reader.readexactly(1))[0]
                length, shift = 0, 0
                while True:
                    b = (await self.reader.readexactly(1))[0]
                    length |= (b & 0x7F) << shift
                    shift += 7
                    if not b & 0x80:
                        break
                body = await self.reader.readexactly(length) if length else b""
                if first >> 4 == 4 and len(body) >= 2:  # PUBACK
                    future = self.pending.pop(struct.unpack("!H", body[:2])[0], None)
                    if future is not None and not future.done():
                        future.set_result(time.time())
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            self.lost = True
            for future in self.pending.values():
                if not future.done():
                    future.set_exception(ConnectionError(f"{self.client_id}: connection lost"))
            self.pending.clear()

    def publish(self, topic: str, payload: bytes) -> asyncio.Future:
        """Send a QoS 1 PUBLISH; the future holds the wall-clock time its PUBACK arrived, or ConnectionError.

        On a lost connection it fails at once: its PUBACK could never come, and `send`'s window for the
        connection waited on it for ever (a sustained tier run wedged when the broker closed connections)."""
        future = asyncio.get_running_loop().create_future()
        if self.lost:
            future.set_exception(ConnectionError(f"{self.client_id}: connection lost"))
            return future
        self.next_id = self.next_id % 65535 + 1
        self.pending[self.next_id] = future
        self.writer.write(publish_packet(topic, payload, self.next_id))
        return future

    async def close(self) -> None:
        if self.writer is not None:
            try:
                self.writer.write(b"\xe0\x00")  # DISCONNECT
                self.writer.close()
            except (ConnectionError, OSError):
                pass
        if self.task is not None:
            self.task.cancel()


async def open_many(n: int, ports: list[int], prefix: str, host: str = "127.0.0.1", concurrency: int = 200,
                    timeout: float = 30.0) -> list[Connection]:
    """`n` connections spread over `ports`, at most `concurrency` handshakes at a time."""
    gate = asyncio.Semaphore(concurrency)
    conns = [Connection(f"{prefix}-{i}") for i in range(n)]

    async def one(i: int, conn: Connection) -> None:
        async with gate:
            for attempt in range(3):  # a broker busy creating its MQTT streams may close a first CONNECT
                try:
                    await conn.open(host, ports[i % len(ports)], timeout)
                    return
                except (ConnectionError, asyncio.IncompleteReadError):
                    if attempt == 2:
                        raise
                    await asyncio.sleep(0.5)

    if conns:  # the first alone: NATS creates its MQTT streams on the first connection of an account
        await one(0, conns[0])
    await asyncio.gather(*(one(i, c) for i, c in enumerate(conns) if i))
    return conns


async def send(conns: list[Connection], messages: Iterable[tuple[str, bytes]], *, rate: float | None = None,
               window: int = 64, resend: int = 0) -> list[tuple[float, float]]:
    """Publish `messages` (topic, payload; a list, or an iterator that encodes them as they are sent) round-robin
    over `conns`, at most `window` unacknowledged per connection, at `rate`/s if given (else as fast as the
    acks come); (sent, acked) wall times per message, acked 0 for one never acknowledged. A message whose
    connection was lost before its PUBACK is sent again after the connection is opened again (as a device
    does), up to `resend` times (0: counted unacknowledged at once); each Connection counts its reopens and resends."""
    gates = [asyncio.Semaphore(window) for _ in conns]
    times: list[tuple[float, float]] = []
    start = time.monotonic()

    async def track(i: int, k: int, topic: str, payload: bytes, future: asyncio.Future, generation: int,
                    sent: float) -> None:
        conn = conns[k]
        try:
            for attempt in range(resend + 1):
                try:
                    times[i] = (sent, await future)
                    return
                except ConnectionError:
                    if attempt == resend:
                        return  # never acknowledged: its acked time stays 0
                try:
                    await conn.reopen(generation)
                except ConnectionError:
                    return
                generation = conn.generation
                conn.resent += 1
                future = conn.publish(topic, payload)
        finally:
            gates[k].release()

    tasks: set[asyncio.Future] = set()  # the unacknowledged only: a long run keeps no finished task
    for i, (topic, payload) in enumerate(messages):
        if rate:
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        k = i % len(conns)
        await gates[k].acquire()
        sent = time.time()
        times.append((sent, 0.0))
        task = asyncio.ensure_future(track(i, k, topic, payload, conns[k].publish(topic, payload), conns[k].generation,
                                           sent))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    await asyncio.gather(*tasks)
    return times


async def hold(n: int, ports: list[int], prefix: str, *, host: str = "127.0.0.1", local_host: str | None = None,
               concurrency: int = 200, timeout: float = 60.0) -> tuple[list[Connection], list[BaseException]]:
    """Open `n` idle connections (as `open_many`, from `local_host`), keeping those that open: (open, errors)."""
    gate = asyncio.Semaphore(concurrency)
    conns = [Connection(f"{prefix}-{i}") for i in range(n)]

    async def one(i: int, conn: Connection) -> None:
        async with gate:
            await conn.open(host, ports[i % len(ports)], timeout, local_host=local_host)

    results = await asyncio.gather(*(one(i, c) for i, c in enumerate(conns)), return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    return [c for c, r in zip(conns, results) if not isinstance(r, BaseException)], errors


def _hold_main(argv: list[str] | None = None) -> int:
    """`python -m tier.loadgen`: hold idle connections, print one JSON line once open, close on stdin EOF.

    One process holds at most its file-descriptor limit; bench/scale_out.py starts several, each from its
    own source address (127.0.1.x) so they do not use up 127.0.0.1's ephemeral ports."""
    import argparse
    import json
    import resource
    import sys

    import psutil

    parser = argparse.ArgumentParser(prog="python -m tier.loadgen", description=_hold_main.__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, required=True, help="connections to open")
    parser.add_argument("--ports", required=True, help="comma-separated MQTT ports on --host, used round-robin")
    parser.add_argument("--host", default="127.0.0.1", help="broker address")
    parser.add_argument("--source", help="local address to connect from (e.g. 127.0.1.1)")
    parser.add_argument("--prefix", default="idle", help="client id prefix")
    args = parser.parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    me = psutil.Process()

    async def run() -> None:
        before, t0 = me.memory_info().rss, time.monotonic()
        conns, errors = await hold(args.count, [int(p) for p in args.ports.split(",")], args.prefix, host=args.host,
                                   local_host=args.source)
        took = time.monotonic() - t0
        alive = sum(1 for c in conns if c.task is not None and not c.task.done())
        print(json.dumps({"opened": len(conns), "alive": alive, "failed": len(errors), "connect_s": round(took, 1),
                          "first_error": repr(errors[0]) if errors else None, "rss_before": before,
                          "rss_after": me.memory_info().rss}), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until the bench closes stdin
        print(json.dumps({"alive_at_end": sum(1 for c in conns if not c.task.done())}), flush=True)
        for c in conns:
            await c.close()

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    raise SystemExit(_hold_main())
