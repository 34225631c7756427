"""Where a device's training data comes from.

Every source keeps a bounded window of the newest rows and says how many rows arrived
since the last `poll()`, so the agent can wait for enough new samples before training.
The first poll is strict (bad data at start is the operator's to fix: DataError); later
polls skip unreadable appended rows with a warning, so the good rows around them are kept.
"""

from __future__ import annotations

import csv
import importlib
import logging
from collections import deque
from pathlib import Path
from typing import Callable

import numpy as np

from protocol.tabular import DataError, parse_rows

log = logging.getLogger(__name__)


class DataSource:
    """Base: a window of at most `window` rows (None: unbounded)."""

    def __init__(self, window: int | None = None) -> None:
        if window is not None and window < 1:
            raise ValueError("the data window must hold at least one row")
        self._X: deque = deque(maxlen=window)
        self._y: deque = deque(maxlen=window)

    def poll(self) -> int:
        """Read what is new; returns the number of new rows."""
        raise NotImplementedError

    @property
    def columns(self) -> tuple[str, ...] | None:
        """Feature column names in the order of the window's columns; None when the source has none."""
        return None

    def __len__(self) -> int:
        """Rows in the window."""
        return len(self._y)

    def data(self) -> tuple[np.ndarray, np.ndarray]:
        """The current window as (X, y)."""
        if not self._y:
            return np.empty((0, 0)), np.empty(0)
        return np.asarray(self._X), np.asarray(self._y)

    def _append(self, X: np.ndarray, y: np.ndarray) -> int:
        self._X.extend(X)
        self._y.extend(y)
        return len(y)


