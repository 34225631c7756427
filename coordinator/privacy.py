"""Differential privacy at the coordinator: central DP as a wrapper around fedbuff/fedavg, and
the fleet's epsilon (central or local) in the status.

Central DP (DP-FedAvg, McMahan et al. 2018, with a buffer of K as the round):

- every decoded update is held to L2 norm <= C by `PrivacyGate` (rejected as `dp_norm`,
  or clipped and counted as clipped), before the strategy sees it;
- an agent takes part in a buffer at most once (a second update into the same buffer is
  refused as `dp_repeat`), so one buffer moves by at most C when one agent is removed;
- `CentralDP` feeds the updates to the wrapped strategy with equal weights (a sample
  count is data too, and a sample-weighted mean has no fixed sensitivity) and adds
  N(0, (sigma C)^2 I) to the *sum* of the K buffered updates: the published step is
  server_lr * (sum + noise) / K. The model changes only through such noisy steps, so no
  noise-free model is ever published;
- each agent's epsilon is the RDP composition of one Gaussian event per buffer it was part
  of; with `epsilon_budget`, an update that would take its agent above the budget is
  refused (`dp_budget`). The agents' own eval metrics are dropped from the verdict, since
  the coordinator's status would publish them without noise.

Local DP: the agents clip and noise before sending (edge_agent); the coordinator cannot
check their noise, only count: `LocalDPLedger` counts accepted updates per agent and
reports the epsilon they imply at the fleet's configured sigma. An agent's own retained
status is the authoritative account of its spending.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from typing import Protocol

import numpy as np

from coordinator.server import Coordinator
from coordinator.strategies import FedBuff, Strategy
from coordinator.validation import UpdateValidator, Verdict
from protocol import accounting
from protocol.privacy import GaussianMechanism, clip, gaussian_noise, secure_rng

log = logging.getLogger(__name__)

DP_MODES = ("local", "central")
NORM_REASONS = ("dp_norm", "norm")  # rejections whose count says one update's norm (hidden under central DP)


class Policy(Protocol):
    """What the gate asks a DP mode about each update that passed the ordinary checks."""

    def screen(self, verdict: Verdict) -> Verdict:
        """The verdict to act on: the same, changed (clipped, metrics dropped) or a rejection."""

    def report(self) -> dict:
        """The fleet's privacy account for the status."""


