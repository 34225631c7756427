"""protocol/chunking.py and the model codecs (protocol/codec.py encode_params): pure functions."""

from __future__ import annotations

import numpy as np
import pytest

from protocol import chunking
from protocol.codec import decode_params, encode_params
from protocol.errors import ProtocolError
from protocol.messages import ModelMessage, decode_model, encode_model
from protocol.model_spec import ModelSpec
from protocol.topics import Topics


@pytest.mark.parametrize("codec, width, tol", [("float32", 4, 1e-6), ("float16", 2, 1e-3), ("int8", 1, 1 / 254),
                                             ("int4", 0.5, 1 / 14)])
def test_model_codec_roundtrip_within_its_step(codec, width, tol):
    spec = ModelSpec("sgd-classifier", 50, (0, 1, 2))
    rng = np.random.default_rng(0)
    params = rng.normal(0, 3, spec.n_params)
    payload = encode_model(ModelMessage("f", 3, spec, params, codec=codec))
    model = decode_model(payload, fleet="f")
    assert model.codec == codec
    rows = params.reshape(-1)[: 3 * 50].reshape(3, 50)
    peak = np.repeat(np.abs(rows).max(axis=1), 50)
    err = np.abs(model.params[:150] - params[:150])
    assert (err <= tol * (peak if codec in ("int8", "int4") else np.abs(params[:150])) + 1e-12).all()
    # what the coordinator remembers is bit for bit what the agent decodes
    assert np.array_equal(decode_params(*encode_params(params, codec, 50), codec, spec.n_params, 50).astype(np.float64),
                          model.params)
    assert len(payload) < width * spec.n_params + 300


def test_int8_model_rejects_bad_scales_and_sizes():
    data, scales = encode_params(np.arange(10.0), "int8", 4)
    assert decode_params(data, scales, "int8", 10, 4)[9] == pytest.approx(9, abs=9 / 127)
    with pytest.raises(ProtocolError):
        decode_params(data, scales[:-4], "int8", 10, 4)
    with pytest.raises(ProtocolError):
        decode_params(data, b"\x00" * len(scales), "int8", 10, 4)  # zero scales
    with pytest.raises(ProtocolError):
        decode_params(data[:-1], scales, "int8", 10, 4)
    with pytest.raises(ProtocolError):
        decode_params(data, scales, "bogus", 10, 4)


def test_int4_model_packs_two_per_byte_and_rejects_bad_nibbles():
    x = np.array([-7.0, -5, -3, -1, 0, 1, 3, 5, 7])  # peak 7: scale 1, every value exact
    data, scales = encode_params(x, "int4", 9)  # odd: the last byte is padded with a zero
    assert len(data) == 5 and len(scales) == 2  # one float16 scale
    assert np.array_equal(decode_params(data, scales, "int4", 9, 9), x.astype(np.float32))
    with pytest.raises(ProtocolError):
        decode_params(data[:-1] + bytes([0x78]), scales, "int4", 9, 9)  # padding nibble not zero
    with pytest.raises(ProtocolError):
        decode_params(bytes([0x80]) + data[1:], scales, "int4", 9, 9)  # -8 is outside [-7, 7]
    with pytest.raises(ProtocolError):
        decode_params(data + b"\x88", scales, "int4", 9, 9)


