"""Datasets the simulator trains on: scikit-learn's bundled sets and a synthetic regression.

All load offline. Features of breast_cancer and wine are standardised with statistics of
the train split; in a real fleet such scaling would be agreed before training starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from sklearn import datasets as skdata
from sklearn.linear_model import SGDClassifier, SGDRegressor
from sklearn.model_selection import train_test_split

DATASETS = ("digits", "breast_cancer", "wine", "linear")


@dataclass
class Dataset:
    name: str
    task: str  # "classification" or "regression"
    X_train: np.ndarray
    y_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    classes: tuple = ()
    true_coef: np.ndarray | None = field(default=None, repr=False)
    true_intercept: float | None = None

    @property
    def n_features(self) -> int:
        return self.X_train.shape[1]

    @property
    def model(self) -> str:
        return "sgd-classifier" if self.task == "classification" else "sgd-regressor"


def load_dataset(name: str, *, test_size: float = 0.25, seed: int = 0) -> Dataset:
    """A seeded, stratified train/test split of dataset `name`."""
    if name == "linear":
        return make_linear(seed=seed, test_size=test_size)
    loaders = {"digits": skdata.load_digits, "breast_cancer": skdata.load_breast_cancer, "wine": skdata.load_wine}
    if name not in loaders:
        raise ValueError(f"unknown dataset {name!r}: use one of {', '.join(DATASETS)}")
    X, y = loaders[name](return_X_y=True)
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=test_size, random_state=seed, stratify=y)
    if name != "digits":
        mean, std = X_train.mean(axis=0), X_train.std(axis=0) + 1e-12
        X_train, X_test = (X_train - mean) / std, (X_test - mean) / std
    return Dataset(name, "classification", X_train, y_train, X_test, y_test, tuple(int(c) for c in np.unique(y)))


def make_linear(n_samples: int = 2000, n_features: int = 10, noise: float = 0.1, *, seed: int = 0, test_size: float = 0.25) -> Dataset:
    """y = X w + b + noise with standard-normal features and known w, b."""
    rng = np.random.default_rng(seed)
    coef = rng.uniform(-2, 2, n_features)
    intercept = float(rng.uniform(-1, 1))
    X = rng.standard_normal((n_samples, n_features))
    y = X @ coef + intercept + noise * rng.standard_normal(n_samples)
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=test_size, random_state=seed)
    return Dataset("linear", "regression", X_train, y_train, X_test, y_test, (), coef, intercept)


def centralized_baseline(ds: Dataset, *, epochs: int = 20, seed: int = 0, hyperparameters: dict | None = None) -> float:
    """Test accuracy (or r2) of the same SGD model trained on the pooled train data."""
    hyper = hyperparameters or {}
    if ds.task == "classification":
        est = SGDClassifier(random_state=seed, **hyper)
        for _ in range(epochs):
            est.partial_fit(ds.X_train, ds.y_train, classes=np.asarray(ds.classes))
    else:
        est = SGDRegressor(random_state=seed, **hyper)
        for _ in range(epochs):
            est.partial_fit(ds.X_train, ds.y_train)
    return float(est.score(ds.X_test, ds.y_test))
