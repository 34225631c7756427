"""Model spec <-> scikit-learn estimator round trips."""

import numpy as np
import pytest
from sklearn.datasets import load_digits

from protocol.errors import ProtocolError
from protocol.model_spec import ModelSpec, build_estimator, get_flat_params, set_flat_params

SPECS = [
    ModelSpec("sgd-classifier", 64, tuple(range(10))),
    ModelSpec("sgd-classifier", 64, (0, 1), {"loss": "log_loss", "alpha": 1e-3}),
    ModelSpec("sgd-regressor", 64, (), {"learning_rate": "invscaling", "eta0": 1e-4}),
]


@pytest.mark.parametrize("spec", SPECS)
def test_params_round_trip_and_shapes(spec):
    flat = np.random.default_rng(0).normal(size=spec.n_params)
    est = build_estimator(spec, flat)
    np.testing.assert_array_equal(get_flat_params(est, spec), flat)
    assert est.coef_.shape == spec.coef_shape
    assert ModelSpec.from_wire(spec.to_wire()) == spec


@pytest.mark.parametrize("spec", SPECS)
def test_estimator_trains_from_any_global_model_without_prior_data(spec):
    X, y = load_digits(return_X_y=True)
    if spec.is_classifier:
        mask = np.isin(y, spec.classes)
        X, y = X[mask], y[mask]
    else:
        y = y.astype(float)
    start = np.random.default_rng(1).normal(scale=0.01, size=spec.n_params)
    est = build_estimator(spec, start, random_state=0)
    est.predict(X[:2])  # usable at once
    est.partial_fit(X, y)
    after = get_flat_params(est, spec)
    assert after.shape == start.shape and not np.allclose(after, start)
    if spec.is_classifier:
        assert est.score(X, y) > 0.8


def test_set_flat_params_rejects_wrong_length():
    spec = SPECS[0]
    with pytest.raises(ValueError, match="expected 650"):
        set_flat_params(build_estimator(spec), spec, np.zeros(10))


@pytest.mark.parametrize(
    "wire",
    [
        {"estimator": "svm", "n_features": 3},
        {"estimator": "sgd-classifier", "n_features": 3, "classes": [1]},
        {"estimator": "sgd-classifier", "n_features": 0, "classes": [0, 1]},
        {"estimator": "sgd-classifier", "n_features": 3, "classes": [0, 1], "hyperparameters": {"n_jobs": 8}},
        {"estimator": "sgd-regressor", "n_features": 3, "hyperparameters": {"alpha": "big"}},
        {"estimator": "sgd-regressor", "n_features": 3, "classes": [0, 1]},
        "spec",
    ],
)
def test_bad_specs_raise_typed_error(wire):
    with pytest.raises(ProtocolError):
        ModelSpec.from_wire(wire)


@pytest.mark.parametrize("estimator, hyperparameters, names", [
    ("sgd-classifier", {"loss": "bogus"}, "'loss'"),
    ("sgd-classifier", {"penalty": "l3"}, "'penalty'"),
    ("sgd-classifier", {"learning_rate": "fast"}, "'learning_rate'"),
    ("sgd-classifier", {"alpha": -1.0}, "'alpha'"),
    ("sgd-classifier", {"alpha": 0.0}, "alpha must be > 0"),  # with the default learning_rate 'optimal'
    ("sgd-classifier", {"learning_rate": "constant", "eta0": 0.0}, "'eta0'"),
    ("sgd-classifier", {"eta0": float("inf")}, "'eta0'"),
    ("sgd-classifier", {"l1_ratio": 2.0}, "'l1_ratio'"),
    ("sgd-regressor", {"loss": "hinge"}, "'loss'"),  # a classifier's loss
])
def test_hyperparameters_are_checked_by_scikit_learn_before_an_estimator_is_built(estimator, hyperparameters, names):
    classes = (0, 1) if estimator == "sgd-classifier" else ()
    for _ in range(2):  # the second time from the cache of scikit-learn's verdicts, refused the same
        with pytest.raises(ValueError, match="hyperparameters refused by scikit-learn") as err:
            ModelSpec(estimator, 3, classes, hyperparameters)
        assert names in str(err.value) and "\n" not in str(err.value)
    wire = {"estimator": estimator, "n_features": 3, "classes": list(classes), "hyperparameters": hyperparameters}
    with pytest.raises(ProtocolError, match="refused by scikit-learn"):
        ModelSpec.from_wire(wire)


def test_valid_hyperparameters_still_pass():
    spec = ModelSpec("sgd-classifier", 3, (0, 1, 2), {"loss": "log_loss", "penalty": None, "alpha": 1e-4,
                                                     "learning_rate": "constant", "eta0": 0.01})
    assert build_estimator(spec).loss == "log_loss"
