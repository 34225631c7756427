"""Prometheus exposition of the coordinator status (``--metrics-port``).

The exporter reports the latest published status document, so Prometheus and
``mosquitto_sub`` always agree. Needs the optional prometheus-client package.
"""

from __future__ import annotations

import threading
from typing import Callable

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily


def sample(kind, name: str, doc: str, labels: dict[str, str], value: float):
    """One family (CounterMetricFamily or GaugeMetricFamily) of one sample with `labels`."""
    family = kind(name, doc, labels=list(labels))
    family.add_metric(list(labels.values()), value)
    return family


def by_label(kind, name: str, doc: str, labels: dict[str, str], label: str, values: dict):
    """One family with a sample per key of `values` (a reason, a metric) under `label`, beside `labels`."""
    family = kind(name, doc, labels=[*labels, label])
    for key, value in values.items():
        family.add_metric([*labels.values(), str(key)], value)
    return family


def eval_score(status: dict):
    """fedmq_eval_score{metric}: the global model on --eval-csv, from a status's score fields
    (coordinator.status.score_fields; the tier root's status has them too)."""
    score = GaugeMetricFamily("fedmq_eval_score", "Global model on --eval-csv", labels=["fleet", "metric"])
    for metric in ("accuracy", "r2", "roc_auc", "flagged"):
        if status.get(metric) is not None:
            score.add_metric([status["fleet"], metric], status[metric])
    return score


