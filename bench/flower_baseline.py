"""Flower 1.41 on the tasks of bench/device_bytes.py (digits; 100 classes x 10,000 features): one server or one client process.

Run by bench/device_bytes.py with a Python that has flwr (kept out of fedmq's dependencies:
`python -m venv .flwr-venv && .flwr-venv/bin/pip install 'flwr==1.41.*' scikit-learn`).
FedAvg over every client each round; a client continues the global SGDClassifier with one
partial_fit call over its shuffled shard (the same local epoch as a fedmq agent) and returns
its parameters (in --dtype: float64, NumPyClient's default for scikit-learn, or float32);
the server scores the global model on the test set after every round (accuracy; with
--classes 0 the model is fedmq's sgd-regressor, an SGDRegressor scored by r2, printed as such). --strategy fedprox runs
Flower's FedProx: the client applies its proximal term mu/2 ||w - w_global||^2 as one proximal
step after the local epoch, w = (w_local + mu w_global) / (1 + mu) (scikit-learn's partial_fit has
no hook for a loss term). --pad makes each fit last at least that many seconds (bench/padding.py:
a slow device, the same padding bench/async_advantage.py gives fedmq agents).

    python bench/flower_baseline.py server --address 127.0.0.1:PORT --data DIR --clients 20 --rounds 20
    python bench/flower_baseline.py client --address 127.0.0.1:PORT --data DIR --index I
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from sklearn.linear_model import SGDClassifier, SGDRegressor

from padding import padded


def load(path: Path, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """A shard written by bench/device_bytes.py: features, then the label (or, with 0 classes, target) column."""
    data = np.loadtxt(path, delimiter=",", skiprows=1)
    return data[:, :-1], data[:, -1].astype(int) if classes else data[:, -1]


def estimator(seed: int, n_features: int, classes: int) -> SGDClassifier | SGDRegressor:
    """fedmq's default sgd-classifier (hinge loss), or with 0 classes its sgd-regressor, with zero parameters."""
    if not classes:
        est = SGDRegressor(random_state=seed)
        est.partial_fit(np.zeros((1, n_features)), np.zeros(1))
    else:
        est = SGDClassifier(random_state=seed)
        est.partial_fit(np.zeros((1, n_features)), np.zeros(1, dtype=int), classes=np.arange(classes))
    est.coef_[:] = 0.0
    est.intercept_[:] = 0.0
    est.t_ = 1.0
    return est


def run_client(args: argparse.Namespace) -> None:
    """One device: fit from the received parameters, send them back; prints `fit N` per round."""
    import flwr as fl

    X, y = load(args.data / f"agent{args.index}.csv", args.classes)
    est = estimator(args.index, X.shape[1], args.classes)
    rng = np.random.default_rng(args.index)
    fits = [0]

    class Client(fl.client.NumPyClient):
        def get_parameters(self, config):
            return [est.coef_.astype(args.dtype), est.intercept_.astype(args.dtype)]

        def fit(self, parameters, config):
            # scikit-learn trains in float64 (X's type) whatever the wire carried
            est.coef_, est.intercept_ = np.array(parameters[0], np.float64), np.array(parameters[1], np.float64)
            order = rng.permutation(len(y))
            est.partial_fit(X[order], y[order])
            mu = float(config.get("proximal_mu", 0.0))  # FedProx's: the proximal step towards the global model
            if mu > 0:
                est.coef_ = (est.coef_ + mu * np.asarray(parameters[0], np.float64)) / (1 + mu)
                est.intercept_ = (est.intercept_ + mu * np.asarray(parameters[1], np.float64)) / (1 + mu)
            fits[0] += 1
            print(f"fit {fits[0]}", flush=True)
            return [est.coef_.astype(args.dtype), est.intercept_.astype(args.dtype)], len(y), {}

        def evaluate(self, parameters, config):
            return 0.0, len(y), {}

    if args.pad:
        Client.fit = padded(Client.fit, args.pad)

    fl.client.start_client(server_address=args.address, client=Client().to_client(), insecure=True)


def run_server(args: argparse.Namespace) -> None:
    """FedAvg over all clients for --rounds rounds; prints `round R accuracy A` (or `r2`) after each."""
    import flwr as fl

    X_test, y_test = load(args.data / "test.csv", args.classes)
    est = estimator(0, X_test.shape[1], args.classes)
    shapes = [est.coef_.shape, est.intercept_.shape]

    def evaluate(server_round, parameters, config):
        est.coef_ = np.array(parameters[0], np.float64).reshape(shapes[0])
        est.intercept_ = np.array(parameters[1], np.float64).reshape(shapes[1])
        metric = "accuracy" if args.classes else "r2"
        score = float(est.score(X_test, y_test))  # mean accuracy, or the coefficient of determination
        print(f"round {server_round} {metric} {score:.4f} time {time.time():.3f}", flush=True)
        return 0.0, {metric: score}

    kind, extra = fl.server.strategy.FedAvg, {}
    if args.strategy == "fedprox":
        kind, extra = fl.server.strategy.FedProx, {"proximal_mu": args.proximal_mu}
    strategy = kind(
        **extra, fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=args.clients, min_available_clients=args.clients,
        initial_parameters=fl.common.ndarrays_to_parameters([np.zeros(shapes[0], args.dtype), np.zeros(shapes[1], args.dtype)]),
        evaluate_fn=evaluate,
    )
    fl.server.start_server(server_address=args.address, config=fl.server.ServerConfig(num_rounds=args.rounds),
                           strategy=strategy)


def main() -> None:
    """Parse the role and run it."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("role", choices=("server", "client"))
    p.add_argument("--address", required=True)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--index", type=int, default=0)
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--dtype", choices=("float64", "float32"), default="float64", help="the parameters' type on the wire, both ways")
    p.add_argument("--classes", type=int, default=10, help="labels 0..N-1 (100 for the 1,000,100-parameter task); 0: a regression")
    p.add_argument("--strategy", choices=("fedavg", "fedprox"), default="fedavg", help="Flower's FedAvg or FedProx")
    p.add_argument("--proximal-mu", type=float, default=0.1, help="FedProx's mu")
    p.add_argument("--pad", type=float, default=0.0, help="seconds each fit lasts at least (a slow device)")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)
    (run_server if args.role == "server" else run_client)(args)


if __name__ == "__main__":
    sys.exit(main())
