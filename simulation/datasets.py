"""Datasets the simulator trains on: scikit-learn's bundled sets and synthetic tasks generated in-process.

`many_classes` and `sensors` are the harder tasks (issue 23): a linear SGD model needs tens of
federated rounds on them under a non-IID split (`--partition shards:4` and `shards:1`, bench/async_advantage.py).
All load offline, with a seeded split stratified by class (by decile of y for `linear`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from sklearn import datasets as skdata
from sklearn.linear_model import SGDClassifier, SGDOneClassSVM, SGDRegressor
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split

from protocol.model_spec import ONE_CLASS_SHIFT

DATASETS = ("digits", "breast_cancer", "wine", "linear", "anomaly", "many_classes", "sensors")
_BUNDLED = {"digits": skdata.load_digits, "breast_cancer": skdata.load_breast_cancer, "wine": skdata.load_wine}


@dataclass
class Dataset:
    """A train/test split and what a model spec needs to know about it."""

    name: str
    task: str  # "classification" or "regression"
    X_train: np.ndarray
    y_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    classes: tuple = ()  # empty for regression
    true_coef: np.ndarray | None = field(default=None, repr=False)  # `linear` only
    true_intercept: float | None = None  # `linear` only

    @property
    def n_features(self) -> int:
        return self.X_train.shape[1]

    columns: tuple = ()  # feature names, where the set has them (`anomaly`)

    @property
    def model(self) -> str:
        """The fedmq estimator name for this task."""
        return {"classification": "sgd-classifier", "anomaly": "sgd-one-class-svm"}.get(self.task, "sgd-regressor")

    @property
    def metric(self) -> str:
        """What the coordinator's status scores the held-out split by for this task."""
        return {"classification": "accuracy", "anomaly": "roc_auc"}.get(self.task, "r2")


def load_dataset(name: str, *, test_size: float = 0.25, seed: int = 0, raw: bool = False) -> Dataset:
    """Dataset `name` (one of DATASETS), split into train and test with `seed`.

    `raw`: every bundled set in its own units, as devices log them; a fleet scales them
    with the federated feature statistics (coordinator --feature-stats). Otherwise digits
    keeps its raw 0..16 pixel values and breast_cancer and wine are standardised with the
    pooled train split's mean and deviation, which no one in a real fleet can compute
    (the centralized ceiling of bench/raw_data.py).
    """
    if name == "linear":
        return make_linear(test_size=test_size, seed=seed)
    if name == "many_classes":
        return make_many_classes(test_size=test_size, seed=seed)
    if name == "sensors":  # sensor units unless standardized with the pooled train split (the reference)
        ds = make_sensors(test_size=test_size, seed=seed)
        if not raw:
            ds.X_train, ds.X_test = standardise(ds.X_train, ds.X_test)
        return ds
    if name == "anomaly":  # sensor units unless standardized with the pooled train split (the reference)
        ds = make_anomaly(test_size=test_size, seed=seed)
        if not raw:
            ds.X_train, ds.X_test = standardise(ds.X_train, ds.X_test)
        return ds
    if name not in _BUNDLED:
        raise ValueError(f"unknown dataset {name!r}: use one of {', '.join(DATASETS)}")
    X, y = _BUNDLED[name](return_X_y=True)
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=test_size, random_state=seed, stratify=y)
    if name != "digits" and not raw:
        X_train, X_test = standardise(X_train, X_test)
    classes = tuple(int(c) for c in np.unique(y))
    return Dataset(name, "classification", X_train, y_train, X_test, y_test, classes)


def make_linear(
    n_samples: int = 2000, n_features: int = 10, noise: float = 0.1, *, test_size: float = 0.25, seed: int = 0
) -> Dataset:
    """y = X w + b + noise, with w and b returned so tests can check a model recovers them.

    Features are drawn standard normal, so they are standardised as generated and w, b
    are the coefficients of the features exactly as given.
    """
    rng = np.random.default_rng(seed)
    coef = rng.uniform(-2, 2, n_features)
    intercept = float(rng.uniform(-1, 1))
    X = rng.standard_normal((n_samples, n_features))
    y = X @ coef + intercept + noise * rng.standard_normal(n_samples)
    deciles = np.digitize(y, np.quantile(y, np.linspace(0, 1, 11)[1:-1]))
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=test_size, random_state=seed, stratify=deciles)
    return Dataset("linear", "regression", X_train, y_train, X_test, y_test, (), coef, intercept)


MANY_CLASSES = 20  # `many_classes`: labels 0..19


def make_many_classes(n_samples: int = 8000, n_features: int = 40, *, test_size: float = 0.25, seed: int = 0) -> Dataset:
    """MANY_CLASSES Gaussian classes in `n_features` dimensions (half informative, the rest noise),
    one cluster each, overlapping (class_sep 2): a linear model's ceiling is well below 1 and,
    split one class or a few per device, FedAvg needs tens of rounds to approach it.
    Drawn by scikit-learn's make_classification (no download); the split is stratified by class."""
    X, y = skdata.make_classification(n_samples=n_samples, n_features=n_features, n_informative=n_features // 2,
                                      n_redundant=0, n_classes=MANY_CLASSES, n_clusters_per_class=1,
                                      class_sep=2.0, flip_y=0.0, random_state=seed)
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=test_size, random_state=seed, stratify=y)
    return Dataset("many_classes", "classification", X_train, y_train, X_test, y_test, tuple(range(MANY_CLASSES)))


# `sensors`: sixteen correlated readings (name, mean, deviation in the unit) and a linear target.
SENSOR_READINGS = tuple((f"{kind}_{i}", mean, std) for i in range(4) for kind, mean, std in
                        (("temperature_c", 60.0, 5.0), ("pressure_hpa", 1013.0, 15.0),
                         ("current_a", 12.0, 2.0), ("flow_lpm", 300.0, 40.0)))


