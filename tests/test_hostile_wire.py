"""Hostile payloads against the wire formats' decoders: each is refused with a ProtocolError naming its reason.

A device sends updates (decoded by the coordinator and the tier's partition workers), a broker (or whoever
may publish on the model topic) sends models (decoded by agents, the monitor and the tier). Every payload
here is real msgpack, crafted against the byte cuts of the wire (Elias-Fano indices, float16 model scales,
the positional spec) and against what msgpack builds below `SCAN_ABOVE_BYTES` without a structural scan
first (nesting up to its own stack of ~1,000). Nothing may raise another exception type (the tier worker and
the agent catch ProtocolError, not RecursionError), and no decode may allocate more than the payload
justifies (tracemalloc's peak).
"""

from __future__ import annotations

import random
import tracemalloc

import msgpack
import numpy as np
import pytest

from coordinator.session import retained_model
from edge_agent.agent import Agent
from edge_agent.data import ArraySource
from edge_agent.trainer import LocalTrainer
from fleet import TopicWatcher, spawn, stop
from protocol import codec, secagg
from protocol.errors import ProtocolError
from protocol.messages import ModelMessage, UpdateMessage, decode_model, decode_update, encode_model, encode_update
from protocol.model_spec import ModelSpec
from protocol.schema import decode_schema
from protocol.stats_message import decode_stats
from protocol.topics import Topics
from test_hostile_messages import T, peak_rss_mb, publisher, raw_model as raw_map_model, start_agent

N = 1000  # the delta's length in the crafted updates
DEEP = 1020  # lists nested this deep unpack (msgpack's stack is ~1,024) and overflow Python's repr


def pack(value) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def update(delta, metrics=None) -> bytes:
    return pack([2, "update", 1, 0, 10, delta, metrics or {}])


def nested(leaf: bytes = b"\xc0", depth: int = DEEP) -> bytes:
    """`depth` one-element arrays around `leaf` (raw msgpack: msgpack-python will not pack this deep)."""
    return b"\x91" * depth + leaf


def ef_high(k: int, ones: list[int], n: int = N) -> bytes:
    """An Elias-Fano high part of the right length for k of n with ones at `ones`."""
    bits = np.zeros(codec._ef_sizes(n, k)[1], dtype=np.uint8)
    bits[ones] = 1
    return np.packbits(bits, bitorder="little").tobytes()


