"""Poisoned updates: 4 of 20 agents send sign-flipped or scaled updates through the real
agent code and the real coordinator core. The robust setting keeps accuracy within 3
points of the all-honest run; plain averaging visibly degrades. Deterministic (seeded)."""

from functools import cache

import pytest

from simulation.poisoning import ATTACKS, Defence, run

PLAIN = Defence()
ROBUST = Defence("trimmed-mean:0.2", norm_factor=2, norm_action="reject")  # docs/security.md
SETUP = dict(seed=0, updates=600, buffer_size=10, scheme="dirichlet:0.5")


@cache
def result(attack: str | None, defence: Defence) -> dict:
    return run(attack, defence, **SETUP)


def accuracy(attack: str | None, defence: Defence) -> float:
    return result(attack, defence)["tail_accuracy"]


@pytest.mark.parametrize("attack", ["sign-flip", "scale"])
def test_robust_setting_holds_while_plain_averaging_degrades(attack):
    honest, plain, robust = accuracy(None, PLAIN), accuracy(attack, PLAIN), accuracy(attack, ROBUST)
    shown = f"{attack} x{ATTACKS[attack].factor:g}: all honest {honest:.3f}, plain mean {plain:.3f}, robust {robust:.3f}"
    print(shown)
    assert robust >= honest - 0.03, shown
    assert plain < honest - 0.10, shown


def test_attackers_are_rejected_by_the_relative_norm_bound():
    counts = result("sign-flip", ROBUST)
    assert counts["attack_rejected"] > 10 * counts["attack_accepted"]  # only the warm-up lets a few in
    assert counts["honest_rejected"] <= 0.01 * counts["honest_accepted"]