def make_sensors(n_samples: int = 6000, noise: float = 0.3, *, test_size: float = 0.25, seed: int = 0) -> Dataset:
    """A regression on sixteen sensor readings in their own units (SENSOR_READINGS), strongly
    correlated (a few latent factors drive them all: make_regression's effective_rank 2), the
    target a noisy linear function of them. Correlated inputs make SGD slow to converge: the
    reason it needs many rounds. The split is stratified by decile of y."""
    d = len(SENSOR_READINGS)
    z, y = skdata.make_regression(n_samples=n_samples, n_features=d, n_informative=d // 2, effective_rank=2,
                                  tail_strength=0.1, noise=0.0, random_state=seed)
    rng = np.random.default_rng(seed)
    y = y / y.std()
    y = y + noise * rng.standard_normal(n_samples)
    z = z / z.std(axis=0)
    mean, std = (np.array([s[i] for s in SENSOR_READINGS]) for i in (1, 2))
    X = mean + std * z
    deciles = np.digitize(y, np.quantile(y, np.linspace(0, 1, 11)[1:-1]))
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=test_size, random_state=seed, stratify=deciles)
    return Dataset("sensors", "regression", X_train, y_train, X_test, y_test,
                   columns=tuple(s[0] for s in SENSOR_READINGS))


# The synthetic sensor fleet of `make_anomaly`: (name, mean, deviation) in each sensor's own unit.
SENSORS = (("temperature_c", 60.0, 5.0), ("pressure_hpa", 1013.0, 15.0), ("vibration_g", 0.02, 0.004),
           ("current_a", 12.0, 2.0), ("flow_lpm", 300.0, 40.0), ("rpm", 1500.0, 100.0),
           ("humidity_pct", 45.0, 8.0), ("voltage_v", 230.0, 3.0))
# How two operating factors (load, ambient) drive the sensors, and which sensors a fault drops.
_LOADING = np.array([[0.8, 0.5, 0.6, 0.9, 0.7, 0.8, 0.0, 0.3],
                     [0.5, 0.3, 0.0, 0.1, 0.2, 0.0, 0.9, 0.4]])
_FAULT = np.array([0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0])  # a stalling pump: pressure, current, flow, rpm


def make_anomaly(n_samples: int = 4000, anomaly_rate: float = 0.05, *, test_size: float = 0.25,
                 seed: int = 0) -> Dataset:
    """Eight pump sensors in their own units (SENSORS) with faults: y is 1 on an anomalous row, else 0.

    Normal rows: two operating factors drive the sensors (_LOADING) plus noise, each in
    its unit. A fault (`anomaly_rate` of the rows) drops pressure, current, flow and rpm by
    3 to 5 of their normal deviations. The split is stratified by y.
    """
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n_samples, 2)) @ _LOADING + 0.4 * rng.standard_normal((n_samples, len(SENSORS)))
    z /= z.std(axis=0)
    y = (rng.random(n_samples) < anomaly_rate).astype(np.int64)
    z[y == 1] -= rng.uniform(3.0, 5.0, (int(y.sum()), 1)) * _FAULT
    mean, std = (np.array([s[i] for s in SENSORS]) for i in (1, 2))
    X = mean + std * z
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=test_size, random_state=seed, stratify=y)
    return Dataset("anomaly", "anomaly", X_train, y_train, X_test, y_test, columns=tuple(s[0] for s in SENSORS))


def skew_features(X: np.ndarray, rng: np.random.Generator, spread: float) -> np.ndarray:
    """`X` as read by sensors of another calibration: x * g + o per feature, log10 g ~ U(-spread, spread).

    The offset is up to `spread` (gained) standard deviations of the feature, so readings
    differ in both the zero and the unit of each feature.
    """
    d = X.shape[1]
    gain = 10.0 ** rng.uniform(-spread, spread, d)
    offset = rng.uniform(-spread, spread, d) * X.std(axis=0) * gain
    return X * gain + offset


def standardise(X_train: np.ndarray, X_test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scale both splits by the train split's mean and deviation (constant columns: by 1)."""
    mean, std = X_train.mean(axis=0), X_train.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    return (X_train - mean) / std, (X_test - mean) / std


def centralized_baseline(ds: Dataset, *, epochs: int = 20, seed: int = 0, hyperparameters: dict | None = None) -> float:
    """Test accuracy (r2; a one-class model's ROC AUC) of the same SGD model trained on all train data in one place.

    The reference a federated run is compared to: `epochs` shuffled passes of
    `partial_fit`, the way agents train locally.
    """
    rng = np.random.default_rng(seed)
    if ds.task == "anomaly":  # the one-class twin, on unlabeled rows, scored by ROC AUC on the fault label
        est = SGDOneClassSVM(random_state=seed, **(hyperparameters or {}))
        for _ in range(epochs):
            est.partial_fit(ds.X_train[rng.permutation(len(ds.y_train))] + ONE_CLASS_SHIFT)
        return float(roc_auc_score(ds.y_test, -est.decision_function(ds.X_test + ONE_CLASS_SHIFT)))
    classification = ds.task == "classification"
    est = (SGDClassifier if classification else SGDRegressor)(random_state=seed, **(hyperparameters or {}))
    classes = {"classes": np.asarray(ds.classes)} if classification else {}
    for _ in range(epochs):
        order = rng.permutation(len(ds.y_train))
        est.partial_fit(ds.X_train[order], ds.y_train[order], **classes)
    return float(est.score(ds.X_test, ds.y_test))
