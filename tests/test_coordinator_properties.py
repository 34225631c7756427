"""Property-based tests of the coordinator core under hostile input (hypothesis, stateful).

Random sequences of well-formed updates, replays, stale and future bases, NaN/Inf deltas,
wrong shapes, huge declared sizes, negative or absurd sample counts, absurd norms,
random bytes, truncated and oversized payloads go through `Coordinator.handle_update`.
Each gives the typed reason and one count under it; nothing raises; the model stays
finite and every piece of state the coordinator keeps stays within its bound.
"""

import msgpack
import numpy as np
from hypothesis import HealthCheck, assume, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from coordinator.server import Coordinator
from coordinator.strategies import FedBuff
from coordinator.validation import NormBound, UpdateValidator
from protocol import codec
from protocol.messages import FORMAT_VERSION, MAX_SAMPLES, UpdateMessage, encode_update
from protocol.model_spec import ModelSpec
from protocol.topics import Topics

TOPICS = Topics("f")
SPEC = ModelSpec("sgd-classifier", 3, (0, 1, 2))
N = SPEC.n_params
AGENTS = st.sampled_from([f"a{i}" for i in range(6)])
MAX_AGENTS, MAX_STALENESS, BUFFER, HISTORY, MAX_NORM, MAX_BYTES = 4, 3, 3, 4, 100.0, 16 * 1024
DECODE_REASONS = {"decode", "schema", "shape", "non_finite", "oversize", "codec", "format"}
small_vectors = st.lists(st.floats(-10, 10), min_size=N, max_size=N).map(np.array)  # norm <= 35 < MAX_NORM
quantizers = st.sampled_from(["float32", "int8", "int4", "topk:0.5+int8"])


def float32_delta(values) -> codec.Encoded:
    return codec.Encoded("float32", len(values), np.asarray(values, dtype="<f4").tobytes())


NOW = 1_700_000_000.0  # the validator's clock: seqs above NOW + a day are future_seq


