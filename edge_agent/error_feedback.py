"""Error feedback for lossy codecs: what compression dropped this round is sent later.

EF-SGD (Stich et al., 2018; Karimireddy et al., 2019): keep the residual r (zero at
first); to send delta d, encode v = d + r and keep r = v - decode(encoded). Over rounds
nothing is lost, only delayed, which is what lets top-k + int4 keep accuracy: the sum of
everything sent plus the final residual equals the sum of the deltas.
"""

from __future__ import annotations

import numpy as np

from protocol import codec


class ErrorFeedback:
    """Encodes deltas with `spec`, carrying the compression error into the next round."""

    def __init__(self, spec: codec.CodecSpec | str, rng: np.random.Generator | None = None) -> None:
        self.spec = codec.CodecSpec.parse(spec) if isinstance(spec, str) else spec
        self.rng = rng if rng is not None else np.random.default_rng()
        self.residual_: np.ndarray | None = None

    def encode(self, delta: np.ndarray) -> codec.Encoded:
        """Encode `delta` plus the carried residual; keep what the encoding lost."""
        delta = np.asarray(delta, dtype=np.float64).ravel()
        if self.residual_ is None or self.residual_.shape != delta.shape:
            self.residual_ = np.zeros_like(delta)  # a new model shape: the old error means nothing
        corrected = delta + self.residual_
        encoded = codec.encode(corrected, self.spec, self.rng)
        self.residual_ = corrected - codec.decode(encoded).astype(np.float64)
        return encoded

    def reset(self) -> None:
        """Forget the residual (the fleet's model spec changed)."""
        self.residual_ = None
