"""Where a device's training data comes from.

Every source keeps a bounded window of the newest rows and says how many rows arrived
since the last `poll()`, so the agent can wait for enough new samples before training.
"""

from __future__ import annotations

import csv
import importlib
import io
from collections import deque
from pathlib import Path
from typing import Callable

import numpy as np

from protocol.tabular import DataError, parse_rows


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

    def __init__(self, path: str | Path, label_column: str = "label", window: int | None = None) -> None:
        super().__init__(window)
        self.path = Path(path)
        self.label_column = label_column
        self._offset = 0
        self._header: list[str] | None = None
        if not self.path.is_file():
            raise DataError(f"{self.path}: no such file")

    def poll(self) -> int:
        X, y = self.read_new()
        return self._append(X, y) if len(y) else 0

    def read_new(self) -> tuple[np.ndarray, np.ndarray]:
        """The complete rows appended since the last read (empty arrays when none)."""
        empty = np.empty((0, 0)), np.empty(0)
        try:
            size = self.path.stat().st_size
            if size < self._offset:
                self._offset, self._header = 0, None
            with self.path.open("rb") as fh:
                fh.seek(self._offset)
                chunk = fh.read()
        except OSError as exc:
            raise DataError(f"{self.path}: cannot read: {exc.strerror}") from None
        end = chunk.rfind(b"\n") + 1  # a half-written last line waits for the next poll
        if end == 0:
            return empty
        self._offset += end
        try:
            rows = list(csv.reader(io.StringIO(chunk[:end].decode())))
        except UnicodeDecodeError:
            raise DataError(f"{self.path}: not a text file") from None
        if self._header is None:
            if not rows:
                return empty
            self._header, rows = rows[0], rows[1:]
        if not any(any(c.strip() for c in r) for r in rows):
            return empty
        return parse_rows(self._header, rows, self.label_column, source=str(self.path))


class CSVDirectory(DataSource):
    """Every *.csv file in a directory, new files and rows appended to them included."""

    def __init__(self, directory: str | Path, label_column: str = "label", window: int | None = None) -> None:
        super().__init__(window)
        self.directory = Path(directory)
        self.label_column = label_column
        self._files: dict[Path, CSVFile] = {}
        if not self.directory.is_dir():
            raise DataError(f"{self.directory}: no such directory")

    def poll(self) -> int:
        new = 0
        for path in sorted(self.directory.glob("*.csv")):
            X, y = self._files.setdefault(path, CSVFile(path, self.label_column)).read_new()
            if len(y):
                new += self._append(X, y)
        return new


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
    """Rows already in memory (the simulator's virtual devices, notebooks)."""

    def __init__(self, X: np.ndarray, y: np.ndarray, window: int | None = None) -> None:
        super().__init__(window)
        self._new = (np.asarray(X, dtype=np.float64), np.asarray(y))

    def poll(self) -> int:
        if self._new is None:
            return 0
        X, y = self._new
        self._new = None
        return self._append(X, y)