def test_model_scales_travel_as_float16_unless_one_is_not_a_normal_float16():
    """Row scales are float16 (2 B a block, not 4) when every one is a normal float16; the values are quantized
    against the float16 scale, so what the coordinator remembers is what agents decode. A row whose scale
    is below float16's normal range sends all scales as float32; a decoder takes float32 scales as before."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=820)
    for codec, levels in (("int8", 127), ("int4", 7)):
        data, scales = encode_params(x, codec, 40)
        assert len(scales) == 2 * 21
        s = np.frombuffer(scales, dtype="<f2").astype(np.float64)
        out = decode_params(data, scales, codec, 820, 40).astype(np.float64)
        peaks = np.abs(np.pad(x, (0, 21 * 40 - 820))).reshape(21, 40).max(axis=1)
        assert np.allclose(s, peaks / levels, rtol=1e-3)
        step = np.repeat(peaks / levels, 40)[:820]
        assert (np.abs(out - x) <= 0.5 * step * 1.001).all()
        tiny = x * 1e-6  # peaks of ~3e-6: scales below float16's normal range
        data, scales = encode_params(tiny, codec, 40)
        assert len(scales) == 4 * 21
        assert (np.abs(decode_params(data, scales, codec, 820, 40) - tiny) <= 0.5e-6 * step * 1.001).all()
    # an older coordinator's float32 scales
    data = bytes([0xFF]) * 4 + bytes([0x8F])  # nine int4 values of +7 (the last high nibble: the zero padding)
    old = np.array([0.5], dtype="<f4").tobytes()
    assert np.array_equal(decode_params(data, old, "int4", 9, 9), np.full(9, 3.5, dtype=np.float32))
    with pytest.raises(ProtocolError, match="float16 or float32 scales"):
        decode_params(data, old[:3], "int4", 9, 9)


def test_float16_saturates_instead_of_inf():
    out = decode_params(*encode_params(np.array([1e6, -1e6, 1.0]), "float16", 3), "float16", 3, 3)
    assert np.isfinite(out).all() and out[0] == 65504


def _split(payload: bytes, room: int) -> list[chunking.Chunk]:
    return [chunking.decode_chunk(c) for c in chunking.split(payload, room)]


def test_split_assemble_roundtrip_and_checksum():
    payload = bytes(range(256)) * 41
    chunks = _split(payload, 1000)
    assert len(chunks) == 11 and all(c.count == 11 for c in chunks)
    parts = {c.index: c.data for c in chunks}
    assert chunking.assemble(chunks[0].digest, 11, parts) == payload
    del parts[3]
    assert chunking.assemble(chunks[0].digest, 11, parts) is None
    parts[3] = b"x" * len(chunks[3].data)
    assert chunking.assemble(chunks[0].digest, 11, parts) is None  # wrong bytes: checksum fails


def test_chunk_packets_fit_the_limit():
    topics = Topics("fleet")
    topic = topics.model_chunk(99_999)
    room = chunking.capacity(131072, topic)
    for raw in chunking.split(b"\x01" * (3 * room + 5), room):
        assert chunking.packet_bytes(topic, len(raw)) <= 131072


def test_manifest_roundtrip_and_detection():
    payload = b"m" * 5000
    m = chunking.manifest(payload, "f", 7, 5)
    wire = chunking.encode_manifest(m)
    assert chunking.is_manifest(wire)
    assert not chunking.is_manifest(encode_model(ModelMessage("f", 1, ModelSpec("sgd-regressor", 2), np.zeros(3))))
    assert chunking.decode_manifest(wire, fleet="f") == m
    with pytest.raises(ProtocolError):
        chunking.decode_manifest(wire, fleet="other")


def test_collector_needs_the_manifest_and_never_mixes_versions():
    old, new = b"A" * 3000, b"B" * 3000
    c_old, c_new = _split(old, 1000), _split(new, 1000)
    col = chunking.Collector(max_bytes=10_000)
    # a device joining mid-transfer: chunks 0, 1 of the new version, chunk 2 of the old one
    assert col.add(c_new[0]) is None and col.add(c_new[1]) is None and col.add(c_old[2]) is None
    assert col.expect(c_old[0].digest) is None  # the retained manifest is still the old one
    assert col.add(c_new[2]) is None  # complete, but no manifest says so yet
    assert col.expect(c_new[0].digest) == new
    # a dropped chunk: nothing assembles until it comes (e.g. retained, on resubscription)
    third = _split(b"C" * 3000, 1000)
    assert col.add(third[0]) is None and col.add(third[2]) is None
    assert col.expect(third[0].digest) is None
    assert col.add(third[1]) == b"C" * 3000


def test_collector_bounds_memory_and_reports_drops():
    col = chunking.Collector(max_bytes=5000, need_manifest=False)
    for i in range(10):
        col.add(_split(bytes([i]) * 3000, 1000)[0], key="a")
    assert col.bytes_ <= 5000 and len(col.take_dropped()) >= 5
    payload = b"z" * 2500
    chunks = _split(payload, 1000)
    assert [col.add(c, key="b") for c in chunks][-1] == payload


def test_decode_chunk_refuses_garbage():
    for bad in (b"", b"\x93\x02\xa5chunk\x00", chunking.split(b"x" * 10, 4)[0][:-1]):
        with pytest.raises(ProtocolError):
            chunking.decode_chunk(bad)


@pytest.mark.parametrize("codec", ["float16", "int8", "int4"])
def test_the_coordinator_remembers_exactly_what_agents_decode(codec):
    from coordinator.server import Coordinator
    from coordinator.strategies import make_strategy
    from coordinator.validation import UpdateValidator

    topics = Topics("f")
    spec = ModelSpec("sgd-classifier", 40, (0, 1, 2))
    core = Coordinator(topics, spec, make_strategy("fedasync"), UpdateValidator(topics, spec.n_params), model_codec=codec)
    core.params_ = np.random.default_rng(1).normal(0, 2, spec.n_params)
    model = decode_model(core.model_payload(), fleet="f")
    assert model.codec == codec and np.array_equal(core.published_[model.version].astype(np.float64), model.params)
    assert not np.array_equal(model.params, core.params_)  # lossy, and the float64 model is kept
