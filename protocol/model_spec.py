"""Model spec <-> scikit-learn estimator, and the estimator's parameters as one flat vector.

The coordinator owns the spec (estimator kind, hyperparameters, classes, feature count)
and ships it inside every model message, so an agent can build a ready-to-train
estimator from the global model without having seen any data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from sklearn.linear_model import SGDClassifier, SGDOneClassSVM, SGDRegressor

from protocol.errors import ProtocolError

ESTIMATORS = {"sgd-classifier": SGDClassifier, "sgd-regressor": SGDRegressor, "sgd-one-class-svm": SGDOneClassSVM}
# A linear one-class SVM separates the data from the origin, and standardized features are
# centred on it, so the one-class model sees them shifted by this many fleet scales: the
# origin sits below the fleet's mean on every feature and readings that drop toward it are
# the ones flagged (`model_features`).
ONE_CLASS_SHIFT = 3.0
MAX_FEATURES = 10_000_000  # the most features a spec may have

# The hyperparameters a spec may set, with the types the wire may carry for them.
# Anything else (random_state, n_jobs, warm_start...) is the device's business.
HYPERPARAMETERS: dict[str, tuple[type, ...]] = {
    "loss": (str,),
    "penalty": (str, type(None)),
    "alpha": (float, int),
    "l1_ratio": (float, int),
    "fit_intercept": (bool,),
    "learning_rate": (str,),
    "eta0": (float, int),
    "power_t": (float, int),
    "epsilon": (float, int),
    "nu": (float, int),
}


@dataclass(frozen=True)
class ModelSpec:
    """What model the fleet trains: enough to build the estimator anywhere."""

    estimator: str
    n_features: int
    classes: tuple = ()
    hyperparameters: dict = field(default_factory=dict)
    columns: tuple = ()  # feature column names in model order (protocol/schema.py); () maps by position

    def __post_init__(self) -> None:
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"unknown estimator {self.estimator!r}: use one of {sorted(ESTIMATORS)}")
        if not isinstance(self.n_features, int) or isinstance(self.n_features, bool) or not 1 <= self.n_features <= MAX_FEATURES:
            raise ValueError(f"n_features must be an integer in [1, {MAX_FEATURES}], got {self.n_features!r}")
        if self.is_classifier:
            if len(self.classes) < 2 or len(set(self.classes)) != len(self.classes):
                raise ValueError("a classifier needs at least two distinct classes")
            if not all(isinstance(c, (int, str)) and not isinstance(c, bool) for c in self.classes):
                raise ValueError("classes must be integers or strings")
        elif self.classes:
            raise ValueError(f"{'a one-class model' if self.is_one_class else 'a regressor'} has no classes")
        if self.columns and (len(self.columns) != self.n_features or len(set(self.columns)) != len(self.columns)
                             or not all(isinstance(c, str) and c for c in self.columns)):
            raise ValueError(f"columns must be {self.n_features} distinct non-empty names, one per feature")
        for name, value in self.hyperparameters.items():
            allowed = HYPERPARAMETERS.get(name)
            if allowed is None:
                raise ValueError(f"hyperparameter {name!r} is not settable by a spec: use {sorted(HYPERPARAMETERS)}")
            if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
                raise ValueError(f"hyperparameter {name}={value!r} has the wrong type")
        check_hyperparameters(self.estimator, self.hyperparameters)

    @property
    def is_classifier(self) -> bool:
        return self.estimator == "sgd-classifier"

    @property
    def is_one_class(self) -> bool:
        """An anomaly detector trained on unlabeled rows (its parameters: coef_, then -offset_)."""
        return self.estimator == "sgd-one-class-svm"

    @property
    def coef_shape(self) -> tuple[int, ...]:
        if not self.is_classifier:
            return (self.n_features,)
        rows = 1 if len(self.classes) == 2 else len(self.classes)
        return (rows, self.n_features)

    @property
    def n_params(self) -> int:
        """Length of the flat parameter vector: coef_ then intercept_."""
        rows = self.coef_shape[0] if self.is_classifier else 1
        return rows * self.n_features + rows

    def to_wire(self) -> dict:
        return {
            "estimator": self.estimator,
            "n_features": self.n_features,
            "classes": list(self.classes),
            "hyperparameters": dict(self.hyperparameters),
            **({"columns": list(self.columns)} if self.columns else {}),
        }

    @classmethod
    def from_wire(cls, wire: object) -> "ModelSpec":
        """Strictly build a spec from its wire dict; ProtocolError if anything is off."""
        if not isinstance(wire, dict):
            raise ProtocolError("schema", "spec must be a map")
        try:
            classes = wire.get("classes", [])
            hyper = wire.get("hyperparameters", {})
            columns = wire.get("columns", [])
            if not isinstance(classes, list) or not isinstance(hyper, dict) or not isinstance(columns, list):
                raise ValueError("spec.classes and spec.columns must be lists and spec.hyperparameters a map")
            return cls(
                estimator=wire.get("estimator"),
                n_features=wire.get("n_features"),
                classes=tuple(classes),
                hyperparameters=hyper,
                columns=tuple(columns),
            )
        except (TypeError, ValueError) as exc:
            raise ProtocolError("schema", f"bad model spec: {exc}") from None


def check_hyperparameters(estimator: str, hyperparameters: dict) -> None:
    """ValueError (one line) unless scikit-learn itself accepts these values for `estimator`.

    A spec arrives from the network: an unknown `loss`, `penalty` or `learning_rate` string
    would otherwise surface as a KeyError deep inside the first `partial_fit` (scikit-learn
    skips its parameter validation for an estimator that already has coefficients, which
    `build_estimator` sets). So the estimator's own checks run here, on an unfitted one:
    `_validate_params` (types, ranges, allowed strings) and `_more_validate_params` (the
    combinations, such as eta0 > 0 for a constant learning rate), as `partial_fit` would.
    """
    refusal = _sklearn_refusal(estimator, tuple(sorted((k, type(v).__name__, v) for k, v in hyperparameters.items())))
    if refusal is not None:
        raise ValueError(refusal)


@lru_cache(maxsize=64)
def _sklearn_refusal(estimator: str, hyperparameters: tuple) -> str | None:
    """scikit-learn's refusal of these (name, type, value) hyperparameters, or None; cached: every model
    message carries the fleet's spec, and building an estimator to validate it was ~0.3 ms a message."""
    try:
        est = ESTIMATORS[estimator](**{k: v for k, _, v in hyperparameters})
        est._validate_params()
        est._more_validate_params(for_partial_fit=True)
    except (TypeError, ValueError) as exc:
        text = " ".join(str(exc).split())
        return f"hyperparameters refused by scikit-learn: {text}"
    return None


