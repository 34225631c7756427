"""What the accuracy benchmarks write: one cell per configuration over seeds, and the results file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def seed_cell(values: list[float], key: str = "accuracy") -> dict:
    """The mean over seeds (4 decimals, as the docs quote it) and every seed's value."""
    return {key: round(float(np.mean(values)), 4), "per_seed": [round(x, 4) for x in values]}


def write_results(path: Path, results: dict) -> None:
    """bench/results/<name>.json, indented, and say where."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {path}")
