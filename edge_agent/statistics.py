"""The agent's side of the federated feature statistics: what to report, and how to scale.

Only per-feature count, sum, sum of squares, min and max of the data window leave the
device (docs/security.md says what they reveal); never a row.
"""

from __future__ import annotations

import numpy as np

from protocol.statistics import Scaling, describe, impute, standardize
from protocol.stats_message import encode_stats

# Statistics are sent again when the window's row count moved by this fraction since the last.
RESEND_GROWTH = 0.1


class LocalStatistics:
    """Decides when the window's statistics are worth (re)sending, and encodes them."""

    def __init__(self, resend_growth: float = RESEND_GROWTH) -> None:
        self.resend_growth = resend_growth
        self.sent_rows_: int | None = None  # window rows when the statistics were last sent

    def payload_if_due(self, X: np.ndarray, columns: tuple[str, ...] | None = None) -> bytes | None:
        """The encoded statistics of `X` (named by `columns` when known) when never sent or the row
        count moved enough; else None."""
        rows = len(X)
        if rows == 0 or X.ndim != 2:
            return None
        last = self.sent_rows_
        if last is not None and abs(rows - last) < self.resend_growth * last:
            return None
        self.sent_rows_ = rows
        return encode_stats(describe(X), columns)

    def resend(self) -> None:
        """Send again at the next chance (the broker may have lost the retained copy)."""
        self.sent_rows_ = None


def prepare_features(X: np.ndarray, scaling: Scaling | None) -> tuple[np.ndarray, int]:
    """Features as the fleet's model expects them, and the count of missing cells imputed.

    With a scaling: missing values take the fleet mean, then (x - mean) / scale. Without one
    (a coordinator that does not merge statistics) the features stay raw and a missing
    value takes the local column mean (0 when the column has no value at all).
    """
    X = np.asarray(X, dtype=np.float64)
    missing = int(np.isnan(X).sum())
    if scaling is not None:
        if X.ndim == 2 and X.shape[1] != scaling.n_features:
            return X, missing  # the trainer says what is wrong with the feature count
        return standardize(X, scaling), missing
    if not missing:
        return X, 0
    with np.errstate(invalid="ignore"), np.testing.suppress_warnings() as sup:
        sup.filter(RuntimeWarning)
        local = np.nanmean(X, axis=0)
    X, _ = impute(X, np.where(np.isnan(local), 0.0, local))
    return X, missing
