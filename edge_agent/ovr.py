"""One epoch of a multiclass SGDClassifier without scikit-learn's per-call machinery (issue 23 point 6).

`SGDClassifier.partial_fit` on a device's few dozen rows spends most of its CPU around the SGD,
not in it: input validation, a joblib dispatch per class that enters a config context and copies
the warning filters, a RandomState built from the integer seed per class. `epoch` runs the same
one-vs-rest step as `partial_fit(X, y)` (scikit-learn's own `fit_binary` per class, with the
same per-class seeds, so the parameters come out identical: tests/test_ovr.py) and skips what
the agent has already checked: X is float64, finite and of the model's width (the trainer's
checks, the imputation of gaps), the hyperparameters were checked when the model was decoded
(protocol/model_spec.py).

It relies on scikit-learn internals, so it is used only where they are the ones it was written
against (`fit_binary`'s parameters) and for the plain case (more than two classes, no class
weights, no averaging, no early stopping); `epoch` returns False otherwise and the caller runs
`partial_fit`.
"""

from __future__ import annotations

import inspect

import numpy as np
from sklearn.linear_model import SGDClassifier
from sklearn.utils import check_random_state

try:
    from sklearn.linear_model import _stochastic_gradient as _sgd

    _FIT_BINARY = _sgd.fit_binary
    _MAX_INT = _sgd.MAX_INT
    _PARAMS = ("est", "i", "X", "y", "alpha", "learning_rate", "max_iter", "pos_weight", "neg_weight",
               "sample_weight", "validation_mask", "random_state")
    if tuple(inspect.signature(_FIT_BINARY).parameters) != _PARAMS:  # another scikit-learn: partial_fit
        _FIT_BINARY = None
except (ImportError, AttributeError):
    _FIT_BINARY = None


def supported(est) -> bool:
    """Whether `epoch` can run `est`'s step (else the caller uses partial_fit)."""
    return _FIT_BINARY is not None and type(est) is SGDClassifier and getattr(est, "coef_", None) is not None \
        and len(est.classes_) > 2 and not est.early_stopping and not est.average and est.class_weight is None \
        and est.coef_.dtype == np.float64 and est.coef_.flags.c_contiguous


def epoch(est, X: np.ndarray, y: np.ndarray) -> bool:
    """`est.partial_fit(X, y)` for a float64, finite X of est's width; False (nothing done) when not `supported`."""
    if not supported(est):
        return False
    X = np.ascontiguousarray(X, dtype=np.float64)
    n = X.shape[0]
    sample_weight = np.ones(n, dtype=np.float64)
    est._loss_function_ = est._get_loss_function(est.loss)
    if not hasattr(est, "t_"):
        est.t_ = 1.0
    validation_mask = est._make_validation_split(y, sample_mask=sample_weight > 0)
    seeds = check_random_state(est.random_state).randint(_MAX_INT, size=len(est.classes_))
    n_iter = 0.0
    for i, seed in enumerate(seeds):
        _, intercept, n_iter_i = _FIT_BINARY(est, i, X, y, est.alpha, est.learning_rate, 1, 1.0, 1.0, sample_weight,
                                             validation_mask=validation_mask, random_state=seed)
        est.intercept_[i] = intercept
        n_iter = max(n_iter, n_iter_i)
    est.t_ += n_iter * n
    est.n_iter_ = n_iter
    return True
