"""The drain controller's world in memory: every port of the core, and a small simulation of
what is behind them, with no moto, no HTTP and no thread.

:class:`MemoryStore` is the drain store in a dict (conditional writes on the version, as
DynamoDB's). :class:`World` adds what a drain talks to and what it must protect:

- instances of one Auto Scaling group (a warm pool if asked), each a container instance of the
  cluster (or not), ACTIVE or DRAINING, running until something takes it down: a completed or
  expired lifecycle action (terminated, or stopped into the warm pool), the spot deadline, a
  scheduled change's start, a stop from outside the group;
- tasks on them (agents of a service, a daemon) and the coordinator's agents in them, with their
  jobs. An agent does what ``fleetdrain-agent`` does: paused, it takes no job; told to stop
  (SIGTERM, or the coordinator's stop) it finishes its job and exits; stopped with ``force``, or
  at its own deadline after SIGTERM, it cancels the job and reports it (``agent_stop``);
- lifecycle actions (waiting until completed or until the heartbeat timeout), the drain's
  delayed ticks, and the events AWS sends (task STOPPED), delivered at least once;
- crashes: :meth:`World.crash` makes the next invocation die after ``n`` more port calls (it
  writes nothing more, and its lease stays until it expires), and the event is delivered again.

Time is the world's clock (:meth:`World.advance`, one second a tick). What must never happen is
written down as it happens, in :attr:`World.violations`: a hook completed while a job still runs
on the instance, a job lost (its instance went down under it), a job cancelled although its
instance is not going, a lifecycle action that timed out although the controller had its
token, a drain that moved backwards, a token left unanswered by a drain that ended.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from fleetdrain.controller.drain.config import Settings
from fleetdrain.controller.drain.core import DrainController, Result
from fleetdrain.controller.drain.errors import Conflict, LifecycleGone, Retryable
from fleetdrain.controller.drain.merge import SPOT_NOTICE_SECONDS
from fleetdrain.controller.drain.ports import (
    AgentView,
    ContainerInstance,
    DrainRecord,
    TaskInfo,
    Tick,
)
from fleetdrain.controller.drain.signals import (
    LifecycleSignal,
    MaintenanceSignal,
    RebalanceSignal,
    Signal,
    SpotSignal,
    StoppingSignal,
    TaskStoppedSignal,
    TickSignal,
)

T0 = 1_770_000_000.0
CLUSTER = "ci"
CLUSTER_ARN = f"arn:aws:ecs:us-east-1:123456789012:cluster/{CLUSTER}"
ASG = "ci-agents"
HOOK = "fleetdrain-terminating"
#: The agent task's ``stopTimeout``; the agent cancels and reports its job this long after
#: SIGTERM (120 - 10 cancel grace - 5 margin), before ECS's SIGKILL.
STOP_TIMEOUT = 120.0
AGENT_OWN_FORCE = 105.0
#: A completed (or expired) lifecycle action: the instance is down this much later.
TERMINATE_AFTER = 5.0
#: An instance stopped from outside the group is down this long after the state change.
STOP_AFTER = 30.0
#: An invocation that failed (retryable, or died) is delivered again this much later.
RETRY_AFTER = 5.0


def at(t: float) -> datetime:
    return datetime.fromtimestamp(t, UTC)


def settings(**overrides: Any) -> Settings:
    """The settings the world's controller runs with: the production ones, with a short budget
    and a lease as long as a short function timeout (a dead step's lease must expire before a
    spot deadline for a retry to make it; in Lambda it is the 60 s timeout)."""
    values: dict[str, Any] = {
        "cluster": CLUSTER,
        "asg_name": ASG,
        "hook_name": HOOK,
        "drain_budget": 600.0,
        "spot_margin": 20.0,
        "maintenance_margin": 60.0,
        "heartbeat_interval": 60.0,
        "tick_interval": 20.0,
        "step_lease": 5.0,
    }
    return Settings(**(values | overrides))


# ---------------------------------------------------------------------------- the store


class MemoryStore:
    """``DrainStorePort`` in a dict: writes conditional on the version, as DynamoDB's."""

    def __init__(self) -> None:
        self.records: dict[str, DrainRecord] = {}
        self.links: dict[str, str] = {}

    def get(self, instance_id: str) -> DrainRecord | None:
        rec = self.records.get(instance_id)
        return copy.deepcopy(rec) if rec else None

    def create(self, record: DrainRecord, link: str | None = None) -> DrainRecord:
        if record.instance_id in self.records:
            raise Conflict("PutItem")
        saved = dataclasses.replace(copy.deepcopy(record), version=1)
        self.records[record.instance_id] = copy.deepcopy(saved)
        if link is not None:
            self.links[link] = record.instance_id
        return saved

    def save(
        self, record: DrainRecord, link: str | None = None, expect_tick: str | None = None
    ) -> DrainRecord:
        current = self.records.get(record.instance_id)
        if current is None or current.version != record.version:
            raise Conflict("PutItem")
        if expect_tick is not None and current.tick_id != expect_tick:
            raise Conflict("PutItem")
        saved = dataclasses.replace(copy.deepcopy(record), version=record.version + 1)
        self.records[record.instance_id] = copy.deepcopy(saved)
        if link is not None:
            self.links[link] = record.instance_id
        return saved

    def claim(
        self, instance_id: str, lease_id: str, lease_until: float, now: float
    ) -> tuple[DrainRecord | None, bool]:
        current = self.records.get(instance_id)
        if current is None or current.phase == "done" or current.leased(now):
            return copy.deepcopy(current), False
        saved = dataclasses.replace(
            copy.deepcopy(current),
            version=current.version + 1,
            lease_id=lease_id,
            lease_until=lease_until,
        )
        self.records[instance_id] = copy.deepcopy(saved)
        return saved, True

    def instance_for(self, container_instance_arn: str) -> str | None:
        return self.links.get(container_instance_arn)

    def learn_link(self, container_instance_arn: str, instance_id: str) -> None:
        """Nothing to keep: this store's reads are free."""

    def in_flight(self) -> list[DrainRecord]:
        return [r for r in self.records.values() if r.phase != "done"]