class CentralDP(Strategy):
    """fedbuff/fedavg with Gaussian noise of std sigma C on the sum of each buffer of K clipped updates."""

    def __init__(
        self,
        inner: FedBuff,
        mechanism: GaussianMechanism,
        delta: float,
        *,
        epsilon_budget: float | None = None,
        norm_action: str = "reject",
        rng=None,
        neighbours: str = "add-remove",
    ) -> None:
        if not isinstance(inner, FedBuff):  # FedAvg is a FedBuff
            raise ValueError("central DP needs a buffer to noise: use --strategy fedbuff or fedavg, not "
                             f"{getattr(inner, 'name', inner)!r}")
        if inner.aggregate_name != "mean":
            raise ValueError(f"central DP adds noise to the sum of the buffer: --aggregate mean, not {inner.aggregate_name!r} "
                             "(a median or trimmed mean has no sensitivity the noise is calibrated to)")
        if norm_action not in ("reject", "clip"):
            raise ValueError(f"DP norm action must be reject or clip, got {norm_action!r}")
        accounting.epsilon(mechanism.noise_multiplier, 1, delta, neighbours)  # checks delta, relation and the install
        if epsilon_budget is not None and not epsilon_budget > 0:
            raise ValueError(f"--dp-epsilon-budget must be > 0, got {epsilon_budget}")
        self.inner = inner
        self.mechanism = mechanism
        self.delta = delta
        self.epsilon_budget = epsilon_budget
        self.norm_action = norm_action
        self.neighbours = neighbours
        self.rng = rng if rng is not None else secure_rng()
        self.name = f"{inner.name}+central-dp"
        self.contributions: Counter[str] = Counter()  # agent -> buffers released with its update
        self.releases = 0  # noisy steps taken
        self.clipped = 0
        self._members: list[str] = []  # agents in the current buffer, in order
        self._next_agent: str | None = None  # set by PrivacyGate.check for the update add() receives next

    @property
    def buffer_size(self) -> int:
        """K: updates per noisy step."""
        return self.inner.buffer_size

    @property
    def pending(self) -> int:
        return self.inner.pending

    @property
    def noise_per_update(self) -> float:
        """Std of the noise on each coordinate of the averaged step, per unit of C: sigma / K."""
        return self.mechanism.noise_multiplier / self.buffer_size

    def admit(self, staleness: int) -> str | None:
        return self.inner.admit(staleness)

    # --- the gate's questions ------------------------------------------------------------

    def screen(self, verdict: Verdict) -> Verdict:
        """Hold the update to norm C, one per agent per buffer and the budget; drop its metrics."""
        update = verdict.update
        agent = update.agent_id
        if agent in self._members:
            return Verdict("dp_repeat", update, staleness=verdict.staleness)
        if self.epsilon_budget is not None and accounting.epsilon(
            self.mechanism.noise_multiplier, self.contributions[agent] + 1, self.delta, self.neighbours
        ) > self.epsilon_budget:
            return Verdict("dp_budget", update, staleness=verdict.staleness)
        delta = verdict.delta
        norm = float(np.linalg.norm(delta))
        clipped = verdict.clipped
        if norm > self.mechanism.clip_norm:
            if self.norm_action == "reject":
                return Verdict("dp_norm", update, staleness=verdict.staleness)
            delta = delta * (self.mechanism.clip_norm / norm)
            clipped = True
            self.clipped += 1
        self._next_agent = agent
        # the agents' eval metrics would reach the public status without noise: drop them
        return Verdict(None, dataclasses.replace(update, metrics={}), delta, verdict.staleness, clipped, verdict.n_samples)

    # --- the strategy ----------------------------------------------------------------------

    def add(self, params, delta, n_samples, staleness, base=None, agent=None):
        agent, self._next_agent = self._next_agent, None
        if agent is None:
            raise RuntimeError("CentralDP.add without PrivacyGate.check: wire the strategy with guard()")
        delta = np.asarray(delta, dtype=np.float64)
        norm = float(np.linalg.norm(delta))
        if norm > self.mechanism.clip_norm:  # the gate clipped or refused it; a cheap second look
            delta = delta * (self.mechanism.clip_norm / norm)
        self._members.append(agent)
        # equal weights: the inner mean is then sum(w(s_i) delta_i) / K, each term of norm <= C
        return self._release(self.inner.add(params, delta, 1, staleness, base))

    def flush(self, params: np.ndarray) -> np.ndarray | None:
        """Step a buffer that cannot fill (the core's buffer timeout): the same noise on its smaller sum."""
        flush = getattr(self.inner, "flush", None)
        return None if flush is None or not self._members else self._release(flush(params))

    def _release(self, new: np.ndarray | None) -> np.ndarray | None:
        """The noisy release of a step the inner mean made of the buffer's updates (None: no step)."""
        if new is None:
            return None
        members, self._members = self._members, []
        return self.release(new, members)

    def release(self, new: np.ndarray, members: list[str]) -> np.ndarray:
        """Add N(0, (sigma C)^2) / k to a step the mean of k updates made, one of each of `members`;
        count them in the account. Public for the scale-out tier's root, whose buffer is partial sums."""
        k = len(members)
        noise = gaussian_noise(np.shape(new), self.mechanism.std, self.rng)
        new = new + self.inner.server_lr * noise / k
        self.contributions.update(members)
        self.releases += 1
        log.debug("noisy step %d: %d updates, noise std %.4g on the sum", self.releases, k, self.mechanism.std)
        return new

    def state(self) -> dict:
        """The inner buffer, which agents are in it, and the account so far (so a restart
        does not forget what each agent already spent)."""
        return dict(self.inner.state(), agents=list(self._members), contributions=dict(self.contributions),
                    releases=self.releases)

    def restore(self, state: dict) -> None:
        """Take back a buffer and the account; agents the checkpoint did not name count under one placeholder."""
        # re-clipped: a buffer re-expressed for a new feature scaling can grow past C (issue 19.3)
        deltas = [clip(d, self.mechanism.clip_norm)[0] for d in state.get("deltas", [])]
        self.inner.restore(dict(state, deltas=deltas))
        agents = list(state.get("agents") or [])
        self._members = (agents + ["(restored)"] * self.pending)[: self.pending]
        self.contributions = Counter({str(k): int(v) for k, v in (state.get("contributions") or {}).items()})
        self.releases = int(state.get("releases", 0))

    def report(self) -> dict:
        """The fleet's account: epsilon of the worst-off agent over the released buffers."""
        report = accounting.fleet_report(self.contributions, self.mechanism.noise_multiplier, self.delta,
                                         "central", self.mechanism.clip_norm, self.releases, self.neighbours)
        report.update(buffer_size=self.buffer_size, epsilon_budget=self.epsilon_budget,
                      noise_std_per_update=round(self.noise_per_update * self.mechanism.clip_norm, 9))
        return report


