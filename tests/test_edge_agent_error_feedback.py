"""edge_agent.error_feedback: compression error is delayed, never lost."""

import numpy as np
import pytest

from edge_agent.error_feedback import ErrorFeedback
from protocol import codec


@pytest.mark.parametrize("spec", ["float32", "int8", "int4", "topk:0.1+int4", "topk:0.05+float32"])
def test_sent_plus_residual_is_the_sum_of_deltas(spec):
    rng = np.random.default_rng(0)
    ef = ErrorFeedback(spec, np.random.default_rng(1))
    deltas = [rng.normal(size=300) for _ in range(30)]
    sent = np.zeros(300)
    for d in deltas:
        sent += codec.decode(ef.encode(d)).astype(np.float64)
    np.testing.assert_allclose(sent + ef.residual_, np.sum(deltas, axis=0), rtol=0, atol=1e-9)


def test_residual_is_what_the_codec_dropped():
    ef = ErrorFeedback("topk:0.1+int8", np.random.default_rng(0))
    assert ef.residual_ is None  # zero until the first delta
    d = np.random.default_rng(1).normal(size=100)
    enc = ef.encode(d)
    assert enc.k == 10
    np.testing.assert_array_equal(ef.residual_, d - codec.decode(enc).astype(np.float64))
    assert np.count_nonzero(ef.residual_) >= 90  # the 90 coordinates not sent are all carried


def test_error_feedback_sends_small_coordinates_eventually():
    """With top-k alone a coordinate that is never among the largest is never sent; with EF it is."""
    ef = ErrorFeedback("topk:0.5+float32", np.random.default_rng(0))
    d = np.array([1.0, 0.1])
    sent = [codec.decode(ef.encode(d)) for _ in range(20)]
    assert any(s[1] != 0 for s in sent)


def test_a_new_shape_starts_from_zero():
    ef = ErrorFeedback("int4", np.random.default_rng(0))
    ef.encode(np.random.default_rng(1).normal(size=10))
    d = np.random.default_rng(2).normal(size=20)
    enc = ef.encode(d)
    np.testing.assert_array_equal(ef.residual_, d - codec.decode(enc).astype(np.float64))
    ef.reset()
    assert ef.residual_ is None


def test_same_seed_same_bytes():
    d = np.random.default_rng(3).normal(size=50)
    a = ErrorFeedback("int4", np.random.default_rng(7)).encode(d)
    b = ErrorFeedback(codec.CodecSpec.parse("int4"), np.random.default_rng(7)).encode(d)
    assert a == b