# ---------------------------------------------------------------------------- the world


class Died(Exception):
    """The invocation died between two calls (a crash): it does nothing more."""


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class Job:
    id: str
    agent: str
    instance: str
    started: float
    ends_at: float
    state: str = "running"  # running | passed | reported | lost
    why: str = ""


@dataclass
class Task:
    arn: str
    instance: str
    group: str
    daemon: bool = False
    agent: str | None = None
    desired: str = "RUNNING"
    status: str = "RUNNING"
    sigterm_at: float | None = None


@dataclass
class Agent:
    id: str
    task: str
    paused: bool = False
    stop_requested: bool = False
    forced: bool = False
    connected: bool = True
    job: str | None = None


@dataclass
class Instance:
    id: str
    ci_arn: str
    registered: bool = True
    status: str = "ACTIVE"  # the container instance's
    state: str = "running"  # running | stopping | stopped | terminated
    warm_pool: bool = False
    #: When it goes down (and why), once something takes it down.
    down_at: float | None = None
    down_as: str = ""  # terminated | stopped
    #: The notices it got: when the controller may (must) force its work.
    force_ok_at: float | None = None


@dataclass
class Action:
    token: str
    instance: str
    started: float
    last_beat: float
    timeout: float
    state: str = "waiting"  # waiting | completed | expired | abandoned
    #: The controller took the token (a handle() with it returned).
    delivered: bool = False
    completions: int = 0


@dataclass
class Pending:
    due: float
    seq: int
    signal: Signal
    attempts: int = 0


