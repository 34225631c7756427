"""Issue 20, point 6: tier/loadgen.py's raw MQTT 3.1.1 connections against a real mosquitto: every
QoS 1 update is acknowledged and arrives once, byte for byte; a broker that goes away ends a send, never wedges it."""

from __future__ import annotations

import asyncio
import threading

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from tier.loadgen import open_many, send


def test_many_connections_publish_and_every_puback_comes_back(mosquitto):
    got: list[tuple[str, bytes]] = []
    done = threading.Event()
    sub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="lg-sub", protocol=mqtt.MQTTv311)
    sub.on_message = lambda c, u, m: (got.append((m.topic, m.payload)), len(got) >= 300 and done.set())
    sub.connect(mosquitto.host, mosquitto.port)
    sub.loop_start()
    sub.subscribe("lg/#", 1)[1]
    messages = [(f"lg/d{i % 30}", bytes([i % 256]) * (1 + i % 700)) for i in range(300)]

    async def run():
        conns = await open_many(60, [mosquitto.port], "lg")
        times = await send(conns, messages, window=4)
        for c in conns:
            await c.close()
        return times

    try:
        times = asyncio.run(asyncio.wait_for(run(), 60))
        assert all(acked >= sent > 0 for sent, acked in times)
        assert done.wait(30)
        assert sorted(got) == sorted(messages)
    finally:
        sub.loop_stop()
        sub.disconnect()


def test_a_send_over_connections_the_broker_dropped_ends_with_them_unacknowledged(mosquitto):
    """The broker going away mid-send: every later publish fails at once and counts as unacknowledged
    (acked 0); before, each connection's window waited for PUBACKs that could never come, for ever."""
    messages = [(f"lg/d{i % 4}", b"x" * 100) for i in range(2000)]

    async def run():
        conns = await open_many(4, [mosquitto.port], "lgdrop")
        first = await send(conns, messages[:40], window=4)
        mosquitto.kill()
        for c in conns:  # every reader has seen the close
            await asyncio.wait_for(c.task, 10)
        rest = await send(conns, messages[40:], window=4)
        return first, rest

    try:
        first, rest = asyncio.run(asyncio.wait_for(run(), 30))
    finally:
        mosquitto.restart()
    assert all(acked > 0 for _, acked in first)
    assert len(rest) == 1960 and all(acked == 0 for _, acked in rest)
