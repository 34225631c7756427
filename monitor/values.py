"""Typed reads of JSON values from the wire: a value of the wrong type reads as missing (None).

Status documents and metrics logs come from other processes; the monitor and the report
take what is well-formed and never trust a type.
"""

from __future__ import annotations

import math


def finite(value: object) -> float | int | None:
    """`value` if it is a finite number (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        return value if math.isfinite(value) else None
    except OverflowError:  # an integer too large for a float
        return None


def number(doc: dict, key: str) -> float | int | None:
    return finite(doc.get(key))


def whole(doc: dict, key: str, default: int | None = None) -> int | None:
    """An integer field, else `default`."""
    value = doc.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def text(doc: dict, key: str, limit: int = 64) -> str | None:
    value = doc.get(key)
    return value[:limit] if isinstance(value, str) else None


def numbers(value: object, limit: int = 16) -> dict:
    """The finite numeric entries of a JSON object (the first `limit` keys), else {}."""
    if not isinstance(value, dict):
        return {}
    found = {str(k)[:32]: finite(value[k]) for k in list(value)[:limit]}
    return {k: v for k, v in found.items() if v is not None}


def counts(value: object) -> dict:
    """The whole-number entries of a JSON object such as ``{"decode": 2}``."""
    return {k: int(v) for k, v in numbers(value, limit=64).items() if v == int(v)}


def latest(a: float | None, b: float | None) -> float | None:
    """The larger of two optional times."""
    return b if a is None else a if b is None else max(a, b)


def mapping(doc: dict, key: str) -> dict:
    """A nested JSON object such as ``staleness``, else {}."""
    value = doc.get(key)
    return value if isinstance(value, dict) else {}