class World:
    """Instances, tasks, agents, jobs, lifecycle actions, events and time, around one
    :class:`~fleetdrain.controller.drain.core.DrainController` on in-memory ports."""

    def __init__(
        self,
        instances: int = 2,
        *,
        hook_timeout: float = 300.0,
        in_cluster: Iterable[bool] | None = None,
        **setting_overrides: Any,
    ) -> None:
        self.clock = Clock()
        self.settings = settings(**setting_overrides)
        self.store = MemoryStore()
        self.hook_timeout = hook_timeout
        self.instances: dict[str, Instance] = {}
        self.tasks: dict[str, Task] = {}
        self.agents: dict[str, Agent] = {}
        self.jobs: dict[str, Job] = {}
        self.actions: dict[str, Action] = {}
        self.queue: list[Pending] = []
        self.results: list[tuple[Signal, Result]] = []
        self.violations: list[str] = []
        self.calls: Counter[str] = Counter()
        self.fuse: int | None = None
        self._armed: int | None = None
        self._ids = itertools.count(1)
        self._seq = itertools.count()
        #: Per instance: (episode, drain_id, phase rank, forced_at, force_at) last seen.
        self._seen: dict[str, tuple[int, str, int, float | None, float | None]] = {}
        members = list(in_cluster) if in_cluster is not None else [True] * instances
        for n, member in enumerate(members):
            iid = f"i-{n:04d}"
            self.instances[iid] = Instance(
                iid, f"arn:aws:ecs:us-east-1:123456789012:container-instance/ci/{n}", member
            )
            if member:
                self._add_task(iid, "service:log-router", daemon=True)
        self.ctl = DrainController(
            self.settings,
            _Port(self, "store", self.store),  # type: ignore[arg-type]
            _Port(self, "ecs", _Ecs(self)),  # type: ignore[arg-type]
            _Port(self, "coordinator", _Coordinator(self)),  # type: ignore[arg-type]
            _Port(self, "lifecycle", _Lifecycle(self)),  # type: ignore[arg-type]
            _Port(self, "ticks", _Ticks(self)),  # type: ignore[arg-type]
            clock=self.clock,
            sleep=lambda seconds: None,
            lease_wait=0.0,
        )

    @property
    def now(self) -> float:
        return self.clock.now

    def _id(self, prefix: str) -> str:
        return f"{prefix}-{next(self._ids)}"

    # ------------------------------------------------------------------ building

    def _add_task(self, iid: str, group: str, daemon: bool = False) -> Task:
        task = Task(f"arn:aws:ecs:us-east-1:123456789012:task/ci/{self._id('t')}", iid, group)
        task.daemon = daemon
        self.tasks[task.arn] = task
        return task

    def can_place(self, iid: str) -> bool:
        inst = self.instances[iid]
        return inst.registered and inst.state == "running" and inst.status == "ACTIVE"

    def place(self, iid: str) -> Agent:
        """The service places an agent task on ``iid`` (it must be able to: ACTIVE, running)."""
        assert self.can_place(iid), f"{iid} takes no task"
        task = self._add_task(iid, "service:ci-agents")
        agent = Agent(self._id("agent"), task.arn)
        task.agent = agent.id
        self.agents[agent.id] = agent
        return agent

    def can_start(self, agent: Agent) -> bool:
        task = self.tasks[agent.task]
        return (
            agent.connected
            and not agent.paused
            and not agent.stop_requested
            and agent.job is None
            and task.status == "RUNNING"
            and task.sigterm_at is None
            and self.instances[task.instance].state == "running"
        )

    def start_job(self, agent: Agent, seconds: float) -> Job:
        """The coordinator gives ``agent`` a job that runs ``seconds``."""
        assert self.can_start(agent), f"{agent.id} takes no job"
        job = Job(self._id("job"), agent.id, self.tasks[agent.task].instance, self.now, 0.0)
        job.ends_at = self.now + seconds
        self.jobs[job.id] = job
        agent.job = job.id
        return job

    def busy_agent(self, iid: str, seconds: float) -> tuple[Agent, Job]:
        agent = self.place(iid)
        return agent, self.start_job(agent, seconds)

    # ------------------------------------------------------------------ what AWS sends

    def scale_in(self, iid: str, *, warm_pool: bool = False, sent: float | None = None) -> Signal:
        """The group scales ``iid`` in: a lifecycle action waits; its event (not delivered)."""
        inst = self.instances[iid]
        inst.warm_pool = warm_pool
        token = self._id("tok")
        self.actions[token] = Action(token, iid, self.now, self.now, self.hook_timeout)
        when = self.now if sent is None else sent
        return LifecycleSignal(iid, ASG, HOOK, token, at(when), self._id("e-lifecycle"))

    def stale_token(self, iid: str, token: str | None = None) -> Signal:
        """A lifecycle event with a token that is not live: an old one of ``iid`` (replayed,
        redelivered late) or one AWS never issued."""
        return LifecycleSignal(
            iid, ASG, HOOK, token or self._id("tok-stale"), at(self.now), self._id("e-replay")
        )

    def spot(self, iid: str) -> Signal:
        inst = self.instances[iid]
        self._going(inst, self.now + SPOT_NOTICE_SECONDS, "terminated", self.settings.spot_margin)
        return SpotSignal(iid, at(self.now), "terminate", self._id("e-spot"))

    def rebalance(self, iid: str) -> Signal:
        return RebalanceSignal(iid, at(self.now), self._id("e-rebalance"))

    def maintenance(self, iid: str, start_in: float) -> Signal:
        inst = self.instances[iid]
        self._going(inst, self.now + start_in, "stopped", self.settings.maintenance_margin)
        code = "AWS_EC2_INSTANCE_STOP_SCHEDULED"
        return MaintenanceSignal(iid, at(self.now + start_in), code, self._id("arn:health"))

    def stop(self, iid: str, state: str = "stopping") -> Signal:
        """Someone stops (``stopping``) or terminates (``shutting-down``) ``iid`` outside the
        group."""
        inst = self.instances[iid]
        down_as = "stopped" if state == "stopping" else "terminated"
        self._going(inst, self.now + STOP_AFTER, down_as, STOP_AFTER)
        if inst.state == "running":
            inst.state = "stopping"
        return self._state_change(iid, state)

    def _state_change(self, iid: str, state: str) -> Signal:
        return StoppingSignal(iid, state, at(self.now), self._id(f"e-{state}"))

    def _going(self, inst: Instance, down_at: float, down_as: str, margin: float) -> None:
        if inst.down_at is None or down_at < inst.down_at:
            inst.down_at, inst.down_as = down_at, down_as
        ok = down_at - margin
        inst.force_ok_at = ok if inst.force_ok_at is None else min(inst.force_ok_at, ok)

    def reuse(self, iid: str) -> None:
        """The warm pool puts the stopped ``iid`` back in service: running, ACTIVE again (its
        agent re-registers the container instance), nothing on it."""
        inst = self.instances[iid]
        assert inst.state == "stopped" and inst.registered
        inst.state, inst.status = "running", "ACTIVE"
        inst.down_at, inst.down_as, inst.force_ok_at = None, "", None

    # ------------------------------------------------------------------ delivering

    def send(self, signal: Signal, delay: float = 0.0) -> None:
        """Queue ``signal`` for delivery ``delay`` seconds from now (at least once)."""
        self.queue.append(Pending(self.now + delay, next(self._seq), signal))

    def deliver(self, signal: Signal) -> Result | None:
        """Hand ``signal`` to the controller now (and whatever is due after it); its result,
        or None if the invocation failed (it is then delivered again later)."""
        result = self._invoke(Pending(self.now, next(self._seq), signal))
        self.pump()
        return result

    def deliver_batch(self, signals: Sequence[Signal]) -> None:
        """Hand ``signals`` to the controller in one invocation (an SQS batch: the new drains
        among them take their first steps together); each that failed comes back on its own
        later, and all of them if the invocation died (then SQS redelivers the whole batch)."""
        pendings = [Pending(self.now, next(self._seq), s) for s in signals]
        self.fuse, self._armed = self._armed, None
        try:
            results: list[Result | Exception] = self.ctl.handle_batch(list(signals))
        except Died as exc:
            results = [exc] * len(signals)
        finally:
            self.fuse = None
            self.observe()
        died = any(isinstance(r, Died) for r in results)
        for pending, result in zip(pendings, results, strict=True):
            if died or isinstance(result, Retryable):
                self._again(pending)
                continue
            if isinstance(result, Exception):
                raise result
            self._answered(pending, result)
        self.observe()
        self.pump()

    def crash(self, after_calls: int) -> None:
        """The next invocation dies after ``after_calls`` more port calls."""
        self._armed = after_calls

    def pump(self) -> None:
        """Deliver everything due now."""
        while True:
            due = sorted((p for p in self.queue if p.due <= self.now), key=lambda p: (p.due, p.seq))
            if not due:
                return
            pending = due[0]
            self.queue.remove(pending)
            self._invoke(pending)

    def _invoke(self, pending: Pending) -> Result | None:
        self.fuse, self._armed = self._armed, None
        try:
            result = self.ctl.handle(pending.signal)
        except (Died, Retryable):
            self._again(pending)
            return None
        finally:
            self.fuse = None
            self.observe()
        if self._answered(pending, result):
            self.observe()
        return result

    def _again(self, pending: Pending) -> None:
        """The invocation failed: ``pending`` is delivered again later."""
        pending.attempts += 1
        pending.due = self.now + RETRY_AFTER
        self.queue.append(pending)

    def _answered(self, pending: Pending, result: Result) -> bool:
        """Note what the controller answered; True when that delivered a lifecycle action."""
        self.results.append((pending.signal, result))
        if isinstance(pending.signal, LifecycleSignal):
            action = self.actions.get(pending.signal.token)
            if action is not None:
                action.delivered = True
                return True
        return False

    def _call(self, port: str, name: str) -> None:
        self.calls[f"{port}.{name}"] += 1
        if self.fuse is not None:
            if self.fuse <= 0:
                raise Died(f"{port}.{name}")
            self.fuse -= 1

    # ------------------------------------------------------------------ time

    def advance(self, seconds: float) -> None:
        """Let ``seconds`` pass, one at a time: agents and jobs move, instances go down when
        they must, lifecycle actions time out, ticks and events are delivered."""
        self.pump()
        for _ in range(int(seconds)):
            self.clock.now += 1.0
            self._tick()
            self.pump()

    def settle(self, limit: float = 4 * 3600.0) -> None:
        """Let time pass until no drain is in flight and nothing is queued (or ``limit``)."""
        end = self.now + limit
        while self.now < end and (self.queue or self.store.in_flight()):
            self.advance(10)

    def _tick(self) -> None:
        now = self.now
        for job in self.jobs.values():
            if job.state == "running" and now >= job.ends_at:
                job.state = "passed"
                self.agents[job.agent].job = None
        for agent in list(self.agents.values()):
            task = self.tasks[agent.task]
            if task.status == "STOPPED":
                continue
            job = self.jobs[agent.job] if agent.job else None
            if job is not None and agent.forced:
                self._report(job, "forced stop through the coordinator")
                job = None
            told = agent.stop_requested or task.sigterm_at is not None
            deadline = None if task.sigterm_at is None else task.sigterm_at + AGENT_OWN_FORCE
            if job is not None and deadline is not None and now >= deadline:
                self._report(job, "the agent's own deadline after SIGTERM")
                job = None
            if told and job is None:
                self._exit(task, 0)
        for task in list(self.tasks.values()):
            if task.status != "STOPPED" and task.agent is None and task.sigterm_at is not None:
                self._exit(task, 0)
        for action in self.actions.values():
            if action.state == "waiting" and now >= action.last_beat + action.timeout:
                action.state = "expired"
                if action.delivered:
                    self._violate(f"lifecycle action {action.token} of {action.instance} timed out")
                self._down_soon(action.instance, TERMINATE_AFTER)
        for inst in self.instances.values():
            if (
                inst.down_at is not None
                and now >= inst.down_at
                and inst.state
                in (
                    "running",
                    "stopping",
                )
            ):
                self._go_down(inst)

    def _report(self, job: Job, why: str) -> None:
        job.state, job.why = "reported", why
        self.agents[job.agent].job = None
        inst = self.instances[job.instance]
        if inst.force_ok_at is not None and self.now >= inst.force_ok_at - 1:
            return  # its instance goes: reporting the job is what saves it
        budget = self.settings.drain_budget
        if any(
            a.instance == job.instance
            and a.state == "waiting"
            and self.now >= a.started + budget - 1
            for a in self.actions.values()
        ):
            return  # the scale-in's budget is spent
        self._violate(f"job {job.id} on {job.instance} cancelled ({why}), not going yet")

    def _down_soon(self, iid: str, after: float) -> None:
        inst = self.instances[iid]
        down_as = "stopped" if inst.warm_pool else "terminated"
        self._going(inst, self.now + after, down_as, after + STOP_TIMEOUT)

    def _exit(self, task: Task, code: int) -> None:
        task.status = task.desired = "STOPPED"
        if task.agent:
            self.agents[task.agent].connected = False
        inst = self.instances[task.instance]
        self.send(
            TaskStoppedSignal(
                CLUSTER_ARN, inst.ci_arn, task.arn, at(self.now), {"agent": code}, self._id("e")
            )
        )

    def _go_down(self, inst: Instance) -> None:
        for task in self.tasks.values():
            if task.instance != inst.id or task.status == "STOPPED":
                continue
            job = (
                self.jobs[self.agents[task.agent].job]
                if task.agent and self.agents[task.agent].job
                else None
            )
            if job is not None:
                job.state, job.why = "lost", f"{inst.id} {inst.down_as} under it"
                self.agents[job.agent].job = None
                self._violate(f"job {job.id} lost: {inst.id} went down ({inst.down_as})")
            self._exit(task, 137)
        for action in self.actions.values():
            if action.instance == inst.id and action.state == "waiting":
                action.state = "abandoned"
        told = inst.state == "stopping"  # a stop from outside: EC2 said so already
        inst.state = inst.down_as
        inst.down_at = None
        if inst.down_as == "terminated":
            inst.registered = False
        if not told:
            state = "shutting-down" if inst.down_as == "terminated" else "stopping"
            self.send(self._state_change(inst.id, state))

    # ------------------------------------------------------------------ checking

    def _violate(self, what: str) -> None:
        self.violations.append(f"t+{self.now - T0:.0f}s: {what}")

    def observe(self) -> None:
        """After every invocation: no drain moved backwards, no token left unanswered."""
        for iid, rec in self.store.records.items():
            rank = {"soft": 0, "hard": 1, "done": 2}[rec.phase]
            seen = self._seen.get(iid)
            now = (rec.episode, rec.drain_id, rank, rec.forced_at, rec.force_at)
            if seen is not None:
                episode, drain_id, was, forced, force_at = seen
                if rec.episode < episode:
                    self._violate(f"{iid}: episode {episode} -> {rec.episode}")
                elif rec.episode == episode:
                    if rec.drain_id != drain_id:
                        self._violate(f"{iid}: drain {drain_id} -> {rec.drain_id} (same episode)")
                    if rank < was:
                        self._violate(f"{iid}: phase moved back to {rec.phase}")
                    if forced is not None and rec.forced_at != forced:
                        self._violate(f"{iid}: forced_at {forced} -> {rec.forced_at}")
                    if force_at is not None and (rec.force_at is None or rec.force_at > force_at):
                        self._violate(f"{iid}: force_at {force_at} -> {rec.force_at}")
            self._seen[iid] = now
        for action in self.actions.values():
            if action.state != "waiting" or not action.delivered:
                continue
            rec = self.store.records.get(action.instance)
            if rec is None or rec.phase == "done":
                self._violate(f"{action.instance}: live token {action.token} left unanswered")

    def record(self, iid: str) -> DrainRecord:
        rec = self.store.get(iid)
        assert rec is not None, f"no drain record for {iid}"
        return rec

    def ok(self) -> None:
        assert not self.violations, "\n".join(self.violations)


