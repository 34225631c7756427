"""Simulator datasets: offline, seeded, stratified splits; scaling from train only; a baseline."""

import numpy as np
import pytest
from sklearn import datasets as skdata
from sklearn.model_selection import train_test_split

from simulation.datasets import DATASETS, centralized_baseline, load_dataset, make_linear, standardise

SIZES = {"digits": (1797, 64, 10), "breast_cancer": (569, 30, 2), "wine": (178, 13, 3)}


@pytest.mark.parametrize("name", SIZES)
def test_bundled_classification_sets(name):
    rows, features, n_classes = SIZES[name]
    ds = load_dataset(name, test_size=0.25, seed=0)
    assert (ds.name, ds.task, ds.model) == (name, "classification", "sgd-classifier")
    assert ds.n_features == features == ds.X_test.shape[1]
    assert len(ds.y_train) + len(ds.y_test) == rows
    assert len(ds.y_test) == pytest.approx(0.25 * rows, abs=1)
    assert ds.classes == tuple(range(n_classes))
    assert ds.true_coef is None and ds.true_intercept is None


@pytest.mark.parametrize("name", SIZES)
def test_split_is_stratified(name):
    ds = load_dataset(name, seed=0)
    train_share = np.bincount(ds.y_train) / len(ds.y_train)
    test_share = np.bincount(ds.y_test) / len(ds.y_test)
    assert np.abs(train_share - test_share).max() < 2.5 / len(ds.y_test)


@pytest.mark.parametrize("name", DATASETS)
def test_split_is_seeded(name):
    a, b, c = load_dataset(name, seed=0), load_dataset(name, seed=0), load_dataset(name, seed=1)
    assert np.array_equal(a.X_train, b.X_train) and np.array_equal(a.y_test, b.y_test)
    assert not np.array_equal(a.X_test, c.X_test)


def test_digits_keep_raw_pixel_values():
    ds = load_dataset("digits")
    values = np.unique(np.concatenate([ds.X_train.ravel(), ds.X_test.ravel()]))
    assert values.min() == 0 and values.max() == 16 and np.array_equal(values, np.round(values))


@pytest.mark.parametrize("name, loader", [("breast_cancer", skdata.load_breast_cancer), ("wine", skdata.load_wine)])
def test_standardised_with_train_statistics_only(name, loader):
    ds = load_dataset(name, seed=3)
    np.testing.assert_allclose(ds.X_train.mean(axis=0), 0, atol=1e-9)
    np.testing.assert_allclose(ds.X_train.std(axis=0), 1, atol=1e-9)
    X, y = loader(return_X_y=True)
    raw_train, raw_test, _, _ = train_test_split(X, y, test_size=0.25, random_state=3, stratify=y)
    np.testing.assert_allclose(ds.X_test, (raw_test - raw_train.mean(axis=0)) / raw_train.std(axis=0))
    assert np.abs(ds.X_test.mean(axis=0)).max() > 1e-3  # test statistics were not used


def test_standardise_leaves_constant_columns_finite():
    train = np.array([[1.0, 5.0], [3.0, 5.0]])
    test = np.array([[2.0, 7.0]])
    scaled_train, scaled_test = standardise(train, test)
    np.testing.assert_array_equal(scaled_train, [[-1.0, 0.0], [1.0, 0.0]])
    np.testing.assert_array_equal(scaled_test, [[0.0, 2.0]])


def test_linear_has_known_coefficients_a_least_squares_fit_recovers():
    ds = load_dataset("linear", seed=0)
    assert (ds.task, ds.model, ds.classes, ds.n_features) == ("regression", "sgd-regressor", (), 10)
    assert (len(ds.y_train), len(ds.y_test)) == (1500, 500)
    A = np.column_stack([ds.X_train, np.ones(len(ds.X_train))])
    solution, *_ = np.linalg.lstsq(A, ds.y_train, rcond=None)
    np.testing.assert_allclose(solution[:-1], ds.true_coef, atol=0.02)
    assert solution[-1] == pytest.approx(ds.true_intercept, abs=0.02)
    residual = ds.y_test - ds.X_test @ ds.true_coef - ds.true_intercept
    assert residual.std() == pytest.approx(0.1, rel=0.15)  # the noise level
    np.testing.assert_allclose(ds.X_train.mean(axis=0), 0, atol=0.1)
    np.testing.assert_allclose(ds.X_train.std(axis=0), 1, atol=0.1)


