"""The Gaussian mechanism on a model delta: clip its L2 norm to C, add N(0, (sigma C)^2) per coordinate.

Pure functions (no I/O, no MQTT): the agent applies them to its float delta before any
codec or error feedback touches it (local DP); the coordinator applies them to the sum
of a buffer (central DP). Noise comes from numpy's default generator seeded from the
operating system's entropy (`secrets`), never from a seed a user or a test passed in for
training: a reproducible noise stream is a removable one.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import numpy as np


def secure_rng() -> np.random.Generator:
    """A generator seeded with 128 bits from the operating system (`secrets`)."""
    return np.random.default_rng(secrets.randbits(128))


def clip(delta: np.ndarray, max_norm: float) -> tuple[np.ndarray, bool]:
    """`delta` scaled down to L2 norm `max_norm` if it is longer; (float64 copy, was it clipped)."""
    if not max_norm > 0 or not math.isfinite(max_norm):
        raise ValueError(f"the clipping norm must be a finite number > 0, got {max_norm}")
    delta = np.array(delta, dtype=np.float64).ravel()
    if not np.isfinite(delta).all():
        raise ValueError("cannot clip a delta with non-finite values")
    norm = float(np.linalg.norm(delta))
    if norm > max_norm:
        return delta * (max_norm / norm), True
    return delta, False


def gaussian_noise(shape: int | tuple[int, ...], std: float, rng: np.random.Generator) -> np.ndarray:
    """Independent N(0, std^2) draws of `shape` (std = noise multiplier x clipping norm)."""
    if not std >= 0 or not math.isfinite(std):
        raise ValueError(f"noise standard deviation must be finite and >= 0, got {std}")
    return rng.normal(0.0, std, size=shape) if std > 0 else np.zeros(shape)


@dataclass(frozen=True)
class GaussianMechanism:
    """Clip to `clip_norm` (C), add noise of standard deviation `noise_multiplier` x C (sigma C)."""

    clip_norm: float
    noise_multiplier: float

    def __post_init__(self) -> None:
        if not self.clip_norm > 0 or not math.isfinite(self.clip_norm):
            raise ValueError(f"--dp-clip must be a finite number > 0, got {self.clip_norm}")
        if not self.noise_multiplier > 0 or not math.isfinite(self.noise_multiplier):
            raise ValueError(f"--dp-noise must be a finite number > 0 (no noise is no privacy), got {self.noise_multiplier}")

    @property
    def std(self) -> float:
        """Standard deviation of the noise on each coordinate: sigma x C."""
        return self.noise_multiplier * self.clip_norm

    def privatize(self, delta: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, bool]:
        """clip(delta, C) + N(0, (sigma C)^2 I); (the privatized float64 delta, was it clipped)."""
        clipped, was_clipped = clip(delta, self.clip_norm)
        return clipped + gaussian_noise(clipped.shape, self.std, rng), was_clipped

    def noise_sum(self, total: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """A sum of updates each of norm <= C, plus N(0, (sigma C)^2 I): one Gaussian release."""
        total = np.asarray(total, dtype=np.float64)
        return total + gaussian_noise(total.shape, self.std, rng)