# ---------------------------------------------------------------------------- the ports


class _Port:
    """A port as the controller sees it: every call counted, and cut by a crash."""

    def __init__(self, world: World, name: str, inner: Any) -> None:
        self._world, self._name, self._inner = world, name, inner

    def __getattr__(self, attr: str) -> Any:
        value = getattr(self._inner, attr)
        if not callable(value):
            return value
        world, name = self._world, self._name

        def call(*args: Any, **kwargs: Any) -> Any:
            world._call(name, attr)
            return value(*args, **kwargs)

        return call


class _Ecs:
    def __init__(self, world: World) -> None:
        self.w = world

    def find_container_instance(self, instance_id: str) -> ContainerInstance | None:
        inst = self.w.instances.get(instance_id)
        if inst is None or not inst.registered:
            return None
        return ContainerInstance(inst.ci_arn, inst.id, inst.status)

    def _instance(self, arn: str) -> Instance:
        return next(i for i in self.w.instances.values() if i.ci_arn == arn)

    def tasks_on(
        self, container_instance_arn: str, known: Sequence[TaskInfo] = (), exact: bool = False
    ) -> list[TaskInfo]:
        """Exact and free here: ``known`` is not needed."""
        inst = self._instance(container_instance_arn)
        return [
            TaskInfo(t.arn, t.group, t.status, t.desired, t.daemon)
            for t in self.w.tasks.values()
            if t.instance == inst.id and t.status != "STOPPED"
        ]

    def saw_stopped(self, container_instance_arn: str, task_arn: str) -> None:
        """Nothing to keep: this world's reads are exact and free."""

    # Several at once, as the ECS adapter does them for a batch of first steps (one call each
    # here, so a crash falls between a batch's reads and its actions, not inside one).

    def find_container_instances(
        self, instance_ids: Sequence[str]
    ) -> dict[str, ContainerInstance | None]:
        return {iid: self.find_container_instance(iid) for iid in instance_ids}

    def tasks_on_many(self, container_instance_arns: Sequence[str]) -> dict[str, list[TaskInfo]]:
        return {arn: self.tasks_on(arn) for arn in container_instance_arns}

    def set_draining_many(self, arns: Sequence[str]) -> dict[str, str]:
        for arn in arns:
            self.set_draining(arn)
        return {}

    def set_draining(self, arn: str) -> None:
        inst = self._instance(arn)
        inst.status = "DRAINING"
        for task in self.w.tasks.values():
            if task.instance == inst.id and task.group.startswith("service:") and not task.daemon:
                self._sigterm(task)

    def _sigterm(self, task: Task) -> None:
        if task.status == "STOPPED" or task.desired == "STOPPED":
            return
        task.desired, task.sigterm_at = "STOPPED", self.w.now

    def stop_task(self, task_arn: str, reason: str) -> None:
        self._sigterm(self.w.tasks[task_arn])

    def protected(self, task_arns: list[str]) -> set[str]:
        return set()


