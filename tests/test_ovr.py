"""edge_agent/ovr.py: the agent's one-vs-rest epoch is scikit-learn's partial_fit, parameter for parameter."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.linear_model import SGDRegressor

from edge_agent import ovr
from protocol.model_spec import ModelSpec, build_estimator

X, Y = load_digits(return_X_y=True)
X = (X - X.mean(axis=0)) / (X.std(axis=0) + 1e-9)


@pytest.mark.parametrize("hyper", [{}, {"loss": "log_loss", "alpha": 1e-3}, {"learning_rate": "constant", "eta0": 0.05},
                                   {"penalty": "l1"}, {"loss": "modified_huber", "fit_intercept": False}])
def test_the_epoch_is_partial_fit(hyper):
    spec = ModelSpec("sgd-classifier", X.shape[1], tuple(range(10)), hyperparameters=hyper)
    rng = np.random.default_rng(0)
    start = rng.normal(size=spec.n_params) * 0.01
    reference, fast = (build_estimator(spec, start, random_state=7) for _ in range(2))
    assert ovr.supported(fast)
    for rnd in range(5):
        rows = rng.choice(len(Y), 70, replace=False)
        reference.partial_fit(X[rows], Y[rows])
        assert ovr.epoch(fast, X[rows], Y[rows])
        np.testing.assert_array_equal(fast.coef_, reference.coef_)
        np.testing.assert_array_equal(fast.intercept_, reference.intercept_)
        assert fast.t_ == reference.t_, rnd


def test_what_it_does_not_cover_is_left_to_partial_fit():
    binary = build_estimator(ModelSpec("sgd-classifier", 4, (0, 1)), None, random_state=0)
    averaged = build_estimator(ModelSpec("sgd-classifier", 4, (0, 1, 2)), None)
    averaged.average = True  # not a spec's hyperparameter, but what ovr must not take on
    weighted = build_estimator(ModelSpec("sgd-classifier", 4, (0, 1, 2)), None)
    weighted.class_weight = {0: 2.0}
    regressor = SGDRegressor().partial_fit(np.ones((3, 4)), np.ones(3))
    for est in (binary, averaged, weighted, regressor):
        before = np.copy(est.coef_)
        assert not ovr.supported(est) and not ovr.epoch(est, np.ones((3, 4)), np.array([0, 1, 0]))
        np.testing.assert_array_equal(est.coef_, before)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_the_trainer_refuses_non_finite_data_before_the_fast_epoch_trains_on_it(bad):
    """ovr.epoch assumes a finite X (partial_fit checks it, fit_binary does not): with one NaN cell it returned a
    finite delta where partial_fit refused (red team; seen red: a delta of |sum| 1.1e4 sent). The trainer now
    refuses the data with one line, whichever path would train."""
    from edge_agent.trainer import LocalTrainer
    from protocol.messages import ModelMessage

    spec = ModelSpec("sgd-classifier", X.shape[1], tuple(range(10)))
    rows = X[:50].copy()
    rows[3, 5] = bad
    with pytest.raises(ValueError, match="NaN or infinite"):
        LocalTrainer(random_state=3).train(ModelMessage("f", 1, spec, np.zeros(spec.n_params)), rows, Y[:50])
