"""Staleness weights: how much an update based on an older model still counts.

s = current version - the update's base version (s >= 0). Functions from FedAsync
(Xie et al., 2019): constant, polynomial (1 + s)^-a, hinge (1 until b, then 1/(a(s - b) + 1)).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Constant:
    def __call__(self, s: int) -> float:
        return 1.0

    def __str__(self) -> str:
        return "constant"


@dataclass(frozen=True)
class Polynomial:
    a: float = 0.5

    def __call__(self, s: int) -> float:
        return (1.0 + s) ** -self.a

    def __str__(self) -> str:
        return f"polynomial:{self.a:g}"


@dataclass(frozen=True)
class Hinge:
    a: float = 10.0
    b: float = 4.0

    def __call__(self, s: int) -> float:
        return 1.0 if s <= self.b else 1.0 / (self.a * (s - self.b) + 1.0)

    def __str__(self) -> str:
        return f"hinge:{self.a:g},{self.b:g}"


StalenessFn = Constant | Polynomial | Hinge


def parse_staleness(text: str) -> StalenessFn:
    """``constant``, ``polynomial:A`` or ``hinge:A,B`` (A, B >= 0)."""
    name, _, args = text.strip().partition(":")
    try:
        values = [float(v) for v in args.split(",")] if args else []
    except ValueError:
        raise ValueError(f"staleness {text!r}: parameters must be numbers") from None
    if any(v < 0 for v in values):
        raise ValueError(f"staleness {text!r}: parameters must be >= 0")
    if name == "constant" and not values:
        return Constant()
    if name == "polynomial" and len(values) <= 1:
        return Polynomial(*values)
    if name == "hinge" and len(values) in (0, 2):
        return Hinge(*values)
    raise ValueError(f"unknown staleness {text!r}: use constant, polynomial:A or hinge:A,B")
