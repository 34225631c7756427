"""Issue 19 point 10: the DP noise comes from the OS CSPRNG and a discrete Gaussian on a lattice.

Statistical tests of the sampler against the exact discrete Gaussian pmf, and of the
mechanism's outputs: exact lattice points, std sigma x C, independent coordinates.
"""

import math

import numpy as np
import pytest

from protocol.privacy import (GaussianMechanism, SecureRandom, discrete_gaussian, gaussian_noise, lattice_release,
                              lattice_step, secure_rng)


def test_noise_source_is_the_os_csprng_not_a_seedable_numpy_generator():
    rng = secure_rng()
    assert isinstance(rng, SecureRandom) and not isinstance(rng, np.random.Generator)
    u = rng.random(100_000)
    assert u.min() >= 0 and u.max() < 1 and abs(u.mean() - 0.5) < 0.005  # se 0.0009
    assert len(np.unique(u)) == u.size  # 53-bit draws: no repeats at this size


def _chi_square(draws, sigma, span):
    """Pearson's statistic of `draws` against the discrete Gaussian's pmf over -span..span, the two
    tails pooled into the outermost cells (k <= -span, k >= span) so that no cell expects a fraction
    of a draw: a lone draw at |k| = 4 for sigma 0.7 (expected 0.03) once added 30 to the statistic."""
    support = np.arange(-60 * span, 60 * span + 1)
    pmf = np.exp(-support.astype(float) ** 2 / (2 * sigma * sigma))
    pmf /= pmf.sum()
    inner = np.arange(-span + 1, span)
    expected = np.concatenate(([pmf[support <= -span].sum()], pmf[np.isin(support, inner)],
                               [pmf[support >= span].sum()])) * draws.size
    observed = np.concatenate(([(draws <= -span).sum()], [(draws == k).sum() for k in inner], [(draws >= span).sum()]))
    return float(((observed - expected) ** 2 / expected).sum()), expected.size


@pytest.mark.parametrize("sigma", [0.7, 2.5, 9.3])
def test_discrete_gaussian_matches_its_pmf(sigma):
    draws = discrete_gaussian(200_000, sigma, secure_rng())
    assert np.array_equal(draws, np.round(draws))  # integers
    stat, cells = _chi_square(draws, sigma, int(math.ceil(3 * sigma)))
    # chi-square with `cells` degrees of freedom: mean cells, sd sqrt(2 cells); 8 sd is p < 1e-9
    assert stat < cells + 8 * math.sqrt(2 * cells), stat
    assert abs(draws.mean()) < 6 * sigma / math.sqrt(draws.size)


def test_the_sampler_is_not_the_float_gaussian():
    # a float64 normal draw is never an integer; the discrete Gaussian always is, and symmetric
    draws = discrete_gaussian(50_000, 1.3, secure_rng())
    assert abs((draws > 0).mean() - (draws < 0).mean()) < 0.02
    assert (draws == 0).mean() == pytest.approx(1 / sum(math.exp(-k * k / (2 * 1.69)) for k in range(-20, 21)), abs=0.01)


def test_mechanism_outputs_are_lattice_points_with_std_sigma_c():
    mech = GaussianMechanism(clip_norm=2.0, noise_multiplier=1.5)
    rng = secure_rng()
    x = np.random.default_rng(0).normal(0, 0.01, 1000)
    out = np.stack([mech.privatize(x, rng)[0] for _ in range(100)])
    gamma = lattice_step(2.0, 1000)
    assert np.array_equal(out / gamma, np.round(out / gamma))  # every output exactly on gamma Z
    noise = out - x
    assert noise.std() == pytest.approx(3.0, rel=0.012)  # se of the sd of 1e5 draws: 0.22%
    kurtosis = float(((noise - noise.mean()) ** 4).mean() / noise.var() ** 2)
    assert kurtosis == pytest.approx(3.0, abs=0.1)  # Gaussian tails (se about 0.015)
    assert abs(np.corrcoef(noise[:, :-1].ravel(), noise[:, 1:].ravel())[0, 1]) < 0.02


def test_two_inputs_share_one_output_lattice():
    # the floating-point attack reads x from which floats x + noise can reach: here neither input
    # changes the set of possible outputs (both lie on gamma Z^d)
    rng = secure_rng()
    a = lattice_release(np.array([0.1234567]), 1.0, 1.0, rng)
    b = lattice_release(np.array([0.7654321]), 1.0, 1.0, rng)
    gamma = lattice_step(1.0, 1)
    assert (a / gamma) % 1 == 0 and (b / gamma) % 1 == 0


def test_gaussian_noise_std_and_rejects_bad_scales():
    draws = gaussian_noise(100_000, 0.37, secure_rng())
    assert draws.std() == pytest.approx(0.37, rel=0.012)
    with pytest.raises(ValueError):
        gaussian_noise(3, float("nan"), secure_rng())
    with pytest.raises(ValueError):
        lattice_release(np.array([np.inf]), 1.0, 1.0, secure_rng())