class _Coordinator:
    last_pages = 1

    def __init__(self, world: World) -> None:
        self.w = world

    def _view(self, agent: Agent) -> AgentView:
        job = self.w.jobs[agent.job] if agent.job else None
        return AgentView(
            id=agent.id,
            name=agent.id,
            task_arn=agent.task,
            connection_state="connected" if agent.connected else "disconnected",
            job_id=job.id if job else None,
            job_state="running" if job else None,
            paused=agent.paused,
        )

    def agents_for(self, task_arns: Iterable[str]) -> list[AgentView]:
        wanted = set(task_arns)
        return [self._view(a) for a in self.w.agents.values() if a.task in wanted and a.connected]

    def listing_cost(self, known_pages: int, asker: str = "") -> int:
        return known_pages

    def agent(self, agent_id: str) -> AgentView | None:
        agent = self.w.agents.get(agent_id)
        return self._view(agent) if agent else None

    def pause(self, agent_id: str, note: str, timeout_minutes: int) -> bool:
        self.w.agents[agent_id].paused = True
        return True

    def stop(self, agent_id: str, force: bool) -> bool:
        agent = self.w.agents[agent_id]
        agent.stop_requested = True
        agent.forced = agent.forced or force
        return True


class _Lifecycle:
    def __init__(self, world: World) -> None:
        self.w = world

    def _action(self, token: str, instance_id: str) -> Action:
        action = self.w.actions.get(token)
        if action is None or action.state != "waiting" or action.instance != instance_id:
            raise LifecycleGone(f"No active Lifecycle Action found with token {token}")
        return action

    def heartbeat(self, asg_name: str, hook_name: str, token: str, instance_id: str) -> None:
        self._action(token, instance_id).last_beat = self.w.now

    def complete(
        self, asg_name: str, hook_name: str, token: str, instance_id: str, result: str = ""
    ) -> None:
        action = self._action(token, instance_id)
        busy = [
            j.id for j in self.w.jobs.values() if j.instance == instance_id and j.state == "running"
        ]
        if busy:
            self.w._violate(f"hook of {instance_id} completed while {busy} run there")
        action.state = "completed"
        action.completions += 1
        self.w._down_soon(instance_id, TERMINATE_AFTER)


class _Ticks:
    def __init__(self, world: World) -> None:
        self.w = world

    def schedule(
        self,
        instance_id: str,
        drain_id: str,
        tick_id: str,
        delay: int,
        record: DrainRecord | None = None,
    ) -> None:
        # The record travels as a copy, as it does in an SQS message body.
        carried = copy.deepcopy(record)
        self.w.send(TickSignal(instance_id, drain_id, tick_id, carried), delay=delay)

    def schedule_many(self, ticks: Sequence[Tick]) -> set[str]:
        for t in ticks:
            self.schedule(t.instance_id, t.drain_id, t.tick_id, t.delay, t.record)
        return set()
