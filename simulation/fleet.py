"""A simulated fleet: N virtual agents (the real `edge_agent.Agent`, codec and MQTT client
each) and the real coordinator, through a real broker, on one machine.

Agents share one selector thread for their MQTT clients (`ClientLoop`) and a small
thread pool for training, so a thousand of them cost memory, not threads.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from coordinator.presence import Presence
from coordinator.server import Coordinator
from coordinator.session import CoordinatorSession
from coordinator.staleness import parse_staleness
from coordinator.statistics import FleetStatistics
from coordinator.strategies import DEFAULT_ALPHA, make_strategy
from coordinator.validation import NormBound, UpdateValidator
from edge_agent.agent import Agent, offline_status
from edge_agent.data import ArraySource
from edge_agent.trainer import LocalTrainer
from protocol.model_spec import ModelSpec
from protocol.pace import Steering
from protocol.topics import Topics
from protocol.transport import BrokerSettings, make_client
from simulation.client_loop import ClientLoop
from simulation.datasets import Dataset, skew_features
from simulation.partition import partition
from simulation.stragglers import first_sleep, parse_duty_cycle, slowdowns

log = logging.getLogger(__name__)


@dataclass
class SimConfig:
    """Everything one simulation run needs; the CLI flags map onto these fields."""

    dataset: str = "digits"
    agents: int = 20
    partition: str = "dirichlet:0.5"
    strategy: str = "fedasync"
    alpha: float = DEFAULT_ALPHA
    staleness: str = "polynomial:0.5"
    buffer_size: int = 5
    server_lr: float = 1.0
    aggregate: str = "mean"
    max_staleness: int = 1000
    max_update_norm: float | None = None
    codec: str = "int8"
    local_epochs: int = 1
    batch_size: int = 32
    hyperparameters: dict = field(default_factory=dict)
    duration: float = 30.0
    target: float | None = None
    stop_at_target: bool = False
    round_time: float = 0.05
    stragglers: float = 0.0
    straggler_factor: float = 10.0
    dropout: float = 0.0
    dropout_time: float = 5.0
    dropout_mode: str = "hold"  # hold: drop after a round, send it on return; lose: drop mid-round, work lost
    speed: str = "fixed"  # fixed or lognormal:SIGMA, each device's slowdown (simulation/stragglers.py)
    duty_cycle: str | None = None  # ON,OFF seconds awake and asleep, from a random phase
    network_delay: float = 0.0
    publish_interval: float = 0.5
    fleet: str = "sim"
    seed: int = 0
    train_workers: int = 2
    raw_units: bool = False  # bundled data in its own units, scaled only by the federated statistics
    feature_skew: float = 0.0  # each agent's own gain (10^+-skew) and offset (+-skew deviations) per feature
    target_updates_per_s: float = 0.0  # pace steering (protocol/pace.py): the coordinator's target; 0: not steered
    pace_min_interval: float = 1.0  # the coordinator's --pace-min-interval

    @property
    def feature_stats(self) -> bool:
        """The coordinator merges the agents' feature statistics (raw units or skewed sensors)."""
        return self.raw_units or self.feature_skew > 0


@dataclass
class Traffic:
    """Counters shared by all virtual agents (updated on the loop thread)."""

    bytes_up: int = 0
    bytes_down: int = 0
    updates_sent: int = 0
    models_received: int = 0
    connected: int = 0
    sleeps: int = 0  # duty-cycle sleeps begun
    lost_rounds: int = 0  # rounds lost to a mid-round dropout


def say_offline(loop: ClientLoop, agents: list, timeout: float = 5.0) -> None:
    """Every connected virtual agent of a steered fleet says offline (retained), bounded by `timeout`."""
    infos: list = []
    done = threading.Event()

    def publish() -> None:
        infos.extend(i for i in (va.say_offline() for va in agents) if i is not None)
        done.set()

    loop.call_soon(publish)
    deadline = time.monotonic() + timeout
    if done.wait(timeout):
        while time.monotonic() < deadline and not all(i.is_published() for i in infos):
            time.sleep(0.05)  # polling paho's publish infos that the loop thread completes