class StatusCollector:
    """A Prometheus collector over the newest status dict (see coordinator.status), pushed by `update` or, with
    `source`, read at every scrape (the scale-out tier's root and workers: tier/metrics.py)."""

    def __init__(self, source: Callable[[], dict | None] | None = None) -> None:
        self._status: dict | None = None
        self._source = source
        self._lock = threading.Lock()

    def update(self, status: dict) -> None:
        with self._lock:
            self._status = status

    def current(self) -> dict | None:
        if self._source is not None:
            return self._source()
        with self._lock:
            return self._status

    def collect(self):
        status = self.current()
        if status is None:
            return
        fleet = {"fleet": status["fleet"]}

        def gauge(name, doc, value):
            return sample(GaugeMetricFamily, name, doc, fleet, value)

        def counter(name, doc, value):
            return sample(CounterMetricFamily, name, doc, fleet, value)

        yield gauge("fedmq_model_version", "Version of the global model", status["version"])
        yield counter("fedmq_updates_accepted", "Updates folded into the global model", status["accepted"])
        if status["clipped"] is not None:  # null under central DP: an un-noised clip bit (coordinator/privacy.py)
            yield counter("fedmq_updates_clipped", "Accepted updates clipped to the norm bound", status["clipped"])
        yield by_label(CounterMetricFamily, "fedmq_updates_rejected", "Updates refused, by reason", fleet, "reason",
                       status["rejected"])
        yield gauge("fedmq_updates_pending", "Accepted updates waiting in the buffer", status["pending"])
        yield gauge("fedmq_staleness_mean", "Mean staleness of accepted updates", status["staleness"]["mean"])
        yield gauge("fedmq_staleness_max", "Largest staleness of an accepted update", status["staleness"]["max"])
        yield gauge("fedmq_agents", "Agents whose updates were seen", status["agents"])
        if status.get("max_agents") is not None:
            yield gauge("fedmq_agents_max", "Agents the replay state holds at most (more: too_many_agents)",
                        status["max_agents"])
        yield counter("fedmq_sequence_gaps", "Updates agents made that never arrived (holes in their seq)", status.get("gaps", 0))
        yield counter("fedmq_buffer_timeouts", "Buffers stepped by --buffer-timeout before they filled",
                      status.get("buffer_timeouts", 0))
        buffer = status.get("buffer")  # fedbuff/fedavg: K, and K as the agents online make it (coordinator/presence.py)
        if isinstance(buffer, dict):
            yield gauge("fedmq_buffer_size", "K: updates per step as configured (--buffer-size)", buffer["size"])
            yield gauge("fedmq_buffer_effective_size", "K now: min(K, agents online) when their statuses are known",
                        buffer["effective"])
            yield gauge("fedmq_live_agents", "Agents whose retained status says they train", buffer["live_agents"])
        yield from pace_metrics(status, fleet)
        if isinstance(status.get("bounded"), dict):  # fedbuff/fedavg: one agent's weight in a buffer bounded
            bounded = CounterMetricFamily("fedmq_updates_bounded", "Updates whose weight an agent's bound lowered, by reason",
                                          labels=["fleet", "reason"])
            for reason, count in status["bounded"].items():
                bounded.add_metric([status["fleet"], reason], count)
            yield bounded
        chunks = status.get("chunks")  # chunked updates (coordinator/chunks.py): the acks held from the broker's window
        if isinstance(chunks, dict):
            yield gauge("fedmq_chunk_partial_updates", "Chunked updates partly received", chunks["partial"])
            yield gauge("fedmq_chunk_held_acks", "Chunk acknowledgements held back until their update commits",
                        chunks["held_acks"])
            yield counter("fedmq_chunk_acks_released", "Chunk acknowledgements released early by --max-held-chunks",
                          chunks["acks_released"])
        checkpoints = status.get("checkpoints") or {}
        yield counter("fedmq_checkpoints_written", "Checkpoints written", checkpoints.get("written", 0))
        yield counter("fedmq_checkpoints_deferred",
                      "Commits that wrote no checkpoint: only refused payloads since the last one", checkpoints.get("deferred", 0))
        failing = status.get("checkpoint_failing")
        yield gauge("fedmq_checkpoint_failing", "1 while checkpoints fail (nothing is acknowledged meanwhile)", 1 if failing else 0)
        if failing:
            yield gauge("fedmq_checkpoint_failing_since_seconds", "Wall-clock time checkpoints began to fail", failing["since"])
        yield gauge("fedmq_uptime_seconds", "Seconds since the coordinator started", status["uptime_s"])
        refused = CounterMetricFamily("fedmq_messages_refused", "Statistics, schema and secure-aggregation messages "
                                      "refused, by topic kind and reason", labels=["fleet", "kind", "reason"])
        for kind, section, key in (("statistics", "statistics", "rejected"), ("schema", "schema", "rejected"),
                                   ("secure_aggregation", "secure_aggregation", "refused")):
            for reason, count in ((status.get(section) or {}).get(key) or {}).items():
                refused.add_metric([status["fleet"], kind, reason], count)
        yield refused
        if isinstance(status.get("schema"), dict):  # coordinator/schema.py
            yield gauge("fedmq_schema_mismatched", "Agents whose columns are not the fleet's (they do not train)",
                        status["schema"]["mismatched"])
            yield counter("fedmq_schema_rediscovered", "Times the fleet's discovered schema lost its majority and was "
                          "discovered again", status["schema"].get("rediscovered", 0))
            refused = CounterMetricFamily("fedmq_schema_rejected", "Schema announcements refused, by reason "
                                          "(labels: an inflated label set)", labels=["fleet", "reason"])
            for reason, count in status["schema"].get("rejected", {}).items():
                refused.add_metric([status["fleet"], reason], count)
            yield refused
        secagg = status.get("secure_aggregation")  # coordinator/secagg.py: only with --secure-aggregation
        if isinstance(secagg, dict):
            yield counter("fedmq_secagg_rounds_completed", "Secure-aggregation rounds whose sum stepped the model",
                          secagg["completed"])
            for name, doc, key in (("fedmq_secagg_rounds_aborted", "Secure-aggregation rounds aborted, by reason", "aborted"),
                                   ("fedmq_secagg_excluded", "Members left out of cohorts for misbehaving, by reason", "excluded")):
                family = CounterMetricFamily(name, doc, labels=["fleet", "reason"])
                for reason, count in (secagg.get(key) or {}).items():
                    family.add_metric([status["fleet"], reason], count)
                yield family
            yield gauge("fedmq_secagg_excluded_now", "Members sitting out their back-off now",
                        len(secagg.get("excluded_now") or {}))
        yield eval_score(status)
        fleet_eval = GaugeMetricFamily(
            "fedmq_fleet_eval", "Median over agents of the metrics they report of the global model", labels=["fleet", "metric"]
        )
        for metric, value in status["fleet_eval"].items():
            if value is not None:
                fleet_eval.add_metric([status["fleet"], metric], value)
        yield fleet_eval
        privacy = status.get("privacy")  # coordinator.privacy: only with --dp-mode
        if isinstance(privacy, dict) and "epsilon" in privacy:
            dp_labels = ["fleet", "mode"]
            for key, name, doc in (
                ("epsilon", "fedmq_dp_epsilon", "Largest epsilon of any agent at fedmq_dp_delta (RDP accountant)"),
                ("epsilon_median", "fedmq_dp_epsilon_median", "Median epsilon of the agents at fedmq_dp_delta"),
                ("delta", "fedmq_dp_delta", "The delta epsilon is reported at"),
                ("noise_multiplier", "fedmq_dp_noise_multiplier", "Noise multiplier sigma (noise std sigma x clip)"),
            ):
                family = GaugeMetricFamily(name, doc, labels=dp_labels)
                family.add_metric([status["fleet"], str(privacy.get("mode"))], privacy[key])
                yield family


def pace_metrics(status: dict, labels: dict[str, str]):
    """--target-updates-per-s: what the model asks of every device (protocol/pace.py), the coordinator's or the
    tier root's status `pace`."""
    pace = status.get("pace")
    if isinstance(pace, dict):
        yield sample(GaugeMetricFamily, "fedmq_pace_interval_seconds", "Report interval the model asks of every device",
                     labels, pace["interval"])
        yield sample(GaugeMetricFamily, "fedmq_pace_agents_online", "Agents online the pace is divided among", labels,
                     pace["agents_online"])


def start_metrics_server(port: int, addr: str = "0.0.0.0",
                         collector: StatusCollector | None = None) -> Callable[[dict], None]:
    """Serve /metrics on `port` in a daemon thread; returns the callback to feed it statuses (`collector`, by
    default a StatusCollector of the coordinator's status)."""
    collector = collector if collector is not None else StatusCollector()
    registry = CollectorRegistry()
    registry.register(collector)
    start_http_server(port, addr=addr, registry=registry)
    return collector.update
