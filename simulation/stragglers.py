"""How simulated devices differ in speed and presence: heavy-tailed speeds, duty cycles, dropouts.

Pure functions of a seeded generator, so a fleet's behaviour is the same run after run:

- speeds: ``fixed`` (every device 1x) or ``lognormal:SIGMA`` (slowdown exp(N(0, SIGMA^2)), median
  1x: at SIGMA 1 one device in ten is over 3.6x slower, one in a hundred over 10x, the heavy tail
  FedBuff and PAPAYA report for phones);
- duty cycles ``ON,OFF``: a device is awake ON seconds, then asleep OFF seconds (offline), from a
  random phase;
- dropout mode: ``hold`` (drop after a round, send the held update on return) or ``lose`` (drop in
  the middle of a round: its work is lost).
"""

from __future__ import annotations

import numpy as np

DROPOUT_MODES = ("hold", "lose")


def parse_speed(text: str) -> float | None:
    """``fixed`` -> None, ``lognormal:SIGMA`` -> SIGMA (> 0); ValueError says what is wrong."""
    name, _, arg = text.strip().partition(":")
    if name == "fixed" and not arg:
        return None
    if name == "lognormal":
        try:
            sigma = float(arg)
        except ValueError:
            raise ValueError(f"speed {text!r}: lognormal:SIGMA needs a number") from None
        if sigma > 0:
            return sigma
        raise ValueError(f"speed {text!r}: SIGMA must be > 0")
    raise ValueError(f"unknown speed {text!r}: use fixed or lognormal:SIGMA")


def slowdowns(rng: np.random.Generator, n: int, speed: str) -> np.ndarray:
    """Each device's slowdown factor (1.0 = the simulated round time)."""
    sigma = parse_speed(speed)
    return np.ones(n) if sigma is None else np.exp(rng.normal(0.0, sigma, n))


def parse_duty_cycle(text: str | None) -> tuple[float, float] | None:
    """``ON,OFF`` seconds (both > 0) -> (on, off); None or "" -> None."""
    if not text:
        return None
    try:
        on, off = (float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"duty cycle {text!r}: use ON,OFF seconds, e.g. 20,10") from None
    if on <= 0 or off <= 0:
        raise ValueError(f"duty cycle {text!r}: ON and OFF must be > 0")
    return on, off


def first_sleep(rng: np.random.Generator, on: float, off: float) -> tuple[bool, float]:
    """A device's random phase: (awake now, seconds until it next changes)."""
    at = rng.uniform(0.0, on + off)
    return (True, on - at) if at < on else (False, on + off - at)
