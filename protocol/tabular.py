"""Reading labelled numeric CSV files, as agents (training data) and the coordinator (eval set) do."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np


class DataError(ValueError):
    """A data file that cannot be used; the message names the file and what is wrong."""


def load_csv(path: str | Path, label_column: str = "label") -> tuple[np.ndarray, np.ndarray]:
    """(X, y) from a CSV with a header row: every column but `label_column` is a feature (NaN where missing).

    Labels that are all integral become int64 (class labels), others float64 (targets).
    """
    path = Path(path)
    try:
        with path.open(newline="") as fh:
            rows = list(csv.reader(fh))
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read: {exc}") from None
    if not rows:
        raise DataError(f"{path}: empty file, expected a header row")
    return parse_rows(rows[0], rows[1:], label_column, source=str(path))


def read_columns(path: str | Path, label_column: str = "label") -> tuple[str, ...]:
    """The feature column names of a CSV's header (all but `label_column`), in the file's order."""
    path = Path(path)
    try:
        with path.open(newline="") as fh:
            header = next(csv.reader(fh), [])
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read: {exc}") from None
    return tuple(h.strip() for h in header if h.strip() != label_column)


def parse_rows(
    header: list[str], rows: list[list[str]], label_column: str | None, source: str, first_line: int = 2
) -> tuple[np.ndarray, np.ndarray]:
    """(X, y) from string rows under `header`; DataError names the first bad cell (`label_column` None: unlabeled).

    An empty feature cell or NaN is a missing value (NaN in X); text, infinities and a
    missing label are errors.

    `first_line` is the file line of rows[0], for the messages.
    """
    header = [h.strip() for h in header]
    if label_column is not None and label_column not in header:
        raise DataError(f"{source}: no column {label_column!r} (columns: {', '.join(header)})")
    if len(header) < (1 if label_column is None else 2):
        raise DataError(f"{source}: needs at least one feature column besides {label_column!r}")
    rows = [r for r in rows if any(cell.strip() for cell in r)]
    if not rows:
        raise DataError(f"{source}: no data rows")
    label_at = None if label_column is None else header.index(label_column)
    values = np.empty((len(rows), len(header)), dtype=np.float64)
    for i, row in enumerate(rows):
        if len(row) != len(header):
            raise DataError(f"{source}: line {first_line + i} has {len(row)} cells, header has {len(header)}")
        try:
            values[i] = np.asarray(row, dtype=np.float64)  # numpy parses the strings, row at a time
        except ValueError:
            for j, cell in enumerate(row):
                if not cell.strip():
                    values[i, j] = np.nan  # a gap: a missing value, imputed later
                    continue
                try:
                    values[i, j] = float(cell)
                except ValueError:
                    raise DataError(f"{source}: line {first_line + i}, column {header[j]!r}: {cell!r} is not a number") from None
    if np.isinf(values).any():
        i, j = np.argwhere(np.isinf(values))[0]
        raise DataError(f"{source}: line {first_line + i}, column {header[j]!r}: value is not finite")
    if label_at is None:  # unlabeled rows (a one-class model): every column is a feature, y all 0
        return values, np.zeros(len(values), dtype=np.int64)
    if np.isnan(values[:, label_at]).any():
        i = int(np.argwhere(np.isnan(values[:, label_at]))[0][0])
        raise DataError(f"{source}: line {first_line + i}, column {label_column!r}: the label is missing")
    y = values[:, label_at]
    X = np.delete(values, label_at, axis=1)
    if np.all(y == np.round(y)):
        y = y.astype(np.int64)
    return X, y


def write_csv(path: str | Path, X: np.ndarray, y: np.ndarray, label_column: str = "label") -> None:
    """Write (X, y) in the format `load_csv` reads (features f0..fN-1, then the label)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow([f"f{i}" for i in range(X.shape[1])] + [label_column])
        for xi, yi in zip(X, y):
            writer.writerow([repr(float(v)) for v in xi] + [yi.item() if hasattr(yi, "item") else yi])