def test_make_linear_sizes_and_noise():
    ds = make_linear(n_samples=400, n_features=3, noise=0.0, test_size=0.5, seed=2)
    assert ds.X_train.shape == (200, 3) and ds.X_test.shape == (200, 3)
    np.testing.assert_allclose(ds.X_test @ ds.true_coef + ds.true_intercept, ds.y_test)


def test_unknown_dataset_names_the_choices():
    with pytest.raises(ValueError, match="unknown dataset 'mnist'.*digits, breast_cancer, wine, linear"):
        load_dataset("mnist")


@pytest.mark.parametrize("name, floor", [("digits", 0.9), ("breast_cancer", 0.9), ("wine", 0.9), ("linear", 0.99)])
def test_centralized_baseline_is_a_good_reference(name, floor):
    ds = load_dataset(name)
    score = centralized_baseline(ds, epochs=20, seed=0)
    assert floor < score <= 1.0
    assert centralized_baseline(ds, epochs=20, seed=0) == score  # seeded


def test_centralized_baseline_takes_the_fleet_hyperparameters():
    ds = load_dataset("linear")
    frozen = centralized_baseline(ds, epochs=1, hyperparameters={"learning_rate": "constant", "eta0": 1e-9})
    assert frozen < 0.1 < 0.99 < centralized_baseline(ds, epochs=1)


def test_many_classes_is_a_twenty_class_task_a_linear_model_cannot_master():
    ds = load_dataset("many_classes", seed=0)
    assert (ds.task, ds.model, ds.n_features, ds.classes) == ("classification", "sgd-classifier", 40, tuple(range(20)))
    assert (len(ds.y_train), len(ds.y_test)) == (6000, 2000)
    assert np.array_equal(np.bincount(ds.y_test), np.full(20, 100))  # stratified, balanced
    assert 0.8 < centralized_baseline(ds, seed=0) < 0.95  # overlapping classes: a ceiling below 1


def _one_fedavg_round(ds, scheme: str) -> float:
    """The test score after one FedAvg round from zero over 10 devices split by `scheme`."""
    from sklearn.linear_model import SGDClassifier, SGDRegressor

    from simulation.partition import partition

    make = (lambda: SGDClassifier(random_state=0)) if ds.classes else (lambda: SGDRegressor(random_state=0))
    fits = []
    for rows in partition(ds.y_train, 10, scheme, seed=0):
        est = make()
        est.partial_fit(ds.X_train[rows], ds.y_train[rows], **({"classes": np.array(ds.classes)} if ds.classes else {}))
        fits.append(est)
    est.coef_ = np.mean([e.coef_ for e in fits], axis=0)
    est.intercept_ = np.mean([e.intercept_ for e in fits], axis=0)
    return est.score(ds.X_test, ds.y_test)


@pytest.mark.parametrize("name, scheme", [("many_classes", "shards:4"), ("sensors", "shards:1")])
def test_the_harder_tasks_are_far_from_their_ceiling_after_one_skewed_round(name, scheme):
    """What makes them need many rounds: one federated round on a skewed split ends far below
    the ceiling, while one round on an iid split is close to it."""
    ds = load_dataset(name, seed=0)
    ceiling = centralized_baseline(ds, seed=0)
    assert _one_fedavg_round(ds, scheme) < 0.85 * ceiling
    assert _one_fedavg_round(ds, "iid") > 0.85 * ceiling


def test_sensors_are_correlated_readings_in_their_units_with_a_linear_target():
    raw = load_dataset("sensors", seed=0, raw=True)
    assert (raw.task, raw.model, raw.n_features, raw.classes) == ("regression", "sgd-regressor", 16, ())
    assert raw.columns[:2] == ("temperature_c_0", "pressure_hpa_0")
    np.testing.assert_allclose(raw.X_train.mean(axis=0)[:2], [60.0, 1013.0], rtol=0.01)  # in the sensors' units
    ds = load_dataset("sensors", seed=0)
    np.testing.assert_allclose(ds.X_train.std(axis=0), 1, atol=1e-9)
    assert np.linalg.cond(np.corrcoef(ds.X_train.T)) > 100  # a few factors drive all sixteen
    A = np.column_stack([ds.X_train, np.ones(len(ds.X_train))])
    w, *_ = np.linalg.lstsq(A, ds.y_train, rcond=None)
    assert ds.y_test.var() * 0.85 > (ds.y_test - np.column_stack([ds.X_test, np.ones(len(ds.X_test))]) @ w).var()
    assert 0.85 < centralized_baseline(ds, seed=0) <= 1.0
