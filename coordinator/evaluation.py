"""Scoring the global model on a held-out set, and the fleet's own federated evaluation."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
from sklearn.metrics import accuracy_score, r2_score, roc_auc_score

from protocol.model_spec import ModelSpec, build_estimator, decision
from protocol.schema import column_order
from protocol.tabular import DataError, load_csv, read_columns


def load_eval_set(path: str, label_column: str, spec: ModelSpec, *,
                  feature_stats: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(X, y) of an --eval-csv for `spec` (its columns in the fleet's order when the spec names them);
    DataError with one line when the file cannot score this model (the coordinator's and the tier root's).
    Missing values are refused unless `feature_stats` (they take the fleet mean)."""
    X, y = load_csv(path, label_column)
    if spec.columns:  # by name, in the fleet's order
        try:
            order = column_order(read_columns(path, label_column), spec)
        except ValueError as exc:
            raise DataError(f"{path}: {exc}") from None
        X = X if order is None else X[:, order]
    if X.shape[1] != spec.n_features:
        raise DataError(f"{path}: {X.shape[1]} features, the model has {spec.n_features}")
    if not feature_stats and np.isnan(X).any():
        raise DataError(f"{path}: {int(np.isnan(X).sum())} missing value(s): give --feature-stats "
                        "so they take the fleet mean")
    if spec.is_classifier:
        unknown = sorted(set(y.tolist()) - set(spec.classes), key=str)
        if unknown:
            raise DataError(f"{path}: labels {unknown[:5]} are not among --classes")
    return X, y


def score(spec: ModelSpec, params: np.ndarray, X: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """{"accuracy": ...} for a classifier, {"r2": ...} for a regressor; a one-class model:
    {"flagged": share of rows with decision < 0, "roc_auc": ...} (the AUC when y is a 0/1
    anomaly label holding both values; 1 marks an anomaly, scored by -decision)."""
    if spec.is_one_class:
        scores = decision(spec, params, X)
        out = {"flagged": float(np.mean(scores < 0))}
        labels = set(np.unique(y).tolist())
        if labels == {0, 1} and np.isfinite(scores).all():
            out["roc_auc"] = float(roc_auc_score(y, -scores))
        return out
    predicted = build_estimator(spec, params).predict(X)
    if spec.is_classifier:
        return {"accuracy": float(accuracy_score(y, predicted))}
    return {"r2": float(r2_score(y, predicted))}


class FleetEvaluation:
    """The median over agents of what each reports about the global model on its own data.

    Agents evaluate the model they received before training and send `eval_*` metrics with
    their update; the newest report of each of the `max_agents` most recently reporting
    agents is one vote, whatever sample count it claims (issue 18: one agent claiming 10^9
    samples reported the fleet's accuracy), so agents that left long ago drop out and a
    minority cannot move the result outside what the others report.
    """

    def __init__(self, max_agents: int = 10_000) -> None:
        self.max_agents = max_agents
        self._latest: OrderedDict[str, tuple[int, dict[str, float]]] = OrderedDict()

    def report(self, agent: str, n_samples: int, metrics: dict[str, float]) -> None:
        evals = {k: v for k, v in metrics.items() if k.startswith("eval_")}
        if not evals:
            return
        self._latest[agent] = (n_samples, evals)
        self._latest.move_to_end(agent)
        while len(self._latest) > self.max_agents:
            self._latest.popitem(last=False)

    def summary(self) -> dict[str, float]:
        """{"loss": ..., "accuracy" or "r2": ...}: each metric's median over the agents reporting it."""
        votes: dict[str, list[float]] = {}
        for _, evals in self._latest.values():
            for key, value in evals.items():
                votes.setdefault(key[len("eval_"):], []).append(value)
        return {key: float(np.median(values)) for key, values in votes.items()}
