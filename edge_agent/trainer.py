"""Local training: evaluate the received global model, continue it with partial_fit, return the delta.

Device CPU is the budget: an epoch is one `partial_fit` call over the shuffled local data
(scikit-learn's per-sample SGD, the same epoch as any batching of it, without the per-call
validation and one-vs-rest dispatch), and the evaluation is one matrix product scored in
numpy. The model after training is scored only on request (`train_metrics`).

Pure: no MQTT, no files. The agent hands in a model message and (X, y); it gets back the
delta to send, or None when there is nothing worth sending.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from edge_agent import ovr
from protocol.messages import ModelMessage
from protocol.model_spec import ModelSpec, build_estimator, get_flat_params, model_features, set_flat_params

log = logging.getLogger(__name__)

# SGDClassifier losses that define predict_proba, so the evaluation can report log loss.
_PROBABILISTIC_LOSSES = ("log_loss", "modified_huber")
# Parameters must survive the float32 wire format; beyond this they are Inf there.
_FLOAT32_MAX = float(np.finfo(np.float32).max)
# What a device accepts from the fleet by default (fedmq-agent --max-classes, --max-features,
# --max-model-bytes): a model is refused beyond these, before any estimator is built.
DEFAULT_MAX_CLASSES = 1000
DEFAULT_MAX_FEATURES = 100_000
DEFAULT_MAX_MODEL_BYTES = 4 * 1024 * 1024  # float32 parameters on the wire: about a million


@dataclass(frozen=True)
class ModelLimits:
    """The largest model this device trains: classes, features, parameter bytes (float32)."""

    max_classes: int = DEFAULT_MAX_CLASSES
    max_features: int = DEFAULT_MAX_FEATURES
    max_model_bytes: int = DEFAULT_MAX_MODEL_BYTES

    def check_classes(self, count: int) -> None:
        """ValueError (one line, naming the flag) if `count` classes are more than this device takes."""
        if count > self.max_classes:
            raise ValueError(f"the model has {count} classes, this agent accepts at most {self.max_classes} "
                             "(--max-classes)")

    def check(self, spec: ModelSpec) -> None:
        """ValueError (one line, naming the flag) if `spec` is beyond these limits."""
        self.check_classes(len(spec.classes))
        if spec.n_features > self.max_features:
            raise ValueError(f"the model has {spec.n_features} features, this agent accepts at most "
                             f"{self.max_features} (--max-features)")
        if 4 * spec.n_params > self.max_model_bytes:
            raise ValueError(f"the model has {spec.n_params} parameters ({4 * spec.n_params} bytes), this agent "
                             f"accepts at most {self.max_model_bytes} bytes (--max-model-bytes)")


@dataclass
class TrainResult:
    """What one local round produced."""

    delta: np.ndarray  # local - global, float64
    metrics: dict[str, float]  # eval_* (global model on local data); train_* (after training) if asked for
    n_samples: int  # rows trained on
    n_skipped: int = 0  # rows whose label is not one of the model's classes


class LocalTrainer:
    """Continues the global model on local data with scikit-learn's `partial_fit`.

    One estimator is kept while the spec stays the same, so scikit-learn's learning-rate
    schedule (`t_`) keeps decaying across rounds as it would in centralised training.
    `batch_size` (None: all rows in one call) only bounds the rows handed to scikit-learn
    at once; the SGD steps are per sample either way.
    """

    def __init__(self, local_epochs: int = 1, batch_size: int | None = None, random_state: int | None = None,
                 limits: ModelLimits | None = None, train_metrics: bool = False) -> None:
        if local_epochs < 1 or (batch_size is not None and batch_size < 1):
            raise ValueError("local epochs and batch size must be >= 1")
        self.train_metrics = train_metrics
        self.limits = limits or ModelLimits()
        self.local_epochs = local_epochs
        self.batch_size = batch_size
        self.random_state = random_state
        self.rng = np.random.default_rng(random_state)
        self.estimator_ = None
        self.skipped_labels_ = 0  # rows of the last round whose label is not a class of the model (status: skipped_labels)
        self._said: set[tuple] = set()  # what a warning about the data already said (once, not every round)
        self.spec_: ModelSpec | None = None

    def train(self, model: ModelMessage, X: np.ndarray, y: np.ndarray) -> TrainResult | None:
        """Evaluate `model` on (X, y), train from it, return the delta.

        None when no row is usable or training diverged (logged; the next model starts
        afresh). ValueError (one line) when the model is beyond `limits`, when the data does
        not fit it (feature count), or when scikit-learn fails on it in any other way.
        """
        spec = model.spec
        self.limits.check(spec)
        try:
            return self._train(model, X, y)
        except ValueError:
            raise
        except Exception as exc:  # nothing a model can make scikit-learn raise may end the agent
            self.estimator_ = None
            text = " ".join(str(exc).split())
            raise ValueError(f"training failed: {type(exc).__name__}: {text}") from None

    def _say_once(self, key: tuple, message: str, *args) -> None:
        """A warning about the local data, once per distinct situation: on a device it would
        otherwise repeat every round, forever (the status counts it instead)."""
        if key not in self._said:
            self._said.add(key)
            log.warning(message, *args)

    def _train(self, model: ModelMessage, X: np.ndarray, y: np.ndarray) -> TrainResult | None:
        spec = model.spec
        X = np.asarray(X, dtype=np.float64)
        y = np.asarray(y)
        if X.ndim != 2 or X.shape[1] != spec.n_features:
            got = X.shape[1] if X.ndim == 2 else "?"
            raise ValueError(f"local data has {got} features, the fleet's model expects {spec.n_features}")
        if not np.isfinite(X).all():  # partial_fit refuses these; edge_agent/ovr.py would train on them
            bad = int((~np.isfinite(X)).sum())
            raise ValueError(f"local data has {bad} NaN or infinite value(s) after imputation and scaling")
        skipped = 0
        X = model_features(spec, X)  # a one-class model sees them shifted (protocol/model_spec.py)
        if spec.is_classifier:
            known = np.isin(y, np.asarray(spec.classes))
            skipped = int((~known).sum())
            if skipped:
                self._say_once(("labels", spec.classes),
                               "skipping %d of %d rows whose label is not one of the model's classes %s (said once "
                               "while it holds; counted as skipped_labels in the status)",
                               skipped, len(y), list(spec.classes))
                X, y = X[known], y[known]
        self.skipped_labels_ = skipped
        if len(y) == 0:
            self._say_once(("no rows",), "no usable rows to train on")
            return None
        if self.spec_ != spec or self.estimator_ is None:
            self.estimator_ = build_estimator(spec, model.params, random_state=self.random_state)
            self.spec_ = spec
        else:
            set_flat_params(self.estimator_, spec, model.params)
        if model.steps:  # the fleet's learning-rate schedule: a new estimator starts there, not at step 1 (a large
            # step), and a kept one never lags it (a slow device's own few rounds kept its rate, and deltas, high)
            fleet_t = 1.0 + model.steps * self.local_epochs
            self.estimator_.t_ = max(getattr(self.estimator_, "t_", 1.0), fleet_t)  # a new one has no t_ yet
        metrics = evaluate(self.estimator_, spec, X, y, prefix="eval_")
        try:
            with np.errstate(all="ignore"):
                self._fit_epochs(X, y)
        except ValueError as exc:  # scikit-learn's "Floating-point under-/overflow occurred"
            return self._diverged(str(exc))
        local = get_flat_params(self.estimator_, spec)
        if not np.isfinite(local).all() or np.abs(local).max(initial=0.0) > _FLOAT32_MAX:
            return self._diverged("non-finite parameters")
        if self.train_metrics:
            metrics.update(evaluate(self.estimator_, spec, X, y, prefix="train_"))
        return TrainResult(local - model.params, metrics, int(len(y)), skipped)

    def _fit_epochs(self, X: np.ndarray, y: np.ndarray) -> None:
        for _ in range(self.local_epochs):
            order = self.rng.permutation(len(y))
            step = self.batch_size or len(y)
            for start in range(0, len(y), step):
                batch = order[start:start + step]
                if not ovr.epoch(self.estimator_, X[batch], y[batch]):  # the same step, without the per-call checks
                    self.estimator_.partial_fit(X[batch], y[batch])

    def _diverged(self, why: str) -> None:
        log.error("local training diverged (%s); not sending this round", why)
        self.estimator_ = None  # the next round rebuilds it from the global model
        return None


def evaluate(est, spec: ModelSpec, X: np.ndarray, y: np.ndarray, prefix: str) -> dict[str, float]:
    """Loss and accuracy (classifier) or squared error and r2 (regressor) of `est` on (X, y).

    Classifier loss is log loss when the estimator's loss gives probabilities, else hinge
    loss, as scikit-learn's `log_loss` and `hinge_loss` define them, from one decision
    function (numpy, no per-call validation). Labels of `y` are among the classes (rows that
    are not were skipped). Metrics that come out non-finite are left out (no NaN in JSON).
    """
    with np.errstate(all="ignore"):
        if spec.is_one_class:  # unlabeled: the share of rows flagged (decision < 0) and the hinge loss
            scores = X @ np.asarray(est.coef_, dtype=np.float64) - est.offset_
            out = {"flagged": float(np.mean(scores < 0)), "loss": float(np.maximum(0.0, -scores).mean())}
            return {prefix + k: float(v) for k, v in out.items() if math.isfinite(v)}
        scores = X @ np.asarray(est.coef_, dtype=np.float64).T + est.intercept_
        if spec.is_classifier:
            classes = est.classes_
            index = np.searchsorted(classes, y)
            binary = scores.ndim == 1 or scores.shape[1] == 1
            if binary:
                scores = scores.ravel()
                predicted = (scores > 0).astype(int)
            else:
                predicted = scores.argmax(axis=1)
            if est.loss in _PROBABILISTIC_LOSSES:
                loss = _log_loss(est, X, scores, index, binary)
            elif binary:
                loss = np.maximum(0.0, 1.0 - np.where(index == 1, 1.0, -1.0) * scores).mean()
            else:
                rows = np.arange(len(y))
                true = scores[rows, index]
                others = scores.copy()
                others[rows, index] = -np.inf
                loss = np.maximum(0.0, 1.0 - (true - others.max(axis=1))).mean()
            out = {"loss": loss, "accuracy": float(np.mean(predicted == index))}
        else:
            predicted = scores.ravel()
            finite = bool(np.isfinite(predicted).all())
            out = {"loss": float(np.mean((y - predicted) ** 2)) if finite else math.nan}
            if len(y) > 1 and finite:
                residual, total = float(np.sum((y - predicted) ** 2)), float(np.sum((y - np.mean(y)) ** 2))
                # scikit-learn's r2_score(force_finite=True): a constant target scores 1 if fit exactly, else 0
                out["r2"] = 1.0 - residual / total if total > 0 else (1.0 if residual == 0 else 0.0)
    return {prefix + k: float(v) for k, v in out.items() if math.isfinite(v)}


def _log_loss(est, X: np.ndarray, scores: np.ndarray, index: np.ndarray, binary: bool) -> float:
    """scikit-learn's log_loss of est.predict_proba, from the decision function already computed (log_loss)."""
    if est.loss == "log_loss":
        p = 1.0 / (1.0 + np.exp(-scores))
        proba = np.column_stack([1.0 - p, p]) if binary else p / p.sum(axis=1, keepdims=True)
    else:  # modified_huber: scikit-learn's own probabilities (rare; not repeated here)
        proba = np.asarray(est.predict_proba(X), dtype=np.float64)
    eps = np.finfo(proba.dtype).eps
    proba = np.clip(proba, eps, 1 - eps)
    return float(-np.mean(np.log(proba[np.arange(len(index)), index])))