class LocalDPLedger:
    """Local DP at the coordinator: count each agent's accepted updates, report the epsilon they imply."""

    def __init__(self, mechanism: GaussianMechanism, delta: float, neighbours: str = "add-remove") -> None:
        accounting.epsilon(mechanism.noise_multiplier, 1, delta, neighbours)  # checks delta, relation and the install
        self.mechanism = mechanism
        self.delta = delta
        self.neighbours = neighbours
        self.contributions: Counter[str] = Counter()

    def screen(self, verdict: Verdict) -> Verdict:
        """Count the update for its agent (as sent: the agent spent its budget on it either way)."""
        self.contributions[verdict.update.agent_id] += 1
        return verdict

    def state(self) -> dict:
        """The counts for the checkpoint (a restarted coordinator continues the fleet's epsilon)."""
        return {"contributions": dict(self.contributions)}

    def restore(self, state: dict | None) -> None:
        """Take back `state()`."""
        self.contributions = Counter({str(k): int(v) for k, v in ((state or {}).get("contributions") or {}).items()})

    def report(self) -> dict:
        """The epsilon the counted updates imply at the fleet's sigma; the agents' statuses are authoritative."""
        report = accounting.fleet_report(self.contributions, self.mechanism.noise_multiplier, self.delta,
                                         "local", self.mechanism.clip_norm, neighbours=self.neighbours)
        report["source"] = "updates received x the fleet's --dp-noise"
        return report


class PrivacyGate:
    """An UpdateValidator with the DP mode's screen after the ordinary checks."""

    def __init__(self, inner: UpdateValidator, policy: Policy) -> None:
        self.inner = inner
        self.policy = policy

    def __getattr__(self, name: str):
        """Everything else (highest_seq, norm, gaps_, ...) is the wrapped validator's."""
        if name in ("inner", "policy"):
            raise AttributeError(name)
        return getattr(self.inner, name)

    def restore(self, *args, **kwargs) -> None:
        """Take over a checkpoint's sequence state."""
        self.inner.restore(*args, **kwargs)

    def check(self, topic: str, payload: bytes, version: int, admit=None, distance=None) -> Verdict:
        """The wrapped validator's verdict, then the DP screen on an accepted one."""
        verdict = self.inner.check(topic, payload, version, admit, distance)
        if verdict.reason is not None:
            return verdict
        try:
            return self.policy.screen(verdict)
        except Exception:  # a bug of ours must not take the coordinator down, nor let an update through
            log.exception("unexpected error in the DP screen on %s", topic)
            return Verdict("internal", verdict.update, staleness=verdict.staleness)


class PrivateCoordinator(Coordinator):
    """The coordinator core with a DP mode: its status carries the fleet's privacy account."""

    def __init__(self, *args, privacy: Policy, **kwargs) -> None:
        self.privacy = privacy
        super().__init__(*args, **kwargs)

    def state(self) -> dict:
        """The core's checkpoint with the local ledger (the central one is in the strategy's buffer state)."""
        state = super().state()
        if isinstance(self.privacy, LocalDPLedger):
            state["local_dp_ledger"] = self.privacy.state()
        return state

    def _restore(self, state: dict) -> None:
        super()._restore(state)
        if isinstance(self.privacy, LocalDPLedger):
            self.privacy.restore(state.get("local_dp_ledger"))

    def status(self, now: float | None = None) -> dict:
        """The ordinary status with `privacy`: epsilon of the worst-off agent at delta, and how it was counted.

        Under central DP the clip bits are not published: `clipped` is null and `rejected` has no
        `dp_norm` or `norm`, since each moves by exactly one on one agent's over-C update (un-noised).
        """
        status = super().status(now)
        if isinstance(self.privacy, CentralDP):
            status["clipped"] = None
            status["rejected"] = {k: v for k, v in status["rejected"].items() if k not in NORM_REASONS}
        try:
            status["privacy"] = self.privacy.report()
        except Exception:  # the status must still go out; say the account is unavailable
            log.exception("cannot compute the fleet's privacy account")
            status["privacy"] = {"error": "unavailable"}
        return status


def make_policy(
    mode: str, strategy: Strategy, mechanism: GaussianMechanism, delta: float, *,
    epsilon_budget: float | None = None, norm_action: str = "reject", neighbours: str | None = None,
) -> tuple[Strategy, Policy]:
    """(the strategy to run, the DP policy) for `mode` local or central; ValueError on a bad combination.

    `neighbours` defaults to the mode's: add-remove for central, replace-one for local (`default_neighbours`)."""
    neighbours = neighbours or default_neighbours(mode)
    if mode == "central":
        central = CentralDP(strategy, mechanism, delta, epsilon_budget=epsilon_budget, norm_action=norm_action,
                            neighbours=neighbours)
        return central, central
    if mode == "local":
        if epsilon_budget is not None:
            raise ValueError("under local DP each agent keeps its own budget: give --dp-epsilon-budget to the agents")
        return strategy, LocalDPLedger(mechanism, delta, neighbours)
    raise ValueError(f"unknown DP mode {mode!r}: use {' or '.join(DP_MODES)}")


def default_neighbours(mode: str) -> str:
    """Local DP: replace-one (a device's updates are seen by the broker, so its participation is public);
    central DP: add-remove (DP-FedAvg's relation; the model readers do not see who took part)."""
    return "replace-one" if mode == "local" else "add-remove"


def guard(validator: UpdateValidator, policy: Policy) -> PrivacyGate:
    """The validator the DP core must use (updates reach the strategy only through the screen)."""
    return PrivacyGate(validator, policy)
