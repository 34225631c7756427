"""Secure aggregation inside partitions: cohorts are formed within one partition, so the root only
ever sees cohort sums (docs/architecture.md, "Scale-out tier"; docs/security.md).

The root takes the coordinator's --secure-aggregation and --secagg-* flags (`root_config`) and writes
them into its checkpoint; each partition worker runs them there, never flags of its own. Per owned
partition (`PartitionRounds`) the coordinator's own round state machine (coordinator/secagg.py):

- key announcements (`secagg/key/<agent>`, retained) and agent statuses are fleet-wide topics (every
  agent reads its peers' keys); the worker reads them once and hands each to the partition of its agent
  (`tier.cluster.partition_of`, the server's hash), so a cohort is drawn from one partition's agents;
- shares, masked inputs and reveals are mapped by the cluster to `psecagg/<P>/<kind>/<agent>` and reach
  the partition's persistent session, acknowledged only once the state they moved is durable;
- cohorts, inboxes and unmask requests go out on the coordinator's topics, after the checkpoint that
  holds the round (a new owner restores the round and sends its stage's messages again);
- a completed round's decoded sum is the partition's partial (weight 1 per member, `round` set): the
  root folds it like any partial and never receives a single update. Clear updates are refused
  (`plaintext`).

Under central DP the agents clip to C (the cohort says it), the root adds the noise once per release
and accounts the members named by each partial; a partition takes an agent into a cohort only while
one more release stays within --dp-epsilon-budget (its count of the agent's cohorts is exact: an agent
always reaches the same partition).
"""

from __future__ import annotations

import collections
import logging

from coordinator.secagg import Result, SecAggRounds
from protocol import accounting
from protocol.topics import Topics
from tier.partial import PartialSum

log = logging.getLogger(__name__)


def root_config(args, n_params: int) -> dict | None:
    """The partitions' secure-aggregation settings from the root's flags (ValueError, one line, on a bad
    combination, as the coordinator refuses it); None without --secure-aggregation."""
    if not getattr(args, "secure_aggregation", False):
        return None
    if args.strategy != "fedbuff":
        raise ValueError("--secure-aggregation needs --strategy fedbuff")
    if args.dp_mode == "central" and args.dp_neighbours == "replace-one":
        raise ValueError("--secure-aggregation accounts central DP under add-remove only: drop --dp-neighbours replace-one")
    central = args.dp_mode == "central"
    config = {
        "k": args.buffer_size, "threshold": args.secagg_threshold or args.buffer_size // 2 + 1,
        "clip": args.secagg_clip, "clip_target": args.secagg_clip_target or None, "timeout": args.secagg_timeout,
        "grace": args.secagg_grace, "backoff": args.secagg_backoff,
        "l2_clip": args.dp_clip if central else None,
        "dp": {"noise": args.dp_noise, "delta": args.dp_delta, "epsilon_budget": args.dp_epsilon_budget} if central else None,
    }
    make_rounds(Topics("check"), n_params, config)  # refuses K, T, clips and timeouts the coordinator refuses
    return config


def make_rounds(topics: Topics, n_params: int, config: dict, eligible=None) -> SecAggRounds:
    """The coordinator's round state machine under the root's settings."""
    return SecAggRounds(topics, n_params, int(config["k"]), int(config["threshold"]), clip=float(config["clip"]),
                        timeout=float(config["timeout"]), grace=float(config["grace"]),
                        backoff=float(config["backoff"]), clip_target=config.get("clip_target"),
                        l2_clip=config.get("l2_clip"), eligible=eligible)


class CohortsOnly(PartialSum):
    """A partition's strategy under secure aggregation: every update in the clear is refused."""

    name = "partial+secagg"

    def admit(self, staleness: int) -> str | None:
        return "plaintext"


class PartitionRounds:
    """One partition's secure-aggregation rounds, the count of each agent's cohorts (the audit's seq of its
    contributions, and its DP budget) and the checkpointed state of both."""

    def __init__(self, topics: Topics, n_params: int, config: dict) -> None:
        self.config = config
        self.cohorts: collections.Counter[str] = collections.Counter()  # agent -> cohorts summed with its delta
        self.rounds = make_rounds(topics, n_params, config, eligible=self._eligible if config.get("dp") else None)

    @property
    def l2_clip(self) -> float | None:
        """Central DP's C, which every member clipped to (the partial says it); None without DP."""
        return self.config.get("l2_clip")

    def _eligible(self, agent: str) -> bool:
        dp = self.config["dp"]
        return dp.get("epsilon_budget") is None or accounting.epsilon(
            dp["noise"], self.cohorts[agent] + 1, dp["delta"]) <= dp["epsilon_budget"]

    def handle(self, topic: str, payload: bytes, *, retained: bool = False) -> str | None:
        """One message of the partition's agents (coordinator topics); None if used, else why not."""
        kind = self.rounds.topics.secagg_of(topic)
        if retained and kind is not None and kind[0] != "key":
            return "retained"  # only key announcements are retained by design
        return self.rounds.handle(topic, payload)

    def tick(self) -> Result | None:
        """Advance the round; a completed round's result, its members counted."""
        result = self.rounds.tick()
        if result is not None:
            self.cohorts.update(result.members)
        return result

    def covers(self, result: Result) -> list[tuple[str, int, int]]:
        """(agent, its n-th cohort in this partition, base version) of each member: what the audit records."""
        return [(agent, self.cohorts[agent], result.base_version) for agent in result.members]

    def signature(self) -> tuple:
        """Changes when the round state does (a checkpoint is due even with nothing to acknowledge)."""
        r, rounds = self.rounds.round, self.rounds
        return (r.id if r else None, r.stage if r else None, rounds.completed_, sum(rounds.aborted_.values()))

    def state(self) -> dict:
        return {"rounds": self.rounds.state(), "cohorts": dict(self.cohorts)}

    def restore(self, state: dict | None) -> None:
        state = state or {}
        self.cohorts = collections.Counter({str(k): int(v) for k, v in (state.get("cohorts") or {}).items()})
        self.rounds.restore(state.get("rounds"))
