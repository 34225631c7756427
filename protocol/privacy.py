"""The Gaussian mechanism on a model delta: clip its L2 norm to C, add noise of std sigma C per coordinate.

Pure functions (no I/O, no MQTT): the agent applies them to its float delta before any
codec or error feedback touches it (local DP); the coordinator applies them to the sum
of a buffer (central DP).

The noise (docs/security.md, "The noise generator"): a float64 Gaussian drawn from a
pseudo-random generator has two known weaknesses, a predictable stream once its state
is known (numpy's PCG64 is not a CSPRNG) and the floating-point attack surface (the
low-order bits of `x + N(0, s^2)` say where x was). So:

- randomness comes from the operating system's CSPRNG (`os.urandom`) through
  `SecureRandom`, never from a seed a user or a test passed in for training;
- a release is the *discrete Gaussian mechanism* (Canonne, Kamath and Steinke 2020) on a
  lattice gamma Z^d: the value is rounded to the lattice, then an integer vector drawn
  from the discrete Gaussian N_Z(0, (s / gamma)^2) is added, and the result scaled by
  gamma, a power of two, so every output is exactly representable and lies on the same
  lattice whatever the input. The discrete Gaussian has the Renyi divergence of the
  continuous one for the same integer shift (CKS Theorem 15), so `GaussianDpEvent`
  accounting holds; the rounding can move two neighbours apart by gamma sqrt(d) more,
  and the noise is widened by exactly that (gamma <= 2^-20 x sensitivity / sqrt(d), so
  by less than one part in a million): the accounted sigma stays sigma.

The sampler is CKS Algorithm 3 (rejection from a discrete Laplace, here the difference of
two geometrics), vectorized; its acceptance probabilities are computed in float64 rather
than the exact rational arithmetic of CKS (documented in docs/security.md).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

# The lattice step is the largest power of two <= 2^-LATTICE_BITS x sensitivity / sqrt(d).
LATTICE_BITS = 20
_MAX_INT = 2.0 ** 52  # lattice coordinates and noise draws stay exact integers in float64


class SecureRandom:
    """Uniform draws from the operating system's CSPRNG (os.urandom), 53 bits each."""

    def random(self, n: int) -> np.ndarray:
        """`n` independent uniforms in [0, 1) with 53-bit resolution."""
        words = np.frombuffer(os.urandom(8 * int(n)), dtype=np.uint64)
        return (words >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


def secure_rng() -> SecureRandom:
    """The noise source of every DP release: the OS CSPRNG (not a seedable numpy generator)."""
    return SecureRandom()


def _uniform(rng, n: int) -> np.ndarray:
    """`n` uniforms in [0, 1) from a `SecureRandom` (releases) or a numpy Generator (reproducible tests)."""
    return rng.random(n)


def discrete_gaussian(n: int, sigma: float, rng) -> np.ndarray:
    """`n` independent draws of the discrete Gaussian on Z, P(k) proportional to exp(-k^2 / (2 sigma^2)).

    CKS Algorithm 3: Y from the discrete Laplace of scale t = floor(sigma) + 1 (the difference
    of two geometrics), kept with probability exp(-(|Y| - sigma^2 / t)^2 / (2 sigma^2)).
    """
    if not sigma > 0 or not math.isfinite(sigma) or sigma > _MAX_INT / 64:
        raise ValueError(f"discrete Gaussian scale must be in (0, 2^46], got {sigma}")
    n = int(n)
    out = np.zeros(n, dtype=np.float64)
    todo = np.arange(n)
    t = math.floor(sigma) + 1
    while todo.size:
        m = todo.size
        u = _uniform(rng, 3 * m)
        # geometric on {0, 1, ...} with ratio exp(-1/t): floor(-t log U), U in (0, 1]
        g1 = np.floor(-t * np.log1p(-u[:m]))
        g2 = np.floor(-t * np.log1p(-u[m:2 * m]))
        y = g1 - g2
        keep = u[2 * m:] < np.exp(-((np.abs(y) - sigma * sigma / t) ** 2) / (2 * sigma * sigma))
        out[todo[keep]] = y[keep]
        todo = todo[~keep]
    return out


def lattice_step(sensitivity: float, d: int) -> float:
    """gamma: the largest power of two <= 2^-LATTICE_BITS x sensitivity / sqrt(d)."""
    return 2.0 ** math.floor(math.log2(sensitivity * 2.0 ** -LATTICE_BITS / math.sqrt(max(d, 1))))


def lattice_release(x: np.ndarray, sensitivity: float, noise_multiplier: float, rng) -> np.ndarray:
    """The discrete Gaussian mechanism: `x` (L2 sensitivity `sensitivity`) rounded to the lattice
    gamma Z^d plus discrete Gaussian noise of std noise_multiplier x (sensitivity + gamma sqrt(d)),
    as float64 values that are exact multiples of gamma."""
    x = np.asarray(x, dtype=np.float64)
    if not np.isfinite(x).all():
        raise ValueError("cannot noise non-finite values")
    if not sensitivity > 0 or not noise_multiplier > 0:
        raise ValueError("a release needs a sensitivity > 0 and a noise multiplier > 0")
    d = max(x.size, 1)
    gamma = lattice_step(sensitivity, d)
    base = np.round(x / gamma)
    if base.size and np.abs(base).max() > _MAX_INT:
        raise ValueError("value too large for its lattice: clip it first")
    sigma_z = noise_multiplier * (sensitivity + gamma * math.sqrt(d)) / gamma
    return (base + discrete_gaussian(x.size, sigma_z, rng).reshape(x.shape)) * gamma


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


def gaussian_noise(shape: int | tuple[int, ...], std: float, rng) -> np.ndarray:
    """Independent draws of std `std` (std = noise multiplier x clipping norm): discrete Gaussian
    on the lattice 2^-LATTICE_BITS x std rounded down to a power of two, so the draws are exact."""
    if not std >= 0 or not math.isfinite(std):
        raise ValueError(f"noise standard deviation must be finite and >= 0, got {std}")
    if std == 0:
        return np.zeros(shape)
    gamma = 2.0 ** math.floor(math.log2(std * 2.0 ** -LATTICE_BITS))
    n = int(np.prod(shape))
    return discrete_gaussian(n, std / gamma, rng).reshape(shape) * gamma


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
        """clip(delta, C) plus discrete Gaussian noise of std sigma C on the lattice; (the privatized
        float64 delta, was it clipped)."""
        clipped, was_clipped = clip(delta, self.clip_norm)
        return lattice_release(clipped, self.clip_norm, self.noise_multiplier, rng), was_clipped

    def noise_sum(self, total: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """A sum of updates each of norm <= C, plus N(0, (sigma C)^2 I): one Gaussian release."""
        return lattice_release(total, self.clip_norm, self.noise_multiplier, rng)
