"""Issue 20, point 6: tier/loadgen.py's raw MQTT 3.1.1 connections against a real mosquitto: every
QoS 1 update is acknowledged and arrives once, byte for byte."""

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
