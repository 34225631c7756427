"""The agent's protocol state machine: no threads, no sockets.

`AgentSession` (one process, one MQTT client) and the simulator (thousands of agents on
one event loop) both drive it: hand it model payloads, ask it for update payloads.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from edge_agent.data import DataSource
from edge_agent.error_feedback import ErrorFeedback
from edge_agent.trainer import LocalTrainer
from protocol.errors import ProtocolError
from protocol.messages import ModelMessage, UpdateMessage, decode_model, encode_update
from protocol.tabular import DataError
from protocol.topics import Topics, check_name

log = logging.getLogger(__name__)


class Agent:
    """One device: newest global model in, encoded delta out.

    Sequence numbers start at the start time in microseconds and add one per update, so
    they keep increasing across restarts without a state file (the coordinator keeps the
    highest seq per agent and refuses anything at or below it as a replay).
    """

    def __init__(
        self,
        agent_id: str,
        topics: Topics,
        source: DataSource,
        trainer: LocalTrainer,
        codec: str = "int8",
        *,
        min_new_samples: int = 0,
        train_every: float | None = None,
        seed: int | None = None,
    ) -> None:
        self.agent_id = check_name("agent id", agent_id)
        self.topics = topics
        self.source = source
        self.trainer = trainer
        self.feedback = ErrorFeedback(codec, np.random.default_rng(seed))
        self.min_new_samples = min_new_samples
        self.train_every = train_every
        self.model_: ModelMessage | None = None
        self.trained_version_ = -1
        self.last_train_at_ = 0.0
        self.new_samples_ = 0
        self.seq_ = time.time_ns() // 1000
        self.updates_sent_ = 0
        self.last_metrics_: dict[str, float] = {}
        self.state_ = "online"

    def on_model(self, payload: bytes) -> bool:
        """Take a model payload; True when it is newer than what we hold."""
        try:
            model = decode_model(payload, fleet=self.topics.fleet)
        except ProtocolError as exc:
            log.warning("ignoring an unusable model message: %s", exc)
            return False
        if self.model_ is not None and model.version <= self.model_.version and model.spec == self.model_.spec:
            return False
        if self.model_ is not None and model.spec != self.model_.spec:
            self.feedback.reset()
        self.model_ = model
        return True

    def due(self, now: float | None = None) -> bool:
        """Train now? A newer model than the last trained one, and enough new samples;
        or, with `train_every`, that many seconds since the last round."""
        if self.model_ is None:
            return False
        now = time.monotonic() if now is None else now
        try:
            self.new_samples_ += self.source.poll()
        except DataError as exc:  # a bad appended row must not stop the device
            log.error("skipped unreadable new data: %s", exc)
        if self.train_every is not None and now - self.last_train_at_ >= self.train_every:
            return self.new_samples_ > 0 or self.model_.version > self.trained_version_
        return self.model_.version > self.trained_version_ and (
            self.new_samples_ >= self.min_new_samples or self.trained_version_ < 0
        )

    def make_update(self) -> bytes | None:
        """Train on the newest model and return the encoded update (None if nothing to send)."""
        model = self.model_
        X, y = self.source.data()
        if model is None or len(y) == 0:
            return None
        self.state_ = "training"
        try:
            result = self.trainer.train(model, X, y)
        except ValueError as exc:  # e.g. the fleet's model expects other features
            log.error("cannot train on the model at version %d: %s", model.version, exc)
            result = None
        finally:
            self.state_ = "online"
        self.trained_version_ = model.version
        self.last_train_at_ = time.monotonic()
        self.new_samples_ = 0
        if result is None:
            return None
        self.seq_ += 1
        self.updates_sent_ += 1
        self.last_metrics_ = result.metrics
        return encode_update(
            UpdateMessage(
                fleet=self.topics.fleet,
                agent_id=self.agent_id,
                seq=self.seq_,
                base_version=model.version,
                n_samples=result.n_samples,
                delta=self.feedback.encode(result.delta),
                # only the federated evaluation travels; train_* stays in the status
                metrics={k: v for k, v in result.metrics.items() if k.startswith("eval_")},
            )
        )

    def status(self, state: str | None = None) -> dict:
        """Retained JSON status for `agent/<id>/status`."""
        return {
            "agent": self.agent_id,
            "state": state or self.state_,
            "version": self.trained_version_ if self.trained_version_ >= 0 else None,
            "model_version": self.model_.version if self.model_ else None,
            "seq": self.seq_,
            "updates_sent": self.updates_sent_,
            "samples": len(self.source.data()[1]),
            "codec": str(self.feedback.spec),
            "metrics": self.last_metrics_,
            "time": time.time(),
        }


def offline_status(agent_id: str) -> dict:
    """The last will: what the broker publishes when the agent vanishes."""
    return {"agent": agent_id, "state": "offline"}

