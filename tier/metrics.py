"""Prometheus metrics of the scale-out tier's root and partition workers (`--metrics-port`).

The coordinator's exporter (coordinator/metrics.py) with a collector that reads the process's state at every
scrape: the root's is its status document (what it publishes on the status topic) with its lease state, a
worker's is one line per partition it owns. Series share the coordinator's names where they mean the same
(fedmq_model_version, fedmq_updates_accepted, fedmq_updates_rejected{reason}, the pace), so one dashboard
reads both modes; the tier's own are fedmq_tier_*. docs/monitoring.md lists them.
"""

from __future__ import annotations

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from coordinator.metrics import StatusCollector, by_label, eval_score, pace_metrics, sample


class TierCollector(StatusCollector):
    """The root's or a worker's state (`source()`, a dict with `role`) as Prometheus families."""

    def collect(self):
        status = self.current()
        if status is None:
            return
        yield from (root_metrics if status["role"] == "root" else worker_metrics)(status)


def root_metrics(status: dict):
    fleet = {"fleet": status["fleet"]}
    yield sample(GaugeMetricFamily, "fedmq_model_version", "Version of the global model", fleet, status["version"])
    yield sample(GaugeMetricFamily, "fedmq_tier_root_active", "1 while this root holds the root lease (0: a standby)",
                 fleet, 1 if status["active"] else 0)
    yield sample(GaugeMetricFamily, "fedmq_tier_lease_epoch", "Epoch of the root lease this root last held", fleet,
                 status["epoch"])
    yield sample(CounterMetricFamily, "fedmq_updates_accepted", "Updates folded into the global model", fleet,
                 status["folded"])
    yield by_label(CounterMetricFamily, "fedmq_updates_rejected", "Device updates the partitions refused, by reason",
                   fleet, "reason", status["updates_rejected"])
    yield by_label(CounterMetricFamily, "fedmq_updates_bounded", "Updates the root's buffer bounded per agent, by reason: "
                   "repeat_agent (of an agent already in it), weight_cap (weight lowered)", fleet, "reason", status["bounded"])
    for name, key, doc in (("fedmq_tier_partials_folded", "partials", "Partial aggregates folded"),
                           ("fedmq_tier_partials_duplicates", "duplicates", "Partial aggregates dropped as repeats"),
                           ("fedmq_tier_partials_rejected", "rejected", "Partial aggregates refused (unreadable, "
                                                                        "fenced, not foldable under DP or secure aggregation)")):
        yield sample(CounterMetricFamily, name, doc, fleet, status[key])
    yield sample(GaugeMetricFamily, "fedmq_tier_partitions", "Partitions with a partial folded", fleet,
                 status["partitions"])
    buffer = status.get("buffer")  # fedbuff: K, and K as the agents heard lately make it (tier/heard.py)
    if isinstance(buffer, dict):
        yield sample(GaugeMetricFamily, "fedmq_buffer_size", "K: agents per step as configured (--buffer-size)", fleet,
                     buffer["size"])
        yield sample(GaugeMetricFamily, "fedmq_buffer_effective_size", "K now: max(1, min(K, agents heard within "
                     "--live-window)) once a root listened that long", fleet, buffer["effective"])
        if buffer.get("heard_agents") is not None:
            yield sample(GaugeMetricFamily, "fedmq_tier_heard_agents", "Agents in partials folded within --live-window "
                         "(the newest K at most)", fleet, buffer["heard_agents"])
    yield eval_score(status)
    yield from pace_metrics(status, fleet)
    yield sample(GaugeMetricFamily, "fedmq_uptime_seconds", "Seconds since the root started", fleet, status["uptime_s"])


def worker_metrics(status: dict):
    fleet = {"fleet": status["fleet"]}
    parts = status["partitions"]
    yield sample(GaugeMetricFamily, "fedmq_model_version", "Version of the global model this worker folds against",
                 fleet, status["version"])
    yield sample(GaugeMetricFamily, "fedmq_tier_partitions_owned", "Partitions this worker holds the lease of", fleet,
                 len(parts))
    families = {
        "epoch": GaugeMetricFamily("fedmq_tier_partition_epoch", "Lease epoch this worker holds the partition at",
                                   labels=["fleet", "partition"]),
        "accepted": CounterMetricFamily("fedmq_updates_accepted", "Updates the partition folded into its partials",
                                        labels=["fleet", "partition"]),
        "partials": CounterMetricFamily("fedmq_tier_partials", "Partial aggregates the partition committed",
                                        labels=["fleet", "partition"]),
        "weight_capped": CounterMetricFamily("fedmq_tier_weight_capped", "Updates whose weight the cap of their "
                                             "partial lowered (since this worker took the partition)",
                                             labels=["fleet", "partition"]),
        "repeat_agent": CounterMetricFamily("fedmq_tier_repeat_agent", "Updates of an agent already in their partial, "
                                            "sharing its one weight (since this worker took the partition)",
                                            labels=["fleet", "partition"]),
    }
    rejected = CounterMetricFamily("fedmq_updates_rejected", "Device messages the partition refused, by reason",
                                   labels=["fleet", "partition", "reason"])
    for number, part in sorted(parts.items()):
        for key, family in families.items():
            family.add_metric([status["fleet"], number], part[key])
        for reason, count in part["rejected"].items():
            rejected.add_metric([status["fleet"], number, reason], count)
    yield from families.values()
    yield rejected
