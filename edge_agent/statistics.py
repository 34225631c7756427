"""The agent's side of the federated feature statistics: what to report, and how to scale.

Only per-feature count, sum, sum of squares, min and max of the data window leave the
device (docs/security.md says what they reveal); never a row. With a `StatsMechanism`
(--stats-noise, protocol/stats_privacy.py) they leave noised, each release counted for the
agent's epsilon; a lost retained copy is re-sent as the same payload, never freshly noised.
"""

from __future__ import annotations

import numpy as np

from protocol.privacy import secure_rng
from protocol.statistics import Scaling, describe, impute, standardize
from protocol.stats_message import encode_stats
from protocol.stats_privacy import StatsMechanism

# Statistics are sent again when the window's row count moved by this fraction since the last.
RESEND_GROWTH = 0.1


class LocalStatistics:
    """Decides when the window's statistics are worth (re)sending, and encodes them."""

    def __init__(self, resend_growth: float = RESEND_GROWTH, noise: StatsMechanism | None = None,
                 delta: float = 1e-5) -> None:
        self.resend_growth = resend_growth
        self.sent_rows_: int | None = None  # window rows when the statistics were last sent
        self.noise = noise
        self.delta = delta
        self.releases_ = 0  # noised releases made (each composes into the epsilon)
        self.last_payload_: bytes | None = None
        self.repeat_ = False  # re-send last_payload_ as it is (noised: fresh noise would cost epsilon)
        self.rng = secure_rng()  # never the training seed: reproducible noise is removable noise
        if noise is not None:
            from protocol.accounting import check_available

            check_available()

    def payload_if_due(self, X: np.ndarray, columns: tuple[str, ...] | None = None) -> bytes | None:
        """The encoded statistics of `X` (named by `columns` when known) when never sent or the row
        count moved enough; else None."""
        rows = len(X)
        if rows == 0 or X.ndim != 2:
            return None
        last = self.sent_rows_
        if last is not None and abs(rows - last) < self.resend_growth * last:
            if self.repeat_:
                self.repeat_ = False
                return self.last_payload_
            return None
        self.sent_rows_ = rows
        self.repeat_ = False
        if self.noise is None:
            return encode_stats(describe(X), columns)
        stats = self.noise.release(X, self.rng)  # ValueError when --stats-clip declares another feature count
        self.releases_ += 1
        self.last_payload_ = encode_stats(stats, columns)
        return self.last_payload_

    def resend(self) -> None:
        """Send again at the next chance (the broker may have lost the retained copy); noised, the same payload."""
        if self.noise is not None and self.last_payload_ is not None:
            self.repeat_ = True
        else:
            self.sent_rows_ = None

    def report(self) -> dict | None:
        """The noised statistics' account for the agent status (None when they are not noised)."""
        if self.noise is None:
            return None
        return dict(self.noise.report(self.releases_, self.delta), clip=self.noise.bounds)


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