class HostileFleet(RuleBasedStateMachine):
    """One coordinator core; each rule sends one kind of payload and checks its verdict."""

    def __init__(self) -> None:
        super().__init__()
        validator = UpdateValidator(TOPICS, N, max_staleness=MAX_STALENESS, norm=NormBound(MAX_NORM, factor=3.0),
                                    max_agents=MAX_AGENTS, max_bytes=MAX_BYTES, clock=lambda: NOW)
        self.core = Coordinator(TOPICS, SPEC, FedBuff(buffer_size=BUFFER), validator, history=HISTORY)
        self.sent: list[tuple[UpdateMessage, bytes]] = []

    def send(self, agent: str, payload: bytes, expected: str | set | None) -> None:
        core = self.core
        before, version = core.rejected_.copy(), core.version_
        reason = core.handle_update(TOPICS.update(agent), payload)
        event(f"verdict: {reason or 'accepted'}")  # --hypothesis-show-statistics shows the mix
        if isinstance(expected, set):
            assert reason in expected, reason
        else:
            assert reason == expected, (reason, expected)
        if reason is not None:
            assert core.rejected_[reason] == before[reason] + 1 and core.version_ == version

    def fresh_seq(self, agent: str) -> int:
        return self.core.validator.highest_seq.get(agent, 0) + 1

    def admitted(self, agent: str, reason: str) -> str:
        """`reason` for a check made after the replay state admits `agent` (too_many_agents if it cannot)."""
        known = self.core.validator.highest_seq
        return "too_many_agents" if agent not in known and len(known) >= MAX_AGENTS else reason

    def expected_for(self, msg: UpdateMessage) -> str | None:
        """What a well-formed update should get, from the coordinator's state before it."""
        validator = self.core.validator
        last = validator.highest_seq.get(msg.agent_id)
        if last is not None and msg.seq <= last:
            return "replay"  # remembered for good: a new agent past the bound is refused instead
        if msg.seq > (NOW + validator.max_seq_ahead) * 1e6:
            return "future_seq"
        if last is None and len(validator.highest_seq) >= MAX_AGENTS:
            return "too_many_agents"
        if self.core.version_ - msg.base_version > MAX_STALENESS:
            return "too_stale"
        return "norm" if np.linalg.norm(codec.decode(msg.delta)) > validator.norm.limit(msg.agent_id) else None

    @rule(agent=AGENTS, seq=st.integers(0, 2**62), back=st.integers(0, MAX_STALENESS + 2),
          n=st.integers(1, 10_000), values=small_vectors, quant=quantizers)
    def well_formed(self, agent, seq, back, n, values, quant):
        enc = codec.encode(values, quant, np.random.default_rng(0))
        msg = UpdateMessage(agent, seq, max(0, self.core.version_ - back), n, enc)
        payload = encode_update(msg)
        self.send(agent, payload, self.expected_for(msg))
        self.sent.append((msg, payload))

    @rule(data=st.data())
    def redelivered(self, data):
        if self.sent:  # a QoS 1 duplicate of an earlier update
            msg, payload = data.draw(st.sampled_from(self.sent))
            self.send(msg.agent_id, payload, self.expected_for(msg))

    @rule(agent=AGENTS, at=st.integers(0, N - 1), bad=st.sampled_from([np.nan, np.inf, -np.inf]))
    def non_finite(self, agent, at, bad):
        values = np.zeros(N)
        values[at] = bad
        payload = encode_update(UpdateMessage(agent, self.fresh_seq(agent), self.core.version_, 10, float32_delta(values)))
        self.send(agent, payload, self.admitted(agent, "non_finite"))

    @rule(agent=AGENTS, n=st.integers(1, 64).filter(lambda n: n != N))
    def wrong_shape(self, agent, n):
        payload = encode_update(UpdateMessage(agent, self.fresh_seq(agent), self.core.version_, 10, float32_delta(np.zeros(n))))
        self.send(agent, payload, "shape")

    @rule(agent=AGENTS, n=st.integers(2**26, 2**62))
    def huge_declared_size(self, agent, n):
        payload = encode_update(UpdateMessage(agent, self.fresh_seq(agent), self.core.version_, 10,
                                              codec.Encoded("int8", n, b"\x00" * 8)))
        self.send(agent, payload, "shape")

    @rule(agent=AGENTS, n=st.integers(-(2**63), 0) | st.integers(MAX_SAMPLES + 1, 2**64 - 1))
    def negative_or_absurd_samples(self, agent, n):
        payload = encode_update(UpdateMessage(agent, self.fresh_seq(agent), self.core.version_, n, float32_delta(np.zeros(N))))
        self.send(agent, payload, "schema")

    @rule(agent=AGENTS, ahead=st.integers(1, 2**40))
    def future_base(self, agent, ahead):
        payload = encode_update(UpdateMessage(agent, self.fresh_seq(agent), self.core.version_ + ahead, 10,
                                              float32_delta(np.zeros(N))))
        self.send(agent, payload, "future_base")

    @rule(agent=AGENTS, scale=st.floats(1e3, 1e30))
    def absurd_norm(self, agent, scale):
        payload = encode_update(UpdateMessage(agent, self.fresh_seq(agent), self.core.version_, 10,
                                              float32_delta(np.full(N, scale))))
        self.send(agent, payload, self.admitted(agent, "norm"))

    @rule(agent=AGENTS, junk=st.binary(max_size=256))
    def random_bytes(self, agent, junk):
        self.send(agent, junk, DECODE_REASONS)

    @rule(agent=AGENTS, cut=st.floats(0, 1, exclude_max=True))
    def truncated(self, agent, cut):
        payload = encode_update(UpdateMessage(agent, self.fresh_seq(agent), self.core.version_, 10, float32_delta(np.zeros(N))))
        self.send(agent, payload[:int(cut * len(payload))], DECODE_REASONS)

    @rule(agent=AGENTS, field=st.integers(0, 6), value=st.none() | st.booleans() | st.text(max_size=5)
          | st.floats() | st.lists(st.integers(-(2**63), 2**64 - 1), max_size=3))
    def wrong_type(self, agent, field, value):
        assume(not (field == 0 and value == FORMAT_VERSION))  # 2.0 is the format too
        wire = msgpack.unpackb(encode_update(UpdateMessage(agent, self.fresh_seq(agent), 0, 10, float32_delta(np.zeros(N)))))
        wire[field] = value
        self.send(agent, msgpack.packb(wire), DECODE_REASONS)

    @rule(agent=AGENTS, extra=st.integers(1, 4096))
    def oversized(self, agent, extra):
        self.send(agent, b"\x00" * (MAX_BYTES + extra), "oversize")

    @rule()
    def publish(self):
        self.core.model_payload()

    @invariant()
    def every_payload_counted_once(self):
        core = self.core
        assert core.accepted_ + sum(core.rejected_.values()) == core.handled_
        assert "internal" not in core.rejected_

    @invariant()
    def model_finite(self):
        assert np.isfinite(self.core.params_).all()

    @invariant()
    def memory_bounded(self):
        core = self.core
        assert len(core.validator.highest_seq) <= MAX_AGENTS
        assert core.strategy.pending < BUFFER
        assert len(core.published_) <= HISTORY
        assert all(len(recent) <= core.validator.norm.window for recent in core.validator.norm.recent)


HostileFleet.TestCase.settings = settings(max_examples=300, stateful_step_count=50, deadline=None,
                                          suppress_health_check=[HealthCheck.too_slow])
test_hostile_fleet = HostileFleet.TestCase
