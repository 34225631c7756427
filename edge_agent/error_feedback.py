"""Error feedback for lossy codecs: what compression dropped this round is sent later.

EF-SGD (Karimireddy et al., 2019): keep the residual r; send encode(delta + r); r becomes
(delta + r) - decode(sent). Over rounds nothing is lost, only delayed, which is what lets
top-k + int4 keep accuracy.
"""

from __future__ import annotations

import numpy as np

from protocol import codec


class ErrorFeedback:
    """Encodes deltas with `spec`, carrying the compression error into the next round."""

    def __init__(self, spec: codec.CodecSpec | str, rng: np.random.Generator | None = None) -> None:
        self.spec = codec.CodecSpec.parse(spec) if isinstance(spec, str) else spec
        self.rng = rng or np.random.default_rng()
        self.residual_: np.ndarray | None = None

    def encode(self, delta: np.ndarray) -> codec.Encoded:
        delta = np.asarray(delta, dtype=np.float64)
        if self.residual_ is None or self.residual_.shape != delta.shape:
            self.residual_ = np.zeros_like(delta)
        corrected = delta + self.residual_
        encoded = codec.encode(corrected, self.spec, self.rng)
        self.residual_ = corrected - codec.decode(encoded)
        return encoded

    def reset(self) -> None:
        self.residual_ = None