class VirtualAgent:
    """One simulated device: an `Agent` plus its own MQTT client and a behaviour profile."""

    def __init__(self, agent: Agent, settings: BrokerSettings, loop: ClientLoop, pool: ThreadPoolExecutor,
                 traffic: Traffic, *, slowdown: float, round_time: float, network_delay: float,
                 dropout: float, dropout_time: float, rng: np.random.Generator,
                 dropout_mode: str = "hold", duty: tuple[float, float] | None = None,
                 report_status: bool = False) -> None:
        self.agent = agent
        self.report_status = report_status  # publish the retained status on connecting (a steered fleet)
        self.loop = loop
        self.pool = pool
        self.traffic = traffic
        self.settings = settings
        self.slowdown = slowdown
        self.round_time = round_time
        self.network_delay = network_delay
        self.dropout = dropout
        self.dropout_time = dropout_time
        self.dropout_mode = dropout_mode
        self.duty = duty
        self.rng = rng
        self.busy = False
        self.offline = False
        self.asleep = False
        self.connected_once = False
        self.held: bytes | None = None
        topics = agent.topics
        # a steered fleet's agents say offline as real ones do: the last will when they vanish, and
        # `say_offline` on a clean stop (the coordinator counts the fleet by these statuses)
        will = (topics.agent_status(agent.agent_id), self._offline()) if report_status else None
        self.client = make_client(settings, f"fedmq-sim-{topics.fleet}-{agent.agent_id}", persistent=False, will=will)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_disconnect = self._on_disconnect
        loop.attach(self.client)

    def _offline(self) -> bytes:
        return json.dumps(offline_status(self.agent.agent_id)).encode()

    def say_offline(self):
        """A clean stop: the retained offline status (a DISCONNECT suppresses the will); its publish info,
        or None when not connected (loop thread)."""
        if not self.report_status or not self.client.is_connected():
            return None
        return self.client.publish(self.agent.topics.agent_status(self.agent.agent_id), self._offline(), qos=1,
                                   retain=True)

    def connect(self) -> None:
        """Open the connection (on the loop thread), or sleep first when the duty cycle says so."""
        if self.duty is not None:
            awake, change_in = first_sleep(self.rng, *self.duty)
            if not awake:
                self.asleep = self.offline = True
                self.loop.call_later(change_in, self._wake)
                return
            self.loop.call_later(change_in, self._sleep)
        self.connected_once = True
        self.client.connect(self.settings.host, self.settings.port, self.settings.keepalive)

    def _sleep(self) -> None:
        """Duty cycle: go offline for OFF seconds (a round under way is held for the return)."""
        self.asleep = self.offline = True
        self.traffic.sleeps += 1
        self.client.disconnect()
        self.loop.call_later(self.duty[1], self._wake)

    def _wake(self) -> None:
        self.asleep = False
        self.loop.call_later(self.duty[0], self._sleep)
        if not self.connected_once:
            self.connected_once, self.offline = True, False
            self.client.connect(self.settings.host, self.settings.port, self.settings.keepalive)
        else:
            self._reconnect()

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            log.error("%s refused: %s", self.agent.agent_id, reason_code)
            return
        self.traffic.connected += 1
        if self.report_status:  # the coordinator counts the fleet by these (coordinator/presence.py)
            client.publish(self.agent.topics.agent_status(self.agent.agent_id),
                           json.dumps(self.agent.status(), separators=(",", ":")), qos=1, retain=True)
        client.subscribe(self.agent.topics.model, qos=1)
        stats = self.agent.statistics_payload()  # retained: sent once, and again if the window grew
        if stats is not None:
            client.publish(self.agent.topics.stats(self.agent.agent_id), stats, qos=1, retain=True)
        if self.held is not None:  # the newest update made before dropping out
            payload, self.held = self.held, None
            self._publish(payload)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        self.traffic.connected -= 1
        if not self.offline:  # not a simulated dropout: come back like paho's loop would
            self.loop.call_later(1.0, self._reconnect)

    def _reconnect(self) -> None:
        if self.asleep:  # its wake-up reconnects
            return
        self.offline = False
        try:
            self.client.reconnect()
        except OSError:
            self.loop.call_later(2.0, self._reconnect)

    def _on_message(self, client, userdata, msg):
        self.traffic.bytes_down += len(msg.payload)
        self.traffic.models_received += 1
        if self.agent.on_model(msg.payload) or self.agent.trained_version_ < 0:  # or a cold start's first round
            self._maybe_train()

    def _maybe_train(self) -> None:
        if not self.busy and not self.offline:
            self.busy = True
            try:
                self.pool.submit(self._train)
            except RuntimeError:  # the run is over and its pool shut down: a model that came in meanwhile
                self.busy = False

    def _train(self) -> None:
        """On a worker thread: train, then hand the publish back to the loop after the simulated delay."""
        started = time.monotonic()
        payload = None
        try:
            if self.agent.due():
                payload = self.agent.make_update()
        except Exception:
            log.exception("agent %s failed to train", self.agent.agent_id)
        spent = time.monotonic() - started
        delay = max(0.0, self.round_time * self.slowdown - spent) + self.network_delay
        self.loop.call_later(delay, lambda: self._finish(payload))

    def _finish(self, payload: bytes | None) -> None:
        self.busy = False
        if payload is None:
            if self.agent.pace is not None and self.agent.next_round_at_ > time.monotonic():
                self._pause_models()  # the pace's wait (a cold start's first one): listen again when it is due
            return
        if self.asleep:  # fell asleep while training: sent on waking
            self.held = payload
            return
        if self.dropout and self.rng.random() < self.dropout:
            if self.dropout_mode == "lose":
                self.traffic.lost_rounds += 1
            else:
                self.held = payload
            self.offline = True
            self.client.disconnect()
            self.loop.call_later(self.dropout_time, self._reconnect)
            return
        self._publish(payload)
        if self.agent.pace is not None:  # steered: like AgentSession, one model download per round
            self._pause_models()
        elif self.agent.model_ and self.agent.model_.version > self.agent.trained_version_:
            self._maybe_train()  # a newer model arrived while we trained

    def _pause_models(self) -> None:
        """Under a pace: stop listening until the next round is due, then subscribe again; the broker
        sends the newest retained model, which starts that round (the agent's own pace gate decides)."""
        self.client.unsubscribe(self.agent.topics.model)
        self.loop.call_later(max(0.0, self.agent.next_round_at_ - time.monotonic()), self._resume_models)

    def _resume_models(self) -> None:
        if not self.offline:
            self.client.subscribe(self.agent.topics.model, qos=1)

    def _publish(self, payload: bytes) -> None:
        self.client.publish(self.agent.topics.update(self.agent.agent_id), payload, qos=1)
        self.traffic.bytes_up += len(payload)
        self.traffic.updates_sent += 1


