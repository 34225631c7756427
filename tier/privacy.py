"""Central DP in the scale-out tier: the coordinator's CentralDP split between the partitions and the root.

- In each partition (`PartitionDP`), CentralDP's screen: every update is held to L2 norm <= C
  (clipped or refused as `dp_norm`, --dp-norm-action), an agent is in one partial at most once
  (the worker holds a second update for the next partial, so `dp_repeat` is only a safeguard), an update that would take its agent above --dp-epsilon-budget is refused
  (`dp_budget`: an agent always reaches the same partition, so the partition's count of its
  updates is exact), and every update has weight 1 in the partial (a sample count is data too).
- At the root (`RootDP`), a partial naming an agent already in the current buffer is handed back
  (nak) until the buffer is released, so one agent enters a release at most once, as the
  accounting assumes; each step of the buffer is released through `CentralDP.release`, the
  coordinator's own noise and ledger, once per release; the root's status carries the fleet's
  epsilon (`CentralDP.report`) and its checkpoint the ledger, so it survives a failover.

The workers take the DP settings from the root's checkpoint (`config`), never from flags of
their own, and follow it when it changes; every partial says the clip it was made under, and a
root drops one made without DP or under a larger clip than its own (its updates could exceed C).
"""

from __future__ import annotations

import collections
import logging

import numpy as np

from coordinator.cli import make_dp
from coordinator.privacy import CentralDP
from coordinator.strategies import FedBuff, make_strategy
from protocol.privacy import GaussianMechanism
from tier.partial import PartialSum

log = logging.getLogger(__name__)


def dp_config(central: CentralDP) -> dict:
    """The settings a partition needs to screen as the root's CentralDP would (written in the root's checkpoint)."""
    return {"mode": "central", "clip": central.mechanism.clip_norm, "noise": central.mechanism.noise_multiplier,
            "delta": central.delta, "epsilon_budget": central.epsilon_budget, "norm_action": central.norm_action,
            "neighbours": central.neighbours}


def dp_changed(held: dict | None, root: dict | None) -> bool:
    """The root's DP settings differ from those a worker's partitions run under."""
    return (held or None) != (root or None)


class PartitionDP(CentralDP):
    """CentralDP's screen and per-agent count for one partition; the sum goes to a PartialSum at weight 1
    per update and the buffer is one partial (so `dp_repeat` means twice in one partial)."""

    def __init__(self, partial: PartialSum, config: dict) -> None:
        super().__init__(FedBuff(buffer_size=1), GaussianMechanism(config["clip"], config["noise"]), config["delta"],
                         epsilon_budget=config.get("epsilon_budget"), norm_action=config.get("norm_action", "clip"),
                         neighbours=config.get("neighbours") or "add-remove")
        self.inner = partial  # CentralDP.add hands it (params, C-clipped delta, 1, staleness); it never steps

    @property
    def buffer_size(self) -> int:
        return 1

    @property
    def members(self) -> list[str]:
        """Agents in the partial being built."""
        return self._members

    def take(self) -> tuple[np.ndarray, float, int, np.ndarray]:
        """The partial's sums; its agents' updates now count against their budget."""
        self.contributions.update(self._members)
        self._members = []
        return self.inner.take()

    def state(self) -> dict:
        """Per-agent counts for the partition's checkpoint (taken partials only: a new owner redoes the rest)."""
        return {"contributions": dict(self.contributions)}

    def restore(self, state: dict | None) -> None:
        self.contributions = collections.Counter(
            {str(k): int(v) for k, v in ((state or {}).get("contributions") or {}).items()})


class RootDP:
    """The root's half: one agent at most once per buffer, CentralDP's noise once per release, the ledger."""

    def __init__(self, central: CentralDP) -> None:
        self.central = central
        self.members: list[str] = []  # agents in the root's current buffer

    @property
    def clip(self) -> float:
        return self.central.mechanism.clip_norm

    def config(self) -> dict:
        return dp_config(self.central)

    def verdict(self, agents: list[str], clip: float | None) -> str | None:
        """None if a partial covering `agents`, made under `clip`, may join the buffer now; else
        'later' (an agent already in the buffer: after the release) or 'rejected' (never foldable)."""
        if clip is None or clip > self.clip:  # made before the DP settings changed: its updates exceed C
            log.error("a partial made under clip %s, the root's is %s: dropped, its updates lost", clip, self.clip)
            return "rejected"
        if len(set(agents)) != len(agents):
            log.error("a partial names one agent twice under central DP: dropped")
            return "rejected"
        return "later" if not set(agents).isdisjoint(self.members) else None

    def add(self, agents: list[str]) -> None:
        self.members.extend(agents)

    def release(self, new: np.ndarray) -> np.ndarray:
        """The noisy step of the buffer's mean (CentralDP.release: noise once, its agents counted)."""
        members, self.members = self.members, []
        return self.central.release(new, members)

    def state(self) -> dict:
        return {"members": list(self.members), "contributions": dict(self.central.contributions),
                "releases": self.central.releases}

    def restore(self, state: dict | None) -> None:
        state = state or {}
        self.members = [str(a) for a in state.get("members", [])]
        self.central.contributions = collections.Counter(
            {str(k): int(v) for k, v in (state.get("contributions") or {}).items()})
        self.central.releases = int(state.get("releases", 0))

    def report(self) -> dict:
        """The fleet's epsilon at delta over the released buffers, as the coordinator reports it."""
        return self.central.report()


def root_dp(args) -> RootDP | None:
    """The root's central DP from the coordinator's --dp-* flags, refused in the same combinations
    (ValueError, one line); None without --dp-mode."""
    strategy = make_strategy(args.strategy, alpha=args.alpha, buffer_size=args.buffer_size, server_lr=args.server_lr)
    _, policy = make_dp(args, strategy)
    if args.dp_noise_by is not None:
        raise ValueError("--dp-noise-by needs --secure-aggregation and --dp-mode central")
    if policy is None:
        return None
    if not isinstance(policy, CentralDP):
        raise ValueError("the tier has --dp-mode central only (local DP's ledger is the single coordinator's)")
    return RootDP(policy)
