"""Local training: evaluate the received global model, continue it with partial_fit, return the delta."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from sklearn.metrics import accuracy_score, hinge_loss, log_loss, mean_squared_error, r2_score

from protocol.messages import ModelMessage
from protocol.model_spec import ModelSpec, build_estimator, get_flat_params, set_flat_params

log = logging.getLogger(__name__)

_PROBABILISTIC_LOSSES = ("log_loss", "modified_huber")


@dataclass
class TrainResult:
    delta: np.ndarray  # local - global, float64
    metrics: dict[str, float]
    n_samples: int


class LocalTrainer:
    """Continues the global model on local data with scikit-learn's `partial_fit`.

    One estimator is kept while the spec stays the same, so scikit-learn's learning-rate
    schedule (`t_`) keeps decaying across rounds as it would in centralised training.
    """

    def __init__(self, local_epochs: int = 1, batch_size: int = 32, random_state: int | None = None) -> None:
        if local_epochs < 1 or batch_size < 1:
            raise ValueError("local epochs and batch size must be >= 1")
        self.local_epochs = local_epochs
        self.batch_size = batch_size
        self.rng = np.random.default_rng(random_state)
        self.random_state = random_state
        self.estimator_ = None
        self.spec_: ModelSpec | None = None

    def train(self, model: ModelMessage, X: np.ndarray, y: np.ndarray) -> TrainResult | None:
        """Train from `model` on (X, y); None when no usable rows or training diverged."""
        spec = model.spec
        if X.shape[1] != spec.n_features:
            raise ValueError(f"local data has {X.shape[1]} features, the fleet's model expects {spec.n_features}")
        if spec.is_classifier:
            known = np.isin(y, np.asarray(spec.classes))
            if not known.all():
                log.warning("skipping %d rows whose label is not one of the model's classes", int((~known).sum()))
                X, y = X[known], y[known]
        if len(y) == 0:
            return None
        if self.spec_ != spec or self.estimator_ is None:
            self.estimator_ = build_estimator(spec, model.params, random_state=self.random_state)
            self.spec_ = spec
        else:
            set_flat_params(self.estimator_, spec, model.params)
        metrics = evaluate(self.estimator_, spec, X, y, prefix="eval_")
        for _ in range(self.local_epochs):
            order = self.rng.permutation(len(y))
            for start in range(0, len(y), self.batch_size):
                batch = order[start:start + self.batch_size]
                self.estimator_.partial_fit(X[batch], y[batch])
        local = get_flat_params(self.estimator_, spec)
        if not np.isfinite(local).all():
            log.error("local training diverged (non-finite parameters); not sending this round")
            self.estimator_ = None
            return None
        metrics.update(evaluate(self.estimator_, spec, X, y, prefix="train_"))
        return TrainResult(local - model.params, metrics, int(len(y)))


def evaluate(est, spec: ModelSpec, X: np.ndarray, y: np.ndarray, prefix: str) -> dict[str, float]:
    """Loss and accuracy (classifier) or r2 (regressor) of `est` on (X, y)."""
    with np.errstate(all="ignore"):
        if not spec.is_classifier:
            predicted = est.predict(X)
            if not np.isfinite(predicted).all():
                return {}
            out = {f"{prefix}loss": float(mean_squared_error(y, predicted))}
            if len(y) > 1:
                out[f"{prefix}r2"] = float(r2_score(y, predicted))
            return out
        labels = list(spec.classes)
        if est.loss in _PROBABILISTIC_LOSSES:
            loss = log_loss(y, est.predict_proba(X), labels=labels)
        else:
            loss = hinge_loss(y, est.decision_function(X), labels=labels)
        return {f"{prefix}loss": float(loss), f"{prefix}accuracy": float(accuracy_score(y, est.predict(X)))}