def ef_low(k: int, fill: int = 0, n: int = N) -> bytes:
    return bytes([fill]) * ((codec._ef_sizes(n, k)[0] + 7) // 8)


HONEST_IDX = np.array([1, 5, 9, 200, 999])
HONEST_EF = codec.encode_ef(HONEST_IDX, N)
TOP = codec._ef_sizes(N, 5)[1]  # bits in the high part of 5 of 1000

HOSTILE_UPDATES = {
    "ef k > n": (update(["int8", N, 0.1, bytes(N + 1), "ef", N + 1, b""]), "shape"),
    "ef k = 2^31": (update(["int8", N, 0.1, b"", "ef", 2**31, b""]), "shape"),
    "ef k = 2^63 - 1": (update(["int8", N, 0.1, b"", "ef", 2**63 - 1, b""]), "shape"),
    "ef k = -1": (update(["int8", N, 0.1, b"", "ef", -1, b""]), "shape"),
    "ef k is a bool": (update(["int8", N, 0.1, b"\0", "ef", True, HONEST_EF]), "schema"),
    "ef k is a float": (update(["int8", N, 0.1, b"\0", "ef", 1.0, HONEST_EF]), "schema"),
    "ef unary part a byte short": (update(["int8", N, 0.1, bytes(5), "ef", 5, HONEST_EF[:-1]]), "shape"),
    "ef unary part a byte long": (update(["int8", N, 0.1, bytes(5), "ef", 5, HONEST_EF + b"\0"]), "shape"),
    "ef high bits past n": (update(["int8", N, 0.1, bytes(5), "ef", 5, ef_low(5) + ef_high(5, [0, 1, 2, 3, TOP - 1])]), "shape"),
    "ef repeated index": (update(["int8", N, 0.1, bytes(5), "ef", 5, ef_low(5) + ef_high(5, [0, 1, 2, 3, 4])]), "shape"),
    "ef decreasing index": (update(["int8", N, 0.1, bytes(2), "ef", 2,
                                    codec.encode_ef(np.array([3, 1]), N)]), "shape"),
    "ef padding bits set": (update(["int8", N, 0.1, bytes(5), "ef", 5, b"\xff" * len(HONEST_EF)]), "shape"),
    "ef one high bit too many": (update(["int8", N, 0.1, bytes(5), "ef", 5, ef_low(5) + ef_high(5, [0, 2, 4, 6, 8, 10])]), "shape"),
    "ef one high bit too few": (update(["int8", N, 0.1, bytes(5), "ef", 5, ef_low(5) + ef_high(5, [0, 2, 4, 6])]), "shape"),
    "ef k = 0 with no unary part": (update(["int8", N, 0.1, b"", "ef", 0, b""]), "shape"),
    "values a byte short of k": (update(["int8", N, 0.1, bytes(4), "ef", 5, HONEST_EF]), "shape"),
    "values a byte more than k": (update(["int8", N, 0.1, bytes(6), "ef", 5, HONEST_EF]), "shape"),
    "int4 values for k + 2": (update(["int4", N, 0.1, bytes(4), "ef", 5, HONEST_EF]), "shape"),
    "u16 index out of range": (update(["int8", 16, 0.1, bytes(2), "u16", 2, b"\x01\x00\x11\x00"]), "shape"),
    "u32 index 2^32 - 1": (update(["int8", 16, 0.1, bytes(2), "u32", 2, b"\x01\0\0\0\xff\xff\xff\xff"]), "shape"),
    "u16 repeated index": (update(["int8", 16, 0.1, bytes(2), "u16", 2, b"\x01\x00\x01\x00"]), "shape"),
    "bitmap with fewer bits than k": (update(["int8", 16, 0.1, bytes(2), "bits", 2, b"\x01\x00"]), "shape"),
    "scale missing": (update(["int8", 16, bytes(16)]), "schema"),
    "scale NaN": (update(["int8", 16, float("nan"), bytes(16)]), "non_finite"),
    "scale Inf": (update(["int8", 16, float("inf"), bytes(16)]), "non_finite"),
    "scale negative": (update(["int8", 16, -1.0, bytes(16)]), "non_finite"),
    "scale bytes": (update(["int8", 16, b"\0\0", bytes(16)]), "schema"),
    "scale x 127 overflows float32": (update(["int8", 16, 3.4e38, b"\x7f" * 16]), "non_finite"),
    "n is a bool": (update(["int8", True, 1.0, b"\0"]), "schema"),
    "index kind a list": (update(["int8", 16, 0.1, bytes(2), ["ef"], 2, b""]), "codec"),
    "delta of 5 fields": (update(["int8", 16, 0.1, bytes(2), "ef"]), "schema"),
    "top-k delta with a nil index": (update(["int8", 16, 0.1, bytes(16), ["any"], {"thing": 1}, None]), "schema"),
    # below SCAN_ABOVE_BYTES msgpack builds these before any depth check; their repr in an error overflowed
    "format nested 1020 deep": (b"\x97" + nested() + b"\xa6update\x01\x00\x0a" + pack(["int8", 1, 0.0, b"\0"]) + b"\x80",
                                "decode"),
    "type nested 1020 deep": (b"\x97\x02" + nested() + b"\x01\x00\x0a" + pack(["int8", 1, 0.0, b"\0"]) + b"\x80", "decode"),
    "quantizer nested 1020 deep": (b"\x97\x02\xa6update\x01\x00\x0a\x94" + nested(b"\xa4int8") + pack(1) + pack(0.0)
                                   + pack(b"\0") + b"\x80", "decode"),
    "index kind nested 1020 deep": (b"\x97\x02\xa6update\x01\x00\x0a\x97" + pack("int8") + pack(16) + pack(0.1)
                                    + pack(bytes(2)) + nested() + pack(2) + pack(b"") + b"\x80", "decode"),
}


def traced(call):
    """`call()`'s result and tracemalloc's peak meanwhile."""
    tracemalloc.start()
    try:
        result = call()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def refusal(decode, payload: bytes) -> tuple[ProtocolError, int]:
    """The ProtocolError `decode(payload)` raises (any other outcome fails) and tracemalloc's peak meanwhile."""
    def refused():
        with pytest.raises(ProtocolError) as caught:
            decode(payload)
        return caught.value
    return traced(refused)


def decode_delta(payload: bytes) -> np.ndarray:
    return codec.decode(decode_update(payload, "a1").delta)


def bounded(payload: bytes, peak: int, dense: int = N) -> None:
    """At most what the payload and the dense vector it claims justify (their float64 copies, 8 x), plus slack."""
    assert peak < 256 * 1024 + 16 * len(payload) + 16 * dense, f"peak {peak} B for a {len(payload)} B payload"


@pytest.mark.parametrize("name", sorted(HOSTILE_UPDATES))
def test_a_hostile_update_is_one_protocol_error_with_its_reason(name):
    payload, reason = HOSTILE_UPDATES[name]
    error, peak = refusal(decode_delta, payload)
    assert error.reason == reason, error
    assert "\n" not in str(error) and len(str(error)) < 400, str(error)
    bounded(payload, peak)


def test_the_honest_elias_fano_update_still_decodes():
    out = decode_delta(update(["int8", N, 0.1, bytes([1, 2, 3, 4, 5]), "ef", 5, HONEST_EF]))
    assert np.flatnonzero(out).tolist() == HONEST_IDX.tolist()
    assert decode_delta(update(["int8", N, 0.1, b"", "ef", 0, ef_high(0, [])])).any() == False  # noqa: E712: k = 0


SPEC = ModelSpec("sgd-classifier", 4, (0, 1, 2), {"alpha": 1e-4})


def model_map(model_codec: str = "int4") -> dict:
    msg = ModelMessage(fleet="f", version=3, spec=SPEC, params=np.linspace(-1, 1, SPEC.n_params), codec=model_codec)
    return msgpack.unpackb(encode_model(msg), raw=False)


def with_fields(model_codec: str = "int4", **fields) -> bytes:
    wire = model_map(model_codec)
    wire.update(fields)
    return pack({k: v for k, v in wire.items() if v is not None})


def raw_model(*pairs: bytes) -> bytes:
    """A model map of the header, params and `pairs` (raw msgpack key-value pairs, spec among them)."""
    head = {"format": 2, "type": "model", "fleet": "f", "version": 1, "time": 1.0, "params": bytes(20)}
    return bytes([0x80 | (len(head) + len(pairs))]) + pack(head)[1:] + b"".join(pairs)


SPEC_PAIR = pack("spec") + pack(["sgd-classifier", 4, 2, {}])
SCALES = model_map()["scales"]  # float16: 2 B each of 3 rows + the intercepts' block

HOSTILE_MODELS = {
    "spec of 3 fields": (with_fields(spec=["sgd-classifier", 4, 3]), "schema"),
    "spec of 6 fields": (with_fields(spec=["sgd-classifier", 4, 3, {}, ["a"] * 4, 0]), "schema"),
    "spec a string": (with_fields(spec="sgd-classifier"), "schema"),
    "spec class count a bool": (with_fields(spec=["sgd-classifier", 4, True, {}]), "schema"),
    "spec class count negative": (with_fields(spec=["sgd-classifier", 4, -1, {}]), "decode"),
    "spec class count 2^31": (with_fields(spec=["sgd-classifier", 4, 2**31, {}]), "decode"),
    "spec class count 2^64 - 1": (with_fields(spec=["sgd-classifier", 4, 2**64 - 1, {}]), "decode"),
    "spec class count a float": (with_fields(spec=["sgd-classifier", 4, 3.0, {}]), "schema"),
    "spec n_features a bool": (with_fields(spec=["sgd-classifier", True, 3, {}]), "schema"),
    "spec n_features 2^63 - 1": (with_fields(spec=["sgd-classifier", 2**63 - 1, 3, {}]), "schema"),
    "spec classes repeated": (with_fields(spec=["sgd-classifier", 4, [1, 1, 2], {}]), "schema"),
    "spec classes of bools": (with_fields(spec=["sgd-classifier", 4, [True, False], {}]), "schema"),
    "spec classes of lists": (with_fields(spec=["sgd-classifier", 4, [[1], [2]], {}]), "schema"),
    "spec hyperparameters a list": (with_fields(spec=["sgd-classifier", 4, 3, []]), "schema"),
    "spec hyperparameter a bool for alpha": (with_fields(spec=["sgd-classifier", 4, 3, {"alpha": True}]), "schema"),
    "spec hyperparameter NaN alpha": (with_fields(spec=["sgd-classifier", 4, 3, {"alpha": float("nan")}]), "schema"),
    "spec columns of the wrong count": (with_fields(spec=["sgd-classifier", 4, 3, {}, ["a", "b"]]), "schema"),
    "spec a regressor with a class count": (with_fields(spec=["sgd-regressor", 4, 3, {}]), "schema"),
    "100,001 classes as a count": (with_fields(spec=["sgd-classifier", 4, 100_001, {}]), "decode"),
    "100,000 classes as a count, params for 3": (with_fields(spec=["sgd-classifier", 4, 100_000, {}]), "shape"),
    "int4 without scales": (with_fields(scales=None), "shape"),
    "int4 scales one short": (with_fields(scales=SCALES[:-2]), "shape"),
    "int4 scales one byte odd": (with_fields(scales=SCALES + b"\0"), "shape"),
    "int4 scales a string": (with_fields(scales="scales"), "shape"),
    "int4 float16 scale NaN": (with_fields(scales=b"\x00\x7e" + SCALES[2:]), "non_finite"),
    "int4 float16 scale Inf": (with_fields(scales=b"\x00\x7c" + SCALES[2:]), "non_finite"),
    "int4 float16 scale zero": (with_fields(scales=b"\x00\x00" + SCALES[2:]), "non_finite"),
    "int4 float16 scale negative": (with_fields(scales=b"\x00\xbc" + SCALES[2:]), "non_finite"),
    "int4 value -8": (with_fields(params=b"\x00" + model_map()["params"][1:]), "shape"),
    "float32 with scales": (with_fields("float32", scales=SCALES), "schema"),
    "int8 scales as float64": (with_fields("int8", scales=bytes(8 * 4)), "shape"),
    "float16 params NaN": (with_fields("float16", params=b"\x00\x7e" * SPEC.n_params), "non_finite"),
    "unknown codec": (with_fields(codec="int2", scales=None), "codec"),
    "codec a list": (with_fields(codec=["int4"], scales=None), "codec"),
    "unknown codec with scales": (with_fields(codec="int2"), "schema"),
    "steps a bool": (with_fields(steps=True), "schema"),
    "steps 2^53": (with_fields(steps=2**53), "schema"),
    # nested 1020 deep: unpacked below SCAN_ABOVE_BYTES, their repr in the error overflowed Python's recursion
    "hyperparameter nested 1020 deep": (raw_model(pack("spec") + b"\x94" + pack("sgd-classifier") + b"\x04\x02\x81"
                                                  + pack("alpha") + nested()), "decode"),
    "codec nested 1020 deep": (raw_model(SPEC_PAIR, pack("codec") + nested()), "decode"),
    "codec nested 1020 deep, with scales": (raw_model(SPEC_PAIR, pack("codec") + nested(), pack("scales") + pack(b"")),
                                            "decode"),
    "steps nested 1020 deep": (raw_model(SPEC_PAIR, pack("steps") + nested()), "decode"),
    "format nested 1020 deep": (b"\x85" + pack("format") + nested() + pack("type") + pack("model") + pack("fleet")
                                + pack("f") + SPEC_PAIR + pack("params") + pack(bytes(20)), "decode"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE_MODELS))
def test_a_hostile_model_is_one_protocol_error_with_its_reason(name):
    payload, reason = HOSTILE_MODELS[name]
    error, peak = refusal(lambda p: decode_model(p, fleet="f"), payload)
    assert error.reason == reason, error
    assert "\n" not in str(error) and len(str(error)) < 400, str(error)
    if "100,000" not in name:  # a count of classes builds them (bounded by max_classes), measured below
        bounded(payload, peak, dense=SPEC.n_params)


def test_a_class_count_builds_no_more_than_max_classes_allow():
    """The positional spec's count builds its classes before params are checked: bounded by max_classes
    (~11 MB at the ceiling of 100,000, ~110 B a class; an agent's --max-classes lowers it)."""
    payload = with_fields(spec=["sgd-classifier", 4, 100_000, {}])
    assert len(payload) < 200
    _, peak = refusal(lambda p: decode_model(p, fleet="f"), payload)
    assert peak < 100_000 * 200
    _, peak = refusal(lambda p: decode_model(p, fleet="f", max_classes=1000), payload)
    assert peak < 64 * 1024


def random_value(rng: random.Random, depth: int = 0):
    kind = rng.randrange(14 if depth < 3 else 12)
    if kind == 12:
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    if kind == 13:
        return {str(rng.randrange(5)): random_value(rng, depth + 1) for _ in range(rng.randrange(3))}
    return [None, True, False, 0, -1, 2**63 - 1, -2**63, 1.5, float("nan"), float("inf"), "int4",
            bytes(rng.randrange(12))][kind]


def test_random_fields_and_flipped_bytes_are_protocol_errors_only():
    """2,000 models and updates with one field replaced by a random value or a few bytes flipped: each decodes or
    raises ProtocolError (seeded)."""
    rng = random.Random(7)
    honest_update = update(["int8", N, 0.1, bytes(5), "ef", 5, HONEST_EF])
    for _ in range(1000):
        wire = model_map(rng.choice(codec.MODEL_CODECS))
        spec = wire["spec"]
        where = rng.randrange(3)
        if where == 0:
            spec[rng.randrange(len(spec))] = random_value(rng)
        elif where == 1:
            wire[rng.choice(sorted(wire) + ["pace", "scaling", "acks", "scales"])] = random_value(rng)
        else:
            spec[3] = {rng.choice(sorted(("alpha", "loss", "penalty", "eta0", "l1_ratio", "fit_intercept"))): random_value(rng)}
        flipped = bytearray(pack(wire))
        for _ in range(rng.randrange(1, 4)):
            flipped[rng.randrange(len(flipped))] = rng.randrange(256)
        delta = ["int8", N, 0.1, bytes(5), "ef", 5, HONEST_EF]
        delta[rng.randrange(len(delta))] = random_value(rng)
        flipped_update = bytearray(honest_update)
        flipped_update[rng.randrange(len(flipped_update))] = rng.randrange(256)
        for decode, payload in ((lambda p: decode_model(p, fleet="f"), pack(wire)),
                                (lambda p: decode_model(p, fleet="f"), bytes(flipped)),
                                (decode_delta, update(delta)), (decode_delta, bytes(flipped_update))):
            try:
                decode(payload)
            except ProtocolError:
                pass


def start_coordinator(mosquitto, tmp_path, fleet: str):
    """A real coordinator of 4 features and 3 classes (15 parameters) on `fleet`, fed by hand (no statistics)."""
    return spawn("coordinator", "--broker", mosquitto.url, "--fleet", fleet, "--model", "sgd-classifier",
                 "--n-features", 4, "--classes", "0,1,2", "--publish-interval", "0.2", "--no-feature-stats",
                 log=tmp_path / "coordinator.log")


def shut_down(client, watcher, proc) -> None:
    client.loop_stop()
    client.disconnect()
    watcher.close()
    assert stop(proc) == 0


def test_the_coordinator_counts_hostile_wire_updates_and_keeps_folding_honest_ones(mosquitto, tmp_path):
    """A real coordinator on a real mosquitto gets a nested update (RecursionError before the fix: counted as
    'internal', with a traceback), a bad Elias-Fano index and a NaN scale between honest top-k updates: it counts
    each refusal under its reason in its status and accepts every honest update."""
    topics = Topics("hostile-wire")
    n_params = 3 * 4 + 3  # 4 features, 3 classes
    watcher = TopicWatcher(mosquitto.port, topics.coordinator_status)
    coordinator = start_coordinator(mosquitto, tmp_path, topics.fleet)
    client = publisher(mosquitto)
    status = lambda: watcher.json(topics.coordinator_status) or {}  # noqa: E731
    hostile = [HOSTILE_UPDATES["quantizer nested 1020 deep"][0],
               update(["int8", n_params, 0.1, bytes(2), "ef", 2, ef_low(2, n=n_params) + ef_high(2, [0, 1], n=n_params)]),
               update(["int8", n_params, float("nan"), bytes(n_params)])]
    rng = np.random.default_rng(0)
    try:
        watcher.wait_for(lambda: "version" in status(), 60, "the coordinator's status")
        for i, payload in enumerate(hostile):
            honest = UpdateMessage(f"h{i}", 1, status()["version"], 10,
                                   codec.encode(rng.normal(0, 0.01, n_params), "topk:0.3+int4", rng))
            client.publish(topics.update("evil"), payload, qos=1).wait_for_publish(30)
            client.publish(topics.update(f"h{i}"), encode_update(honest), qos=1).wait_for_publish(30)
        seen = watcher.wait_for(lambda: (s := status()) and s.get("accepted", 0) + sum(s["rejected"].values()) >= 6
                                and s, 60, "six updates judged")
        assert seen["accepted"] == 3, seen
        assert seen["rejected"] == {"decode": 1, "shape": 1, "non_finite": 1}, seen["rejected"]
        assert coordinator.poll() is None
    finally:
        shut_down(client, watcher, coordinator)
    assert "Traceback" not in (tmp_path / "coordinator.log").read_text()


def test_an_agent_told_of_many_distinct_unusable_models_keeps_a_bounded_memory(caplog):
    """An agent says each unusable model's reason once: it remembered every distinct message said, and a broker
    publishing models of format 1000, 1001, ... (or a hyperparameter list ~60 KB long in each) grew that set
    without bound (2,000 formats: 2,000 entries, ~330 KB; 200 long ones: ~12 MB). It remembers the reason codes."""

    agent = Agent("a1", Topics("f"), ArraySource(np.zeros((4, 4)), np.array([0, 1, 2, 0])), LocalTrainer())
    with caplog.at_level("WARNING", logger="edge_agent.agent"):
        for i in range(2000):
            assert agent.on_model(with_fields(format=1000 + i)) is False
        assert agent.on_model(with_fields(spec=["sgd-classifier", 4, 3, {"alpha": ["x" * 250] * 200}])) is False
    assert agent.unusable_models_ == 2001
    assert len(agent.unusable_said_) <= 2, agent.unusable_said_
    assert len(caplog.records) == 2 and all(len(r.getMessage()) < 1000 for r in caplog.records)


SCHEMA_TAIL = pack("columns") + pack(["a"]) + pack("labels") + pack(None)
OTHER_DEVICE_MESSAGES = {  # the agent's retained schema and statistics, decoded by the coordinator: the same header check
    "schema format nested 1020 deep": ("schema", b"\x84" + pack("format") + nested() + pack("type") + pack("schema")
                                       + SCHEMA_TAIL),
    "schema type nested 1020 deep": ("schema", b"\x84" + pack("format") + pack(2) + pack("type") + nested() + SCHEMA_TAIL),
    "stats format nested 1020 deep": ("stats", b"\x82" + pack("format") + nested() + pack("type") + pack("stats")),
    "stats type nested 1020 deep": ("stats", b"\x82" + pack("format") + pack(2) + pack("type") + nested()),
}


@pytest.mark.parametrize("name", sorted(OTHER_DEVICE_MESSAGES))
def test_a_schema_or_statistics_nested_deep_is_a_protocol_error(name):
    kind, payload = OTHER_DEVICE_MESSAGES[name]
    error, _ = refusal(decode_schema if kind == "schema" else lambda p: decode_stats(p, 4), payload)
    assert error.reason == "decode", error


def test_an_agent_refuses_a_class_count_beyond_its_max_classes_before_building_the_classes():
    """A 96-byte model whose positional spec counts 100,000 classes built them all (~11 MB traced) before the
    agent's --max-classes (1,000) refused the spec: the count is now judged first."""
    agent = Agent("a1", Topics("f"), ArraySource(np.zeros((4, 4)), np.zeros(4)), LocalTrainer())
    payload = with_fields(spec=["sgd-classifier", 4, 100_000, {}])
    usable, peak = traced(lambda: agent.on_model(payload))
    assert usable is False
    assert peak < 64 * 1024, f"peak {peak} B for a {len(payload)} B model"
    assert agent.model_ is None and agent.unusable_models_ == 1 and agent.unusable_said_ == {"limits"}


def test_a_coordinator_refuses_a_retained_class_count_before_building_the_classes():
    """At start the coordinator decodes the broker's retained model, refused unless of its own spec: a ~150-byte one
    counting 100,000 classes built them all (~10.6 MiB traced) before the spec was compared, and a list of 100,000
    labels (369 KB) ~10.5 MiB. The class count is judged first now: ~4 KiB, and for the list only what msgpack builds
    of it (~3.7 MiB). Its own retained model is still taken."""
    topics = Topics("f")
    count = with_fields(spec=["sgd-classifier", 4, 100_000, {}])
    labels = with_fields(spec=["sgd-classifier", 4, list(range(1, 100_001)), {}])
    for payload, bound in ((count, 64 * 1024), (labels, 5 * 2**20)):
        error, peak = refusal(lambda p: retained_model(p, topics, SPEC), payload)
        assert error.reason == "limits" and "class count" in str(error), error
        assert peak < bound, f"peak {peak} B for a {len(payload)} B model"
    assert retained_model(with_fields(), topics, SPEC).spec == SPEC


def test_an_agent_refuses_a_model_beyond_its_limits_before_decoding_its_params():
    """A 5 MB int4 model of 10^7 features (two parameters a byte) was decoded whole, to float64 (~128 MiB traced),
    and held, by an agent accepting 100,000 features and 4 MiB of float32 parameters: its trainer refused it only
    at the next round. The agent's limits now judge the spec before the params are decoded."""

    agent = Agent("a1", Topics("f"), ArraySource(np.zeros((4, 4)), np.zeros(4)), LocalTrainer())
    spec = ModelSpec("sgd-regressor", 10_000_000)
    payload = encode_model(ModelMessage(fleet="f", version=1, spec=spec, params=np.zeros(spec.n_params), codec="int4"))
    assert len(payload) > 5_000_000
    usable, peak = traced(lambda: agent.on_model(payload))
    assert usable is False
    assert peak < 2 * len(payload) + 1_000_000, f"peak {peak} B for a {len(payload)} B model"
    assert agent.model_ is None and agent.unusable_models_ == 1
    small = ModelSpec("sgd-regressor", 4)
    assert agent.on_model(encode_model(ModelMessage(fleet="f", version=2, spec=small, params=np.zeros(5), codec="int4")))


def test_a_real_agent_counts_a_nested_and_an_oversized_model_and_trains_on_the_next(mosquitto, tmp_path):
    """A real agent gets a model whose codec is nested 1,020 deep (before the fix: a RecursionError with a traceback,
    not counted) and a 5 MB int4 model of 10^7 features (decoded whole and held before), then a usable one: it counts
    the two as unusable models (said in its log), logs no traceback, and sends an update for the third."""
    head = {"format": 2, "type": "model", "fleet": T.fleet, "version": 1, "time": 1.0, "params": bytes(20)}
    nested_model = b"\x88" + pack(head)[1:] + SPEC_PAIR + pack("codec") + nested()
    spec = ModelSpec("sgd-regressor", 10_000_000)
    huge = encode_model(ModelMessage(fleet=T.fleet, version=2, spec=spec, params=np.zeros(spec.n_params), codec="int4"))
    agent, watcher = start_agent(mosquitto, tmp_path)
    client = publisher(mosquitto)
    try:
        for payload in (nested_model, huge):
            client.publish(T.model, payload, qos=1).wait_for_publish(60)
        client.publish(T.model, raw_map_model(3, [0, 1, 2], {}), qos=1).wait_for_publish(60)
        watcher.wait_for(lambda: T.update("a1") in watcher.latest, 60, "an update for the usable model")
        assert agent.poll() is None
    finally:
        shut_down(client, watcher, agent)
    log = (tmp_path / "agent.log").read_text()
    assert "Traceback" not in log, log
    assert "unusable model message: decode: msgpack nested deeper than 3" in log, log
    assert "unusable model message: limits: the model has 10000000 features" in log and "(--max-features)" in log, log


def test_a_coordinator_refuses_a_retained_model_of_another_spec_before_decoding_its_params(mosquitto, tmp_path):
    """A broker's retained 5 MB int4 model of 10^7 features on the coordinator's own model topic: the coordinator
    decoded it whole (float64: ~128 MiB more) before adopt() saw the spec was not its own; it now refuses it on the
    spec, its peak RSS under the 200 MB of one hostile message (test_hostile_messages)."""
    topics = Topics("hostile-retained")
    spec = ModelSpec("sgd-regressor", 10_000_000)
    huge = encode_model(ModelMessage(fleet=topics.fleet, version=9, spec=spec, params=np.zeros(spec.n_params),
                                     codec="int4"))
    client = publisher(mosquitto)
    client.publish(topics.model, huge, qos=1, retain=True).wait_for_publish(60)
    watcher = TopicWatcher(mosquitto.port, topics.coordinator_status)
    coordinator = start_coordinator(mosquitto, tmp_path, topics.fleet)
    try:
        status = watcher.wait_for(lambda: watcher.json(topics.coordinator_status), 60, "the coordinator's status")
        peak = peak_rss_mb(coordinator.pid)
        assert status["version"] < 9, status
        assert peak < 200, f"coordinator peak RSS {peak:.0f} MB after a retained {len(huge)} B model"
    finally:
        client.publish(topics.model, b"", qos=1, retain=True).wait_for_publish(60)
        shut_down(client, watcher, coordinator)
    assert "ignoring the retained model" in (tmp_path / "coordinator.log").read_text()


@pytest.mark.parametrize("kind", ["cohort", "key", "share", "masked"])
def test_a_secure_aggregation_message_nested_deep_is_refused_at_decoding(kind):
    """Below SCAN_ABOVE_BYTES a secure-aggregation message's fields could nest ~1,020 deep past `limits`' depth of 3:
    an agent's repr of a cohort's threshold nested so raised RecursionError (a traceback in its log)."""
    payload = b"\x82" + pack("type") + pack(kind) + pack("threshold") + nested()
    with pytest.raises(secagg.SecAggError, match="nested deeper than 3"):
        secagg.decode(payload, kind, n_params=10)