class Simulation:
    """Sets up the coordinator and the virtual agents, runs them, collects the results."""

    def __init__(self, config: SimConfig, dataset: Dataset, settings: BrokerSettings) -> None:
        self.config = config
        self.dataset = dataset
        self.settings = settings
        self.topics = Topics(config.fleet)
        self.spec = ModelSpec(dataset.model, dataset.n_features, dataset.classes, dict(config.hyperparameters))
        self.traffic = Traffic()
        self.timeline: list[dict] = []  # one coordinator status per publish
        self._timeline_lock = threading.Lock()
        self.started_at = 0.0
        self.target_reached_at: float | None = None
        self.reached = threading.Event()

    def _on_publish(self, status: dict) -> None:
        score = status.get(self.dataset.metric)
        entry = {"t": time.monotonic() - self.started_at, "version": status["version"], "score": score,
                 "accepted": status["accepted"], "rejected": sum(status["rejected"].values()),
                 "staleness_mean": status["staleness"]["mean"]}
        with self._timeline_lock:
            self.timeline.append(entry)
        if self.config.target is not None and score is not None and score >= self.config.target and self.target_reached_at is None:
            self.target_reached_at = entry["t"]
            self.reached.set()

    def build_coordinator(self) -> Coordinator:
        c = self.config
        strategy = make_strategy(c.strategy, alpha=c.alpha, staleness=parse_staleness(c.staleness),
                                 buffer_size=c.buffer_size, server_lr=c.server_lr, aggregate=c.aggregate)
        validator = UpdateValidator(self.topics, self.spec.n_params, max_staleness=c.max_staleness,
                                    norm=NormBound(c.max_update_norm))
        steering = Steering(c.target_updates_per_s, c.pace_min_interval) if c.target_updates_per_s else None
        return Coordinator(self.topics, self.spec, strategy, validator, publish_interval=c.publish_interval,
                           eval_data=(self.dataset.X_test, self.dataset.y_test),
                           statistics=FleetStatistics(self.topics, self.spec.n_features) if c.feature_stats else None,
                           presence=Presence(self.topics) if steering else None, steering=steering)

    def build_agents(self, loop: ClientLoop, pool: ThreadPoolExecutor) -> list[VirtualAgent]:
        c = self.config
        rng = np.random.default_rng(c.seed)
        parts = partition(self.dataset.y_train, c.agents, c.partition, seed=c.seed)
        n_slow = int(round(c.stragglers * c.agents))
        slow = set(rng.choice(c.agents, size=n_slow, replace=False).tolist()) if n_slow else set()
        speeds = slowdowns(np.random.default_rng([c.seed, 1]), c.agents, c.speed)
        duty = parse_duty_cycle(c.duty_cycle)
        agents = []
        for i, rows in enumerate(parts):
            X = self.dataset.X_train[rows]
            if c.feature_skew > 0:  # this device's sensors have their own calibration
                X = skew_features(X, np.random.default_rng(c.seed * 104729 + i), c.feature_skew)
            labels = self.dataset.y_train[rows]  # a one-class fleet's devices never hold the fault label
            source = ArraySource(X, np.zeros_like(labels) if self.spec.is_one_class else labels)
            agent = Agent(f"agent-{i:04d}", self.topics, source,
                          LocalTrainer(c.local_epochs, c.batch_size, random_state=c.seed + i),
                          c.codec, seed=c.seed + i)
            agents.append(VirtualAgent(
                agent, self.settings, loop, pool, self.traffic,
                slowdown=speeds[i] * (c.straggler_factor if i in slow else 1.0), round_time=c.round_time,
                network_delay=c.network_delay, dropout=c.dropout, dropout_time=c.dropout_time,
                rng=np.random.default_rng(c.seed * 7919 + i), dropout_mode=c.dropout_mode, duty=duty,
                report_status=bool(c.target_updates_per_s),
            ))
        return agents

    def run(self, progress=None) -> dict:
        """Run for `duration` seconds (or until the target when `stop_at_target`); return results."""
        c = self.config
        core = self.build_coordinator()
        session = CoordinatorSession(core, self.settings, on_publish=self._on_publish)
        stop = threading.Event()
        loop = ClientLoop()
        pool = ThreadPoolExecutor(max_workers=c.train_workers, thread_name_prefix="train")
        agents = self.build_agents(loop, pool)
        self.started_at = time.monotonic()
        coordinator_thread = threading.Thread(target=session.run, args=(stop,), name="coordinator", daemon=True)
        coordinator_thread.start()
        loop.start()
        for va in agents:
            loop.call_soon(va.connect)
        deadline = self.started_at + c.duration
        try:
            while time.monotonic() < deadline:
                if c.stop_at_target and self.reached.is_set():
                    break
                self.reached.wait(min(0.25, max(0.0, deadline - time.monotonic())))
                if progress:
                    progress(self)
        finally:
            wall = time.monotonic() - self.started_at
            stop.set()
            coordinator_thread.join(30)
            say_offline(loop, agents)  # after the coordinator's last status: it reports the fleet it ran with
            stopped = loop.stop(30)  # thousands of clients: one pass of the loop can outlast a short wait
            pool.shutdown(wait=True, cancel_futures=True)
            if stopped:  # paho clients are not thread-safe: only once the loop no longer drives them
                for va in agents:
                    va.client.disconnect()
        status = core.status()
        return {
            "config": vars(c),
            "dataset": self.dataset.name,
            "n_params": self.spec.n_params,
            "final_score": status.get(self.dataset.metric),
            "metric": self.dataset.metric,
            "version": status["version"],
            "accepted": status["accepted"],
            "rejected": status["rejected"],
            "staleness": status["staleness"],
            "pace": status.get("pace"),
            "fleet_eval": status["fleet_eval"],
            "updates_sent": self.traffic.updates_sent,
            "models_received": self.traffic.models_received,
            "sleeps": self.traffic.sleeps,
            "lost_rounds": self.traffic.lost_rounds,
            "bytes_up": self.traffic.bytes_up,
            "bytes_down": self.traffic.bytes_down,
            "bytes_per_update": self.traffic.bytes_up / max(1, self.traffic.updates_sent),
            "wall_time_s": wall,
            "time_to_target_s": self.target_reached_at,
            "timeline": list(self.timeline),
        }