def build_estimator(spec: ModelSpec, params: np.ndarray | None = None, *, random_state: int | None = None):
    """A ready-to-use estimator for `spec` holding `params` (zeros when None).

    The estimator can `predict` at once and continues with `partial_fit` from these
    parameters: scikit-learn keeps existing `coef_`/`intercept_` on later partial fits.
    """
    est = ESTIMATORS[spec.estimator](random_state=random_state, **spec.hyperparameters)
    if spec.is_classifier:
        est.classes_ = np.asarray(spec.classes)
    est.n_features_in_ = spec.n_features
    set_flat_params(est, spec, np.zeros(spec.n_params) if params is None else params)
    return est


def get_flat_params(est, spec: ModelSpec) -> np.ndarray:
    """The estimator's coef_ and intercept_ (a one-class model's -offset_) as one float64 vector of length spec.n_params.

    A one-class model decides by coef_ . x - offset_, so -offset_ plays the intercept: the
    re-expression for a new scaling (protocol/statistics.py) applies to it unchanged.
    """
    intercept = -np.ravel(est.offset_) if spec.is_one_class else np.ravel(est.intercept_)
    return np.concatenate([np.ravel(est.coef_), intercept]).astype(np.float64)


def set_flat_params(est, spec: ModelSpec, flat: np.ndarray) -> None:
    """Load a flat vector (as from `get_flat_params`) into the estimator in place."""
    flat = np.asarray(flat, dtype=np.float64)
    if flat.shape != (spec.n_params,):
        raise ValueError(f"expected {spec.n_params} parameters for this spec, got shape {flat.shape}")
    n_coef = int(np.prod(spec.coef_shape))
    est.coef_ = flat[:n_coef].reshape(spec.coef_shape).copy()
    if spec.is_one_class:
        est.offset_ = -flat[n_coef:]
    else:
        est.intercept_ = flat[n_coef:].copy()


def model_features(spec: ModelSpec, X: np.ndarray) -> np.ndarray:
    """What the estimator is fed: the (standardized) features, shifted for a one-class model."""
    return X + ONE_CLASS_SHIFT if spec.is_one_class else X


def decision(spec: ModelSpec, params: np.ndarray, X: np.ndarray) -> np.ndarray:
    """The model's decision function on features as agents prepare them (before `model_features`)."""
    n_coef = int(np.prod(spec.coef_shape))
    coef = np.asarray(params[:n_coef], dtype=np.float64).reshape(spec.coef_shape)
    with np.errstate(all="ignore"):
        return model_features(spec, np.asarray(X, dtype=np.float64)) @ coef.T + params[n_coef:]