class CSVFile(DataSource):
    """A CSV file with a header that may grow: appended rows are picked up on the next poll.

    Only the bytes appended since the last poll are read. A file that shrank (rotated or
    rewritten) is read again from its start.
    """

    def __init__(self, path: str | Path, label_column: str | None = "label", window: int | None = None) -> None:
        super().__init__(window)
        self.path = Path(path)
        self.label_column = label_column
        self._offset = 0
        self._lines = 0  # lines consumed, for the line numbers in warnings
        self._header: list[str] | None = None
        self._polled = False
        if self.path.is_dir():
            raise DataError(f"{self.path}: is a directory: give --data-dir {self.path} to read every *.csv in it")
        if not self.path.is_file():
            raise DataError(f"{self.path}: no such file")

    def poll(self) -> int:
        X, y = self.read_new(strict=not self._polled)
        self._polled = True
        return self._append(X, y) if len(y) else 0

    @property
    def columns(self) -> tuple[str, ...] | None:
        """The header's feature columns (all but the label), once the header was read."""
        if self._header is None:
            return None
        return tuple(h for h in self._header if h != self.label_column)

    def read_new(self, strict: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """The complete rows appended since the last read (empty arrays when none).

        `strict`: raise DataError on the first bad cell; else skip bad rows with a warning.
        """
        empty = np.empty((0, 0)), np.empty(0)
        try:
            if self.path.stat().st_size < self._offset:
                self._offset, self._lines, self._header = 0, 0, None
            with self.path.open("rb") as fh:
                fh.seek(self._offset)
                # stream line by line: a large CSV never sits in memory as text or Python strings
                reader = csv.reader(self._complete_lines(fh))
                if self._header is None:
                    header = next(reader, None)
                    if header is None:
                        return empty
                    self._header = [h.strip() for h in header]
                    if self.label_column is not None and self.label_column not in self._header:
                        raise DataError(f"{self.path}: no column {self.label_column!r} (columns: {', '.join(self._header)})")
                parts = [self._parse(batch, strict) for batch in self._numbered_batches(reader, 1 + 50_000 // len(self._header))]
        except OSError as exc:
            raise DataError(f"{self.path}: cannot read: {exc.strerror}") from None
        parts = [(X, y) for X, y in parts if len(y)]
        if not parts:
            return empty
        return np.concatenate([X for X, _ in parts]), np.concatenate([y for _, y in parts])

    def _complete_lines(self, fh):
        """Decoded lines up to the last complete one; a half-written line waits for the next poll."""
        for raw in fh:
            if not raw.endswith(b"\n"):
                return
            self._offset += len(raw)
            self._lines += 1
            try:
                yield raw.decode()
            except UnicodeDecodeError:
                raise DataError(f"{self.path}: line {self._lines} is not text") from None

    def _numbered_batches(self, reader, size: int):
        """Lists of up to `size` (line number, cells) pairs of the non-empty rows of `reader`
        (about 50,000 cells a batch: a few MB of strings at a time)."""
        batch = []
        for row in reader:
            if any(c.strip() for c in row):
                batch.append((self._lines, row))
                if len(batch) == size:
                    yield batch
                    batch = []
        if batch:
            yield batch

    def _parse(self, numbered: list[tuple[int, list[str]]], strict: bool) -> tuple[np.ndarray, np.ndarray]:
        try:
            return parse_rows(self._header, [r for _, r in numbered], self.label_column, str(self.path), numbered[0][0])
        except DataError:
            if strict:
                raise
        return self._salvage(numbered)

    def _salvage(self, numbered: list[tuple[int, list[str]]]) -> tuple[np.ndarray, np.ndarray]:
        """The readable rows of `numbered` (line, cells); the others are logged and dropped."""
        X, y, bad = [], [], []
        for line, row in numbered:
            try:
                xi, yi = parse_rows(self._header, [row], self.label_column, source=str(self.path))
            except DataError:
                bad.append(line)
                continue
            X.append(xi[0])
            y.append(yi[0])
        shown = ", ".join(map(str, bad[:10])) + (", ..." if len(bad) > 10 else "")
        log.warning("%s: skipped %d unreadable row(s) at line %s", self.path, len(bad), shown)
        if not y:
            return np.empty((0, 0)), np.empty(0)
        return np.asarray(X), np.asarray(y)


class CSVDirectory(DataSource):
    """Every *.csv file in a directory, new files and rows appended to them included."""

    def __init__(self, directory: str | Path, label_column: str | None = "label", window: int | None = None) -> None:
        super().__init__(window)
        self.directory = Path(directory)
        self.label_column = label_column
        self._files: dict[Path, CSVFile] = {}
        self._polled = False
        if not self.directory.is_dir():
            raise DataError(f"{self.directory}: no such directory")

    def poll(self) -> int:
        new = 0
        for path in sorted(self.directory.glob("*.csv")):
            source = self._files.setdefault(path, CSVFile(path, self.label_column))
            X, y = source.read_new(strict=not self._polled)
            if len(y):
                new += self._append(self._in_order(source, X), y)
        self._polled = True
        return new

    @property
    def columns(self) -> tuple[str, ...] | None:
        """The first file's feature columns: every file's rows are put in that order by name."""
        return next((f.columns for f in self._files.values() if f.columns is not None), None)

    def _in_order(self, source: CSVFile, X: np.ndarray) -> np.ndarray:
        """`X` of `source` in the directory's column order; DataError when its columns are others."""
        mine, first = source.columns, self.columns
        if mine == first:
            return X
        if mine is None or first is None or sorted(mine) != sorted(first):
            raise DataError(f"{source.path}: columns {list(mine or [])} are not those of the directory's "
                            f"first file {list(first or [])}")
        at = {c: i for i, c in enumerate(mine)}
        return X[:, [at[c] for c in first]]


class CallableSource(DataSource):
    """`module:function` returning (X, y): the newest samples from a sensor we do not know.

    Called at every poll; the rows it returns are appended to the window (return empty
    arrays when nothing is new).
    """

    def __init__(self, target: str, window: int | None = None) -> None:
        super().__init__(window)
        self.target = target
        self.function = load_callable(target)

    def poll(self) -> int:
        try:
            X, y = self.function()
        except Exception as exc:
            raise DataError(f"{self.target} failed: {type(exc).__name__}: {exc}") from None
        X, y = np.asarray(X, dtype=np.float64), np.asarray(y)
        if len(y) == 0:
            return 0
        if X.ndim != 2 or len(X) != len(y) or not np.isfinite(X).all():
            raise DataError(f"{self.target} must return finite X of shape (n, features) and y of length n")
        return self._append(X, y)


def load_callable(target: str) -> Callable:
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise DataError(f"data source {target!r} must look like module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise DataError(f"cannot import {module_name!r}: {exc}") from None
    function = getattr(module, attr, None)
    if not callable(function):
        raise DataError(f"{target!r} is not a callable")
    return function


class ArraySource(DataSource):
    """Rows already in memory (the simulator's virtual devices, notebooks).

    The rows are in the window at once; the first poll reports them as new.
    """

    def __init__(self, X: np.ndarray, y: np.ndarray, window: int | None = None) -> None:
        super().__init__(window)
        self._unpolled = self._append(np.asarray(X, dtype=np.float64), np.asarray(y))

    def poll(self) -> int:
        new, self._unpolled = self._unpolled, 0
        return new
