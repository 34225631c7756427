"""The coordinator's retained status document: what it counted, as one line of JSON.

Published retained on ``<prefix>/<fleet>/coordinator/status`` so that
``mosquitto_sub -t fedmq/F/coordinator/status`` shows the fleet's state at a glance.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

# Every key of the document, in the order it is written.
FIELDS = (
    "fleet", "version", "published_version", "accepted", "rejected", "clipped", "pending",
    "staleness", "accuracy", "r2", "fleet_eval", "agents", "max_agents", "gaps", "buffer_timeouts",
    "checkpoint_failing", "checkpoints", "strategy", "started_at", "uptime_s", "updated_at",
)


def build_status(
    *,
    fleet: str,
    strategy: str,
    version: int,
    published_version: int,
    accepted: int,
    rejected: Mapping[str, int],
    clipped: int,
    pending: int,
    staleness_sum: float,
    staleness_max: int,
    is_classifier: bool,
    scores: Mapping[str, float],
    fleet_eval: Mapping[str, float],
    agents: int,
    max_agents: int | None = None,
    gaps: int = 0,
    buffer_timeouts: int = 0,
    checkpoint_failing: Mapping | None = None,
    checkpoints: Mapping[str, int] | None = None,
    started_at: float,
    now: float,
) -> dict:
    """The status document; `accuracy` (classifier) or `r2` (regressor) is None until scored.

    `staleness` is over accepted updates; `fleet_eval` is what the agents measured of the
    global model on their own data, the median over agents (see coordinator.evaluation).
    `max_agents` is the bound on `agents` (the replay state; more are refused as too_many_agents);
    `gaps` counts updates agents made that never arrived (coordinator.validation.SeqTracker);
    `checkpoint_failing` is null, or the error and since when while nothing can be made durable;
    `checkpoints` counts those written and the commits deferred (only refused payloads since the last).
    """
    return {
        "fleet": fleet,
        "version": version,
        "published_version": published_version,
        "accepted": accepted,
        "rejected": dict(sorted(rejected.items())),
        "clipped": clipped,
        "pending": pending,
        "staleness": {"mean": staleness_sum / accepted if accepted else 0.0, "max": staleness_max},
        **score_fields(is_classifier, scores),
        "fleet_eval": {k: _finite(v) for k, v in sorted(fleet_eval.items())},
        "agents": agents,
        "max_agents": max_agents,
        "gaps": gaps,
        "buffer_timeouts": buffer_timeouts,
        "checkpoint_failing": dict(checkpoint_failing) if checkpoint_failing else None,
        "checkpoints": {"written": (checkpoints or {}).get("written", 0), "deferred": (checkpoints or {}).get("deferred", 0)},
        "strategy": strategy,
        "started_at": started_at,
        "uptime_s": round(now - started_at, 3),
        "updated_at": now,
    }


def score_fields(is_classifier: bool, scores: Mapping[str, float]) -> dict:
    """The status's view of coordinator.evaluation.score: `accuracy` (classifier) or `r2` (regressor), None
    until scored, and a one-class model's `roc_auc` and `flagged` (the coordinator's and the tier root's)."""
    return {
        "accuracy": _finite(scores.get("accuracy")) if is_classifier else None,
        "r2": None if is_classifier else _finite(scores.get("r2")),
        **({"roc_auc": _finite(scores.get("roc_auc")), "flagged": _finite(scores.get("flagged"))}
           if "flagged" in scores else {}),
    }


def encode_status(status: dict) -> bytes:
    """Strict JSON (no NaN), one line, UTF-8."""
    return json.dumps(status, allow_nan=False).encode()


def _finite(value: float | None) -> float | None:
    """JSON has no NaN: an undefined score (r2 of a constant target) becomes null."""
    return value if value is None or math.isfinite(value) else None
