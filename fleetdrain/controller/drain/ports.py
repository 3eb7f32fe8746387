"""The drain core's ports: every Protocol the core calls through, and the plain values that cross
them. Standard library only: the core, its tests and ``fleetdrain status`` import this without
botocore, boto3, httpx or pydantic.

Every Protocol's name ends in ``Port`` (so none clashes with the drill's
:class:`fleetdrain.drill.coordinator.Coordinator` or :class:`fleetdrain.drill.world.fleet.Fleet`,
nor with Powertools' ``Metrics``); its adapter is named for what it talks to:

- ``DrainStorePort``: the drain records, written with conditions (``state.DynamoDrainStore``).
- ``EcsPort``: container instance, tasks, DRAINING, StopTask, task protection
  (``ecs_fleet.EcsFleet``).
- ``CoordinatorPort``: the instance's agents: list, look up, pause, stop
  (``coordinator.CoordinatorClient``).
- ``LifecyclePort``: heartbeat / complete the lifecycle action (``lifecycle.LifecycleActions``).
- ``TicksPort``: a delayed tick that wakes a drain up (``ticks.SqsTicks``).
- ``MetricsPort``: counts and durations (``runtime.PowertoolsMetrics``; ``core.NullMetrics``).
- ``Clock`` and ``Sleep`` (plain callables): epoch seconds now, and a wait (``time.time``,
  ``time.sleep``; a test's or the drill's own clock).

Values: :class:`DrainRecord` (through the store), :class:`ContainerInstance` and
:class:`TaskInfo` (from ECS), :class:`AgentView` (from the coordinator). What a port raises is in
:mod:`~fleetdrain.controller.drain.errors` (``Conflict`` from the store, ``Retryable`` from any,
``LifecycleGone``, ``CoordinatorUnavailable``); the events that come in, in normal form, are in
:mod:`~fleetdrain.controller.drain.signals`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

#: Epoch seconds now (every drain time is measured on it; the drill passes a compressed one).
Clock = Callable[[], float]
#: Block for this many seconds.
Sleep = Callable[[float], None]

# ------------------------------------------------------------------ the drain record

Phase = Literal["soft", "hard", "done"]
LifecycleState = Literal["none", "pending", "completed", "gone"]

#: Event ids a record remembers (for duplicates); older ones are forgotten.
MAX_SEEN_EVENTS = 32
#: Spent lifecycle tokens (completed, or refused by AWS) a record remembers.
MAX_DEAD_TOKENS = 16
#: Ended episodes a record keeps a line of (for ``fleetdrain status`` and logs).
MAX_HISTORY = 8
#: Why an instance drains. All but ``rebalance`` mean the instance goes (terminates, stops or
#: reboots): a drain for one of those leaves the container instance DRAINING when it ends.
GOING_REASONS = frozenset({"scale_in", "spot", "maintenance", "stopping"})


@dataclass(kw_only=True)
class TokenRef:
    """A lifecycle token the drain answers besides its own (one that came while another was
    pending): heartbeated with it and completed with it, until AWS refuses it."""

    token: str
    asg_name: str
    hook_name: str
    #: When its action began (its budget counts from there).
    sent_at: float
    #: AWS accepted it (a heartbeat went through) at least once.
    verified: bool = False


@dataclass(kw_only=True)
class PastEpisode:
    """One line about an episode of the instance's drain that has ended."""

    drain_id: str
    episode: int
    reasons: list[str]
    started_at: float
    completed_at: float | None
    outcome: str | None


@dataclass(kw_only=True)
class DrainRecord:
    """Everything a drain knows; see ``core`` for what each phase does with it.

    One record per EC2 instance, holding its current *episode*: a drain that ended (``done``)
    stays as the record until an event that needs action starts the next episode (a new
    ``drain_id``, its own phase and deadline; what every episode must remember, the events
    seen and the spent lifecycle tokens, carries over).

    Mutable on purpose: a merge or a step works on its own deep copy and hands it to the store.
    """

    instance_id: str
    drain_id: str
    cluster: str
    #: The optimistic lock: the store writes only if the record is still at this version.
    version: int = 0
    phase: Phase = "soft"
    reasons: list[str] = field(default_factory=list)
    started_at: float
    #: When the drain stops waiting and forces (budget, or the spot notice minus the margin).
    force_at: float | None = None
    spot_deadline: float | None = None
    asg_name: str | None = None
    hook_name: str | None = None
    lifecycle_token: str | None = None
    lifecycle_state: LifecycleState = "none"
    last_heartbeat_at: float | None = None
    container_instance_arn: str | None = None
    #: Task ARN -> the coordinator agent found for it (later steps ask for these one by one).
    agent_ids: dict[str, str] = field(default_factory=dict)
    #: Pages the last listing of the organization's agents took (its cost in requests).
    listing_pages: int = 0
    paused_agents: list[str] = field(default_factory=list)
    stopped_agents: list[str] = field(default_factory=list)
    stopped_tasks: list[str] = field(default_factory=list)
    draining_at: float | None = None
    forced_at: float | None = None
    fallback: bool = False
    coordinator_down_at: float | None = None
    jobs_force_cancelled: int = 0
    last_task_stopped_at: float | None = None
    completed_at: float | None = None
    outcome: str | None = None
    outcome_reason: str | None = None
    seen_events: list[str] = field(default_factory=list)
    tick_id: str | None = None
    tick_due: float | None = None
    steps: int = 0
    #: The step that holds the record now (claimed with a conditional write; released by the
    #: step's own save). Only the holder writes until ``lease_until``.
    lease_id: str | None = None
    lease_until: float | None = None
    # ---- issue 11: episodes, tokens, the new reasons (after the fields above, so a stored
    # record of an older controller reads unchanged and an older one reads ours)
    #: 1 for an instance's first drain, one more for each later one.
    episode: int = 1
    #: AWS accepted ``lifecycle_token`` (a heartbeat or a completion went through) at least
    #: once. Until then it is only a claim: a replayed or stale token must not drive a drain.
    lifecycle_verified: bool = False
    #: When ``lifecycle_token``'s action began (its budget counts from there).
    token_sent_at: float | None = None
    #: Other tokens the drain answers (came while ``lifecycle_token`` was pending).
    other_tokens: list[TokenRef] = field(default_factory=list)
    #: Tokens that are no longer live: completed by us, or refused by AWS ("No active
    #: Lifecycle Action"). Never answered again, whatever event brings them back.
    dead_tokens: list[str] = field(default_factory=list)
    #: AWS Health scheduled change of the instance: its start (epoch seconds).
    maintenance_at: float | None = None
    history: list[PastEpisode] = field(default_factory=list)
    # ---- issue 12
    #: The instance's tasks (not daemons) at the last step that read them from ECS (each
    #: ``[arn, group, desired status]``), and when: a look that finds every one's agent as
    #: before need not read them again for a while (see ``core.TASKS_LOOK_EVERY``).
    looked_tasks: list[list[str]] = field(default_factory=list)
    looked_at: float | None = None
    #: The DAEMON services' tasks at that look (each ``[arn, group]``): nothing waits for
    #: them, and a step in another container need not describe them again.
    looked_daemons: list[list[str]] = field(default_factory=list)

    def leased(self, now: float) -> bool:
        """Whether a step holds the record at ``now``."""
        return self.lease_id is not None and (self.lease_until or 0.0) > now

    def saw(self, event_id: str) -> bool:
        """Whether the event ``event_id`` was merged already (an empty id never was)."""
        return bool(event_id) and event_id in self.seen_events

    def remember(self, event_id: str) -> None:
        """Note ``event_id`` as merged, keeping the last :data:`MAX_SEEN_EVENTS`."""
        if event_id and event_id not in self.seen_events:
            self.seen_events = [*self.seen_events, event_id][-MAX_SEEN_EVENTS:]

    def knows_token(self, token: str) -> bool:
        """Whether ``token`` is this drain's, one it answers too, or a spent one."""
        return (
            token == self.lifecycle_token
            or token in self.dead_tokens
            or any(t.token == token for t in self.other_tokens)
        )

    def bury(self, token: str) -> None:
        """Note ``token`` as spent (completed or refused), keeping the last
        :data:`MAX_DEAD_TOKENS`."""
        if token and token not in self.dead_tokens:
            self.dead_tokens = [*self.dead_tokens, token][-MAX_DEAD_TOKENS:]

    @property
    def going(self) -> bool:
        """Whether a reason of this drain means the instance goes (not only a rebalance)."""
        return any(r in GOING_REASONS for r in self.reasons)


class DrainStorePort(Protocol):
    """Where drain records live. Writes are conditional: a lost race raises ``Conflict``."""

    def get(self, instance_id: str) -> DrainRecord | None:
        """The record of ``instance_id`` (strongly consistent), or None."""
        ...

    def create(self, record: DrainRecord, link: str | None = None) -> DrainRecord:
        """Write a new record (Conflict if one exists); returns it at version 1. ``link``: as
        :meth:`save`'s, in the same write."""
        ...

    def save(
        self, record: DrainRecord, link: str | None = None, expect_tick: str | None = None
    ) -> DrainRecord:
        """Write if still at ``record.version`` (Conflict otherwise); returns it one higher.
        ``link``: a container instance ARN, remembered (in the same write) as this record's
        instance: task events name only the container instance. ``expect_tick``: and only if
        the stored record's pending tick is this one (a copy a tick carried: its version
        alone does not say it is what was stored, as a step that failed before its save may
        have written that version as it was claimed)."""
        ...

    def claim(
        self, instance_id: str, lease_id: str, lease_until: float, now: float
    ) -> tuple[DrainRecord | None, bool]:
        """Claim the record in one conditional write that reads it too: ``(record, True)``,
        the record holding the lease ``lease_id`` until ``lease_until`` (version one higher);
        ``(record, False)`` when it is done or a step holds it at ``now`` (nothing written:
        the record as it is); ``(None, False)`` when there is none."""
        ...

    def instance_for(self, container_instance_arn: str) -> str | None:
        """The instance a save's ``link`` put down for ``container_instance_arn``, or None."""
        ...

    def learn_link(self, container_instance_arn: str, instance_id: str) -> None:
        """An ECS event named both (a container instance is one EC2 instance for good): a
        later :meth:`instance_for` in this container needs no read. Nothing is written."""
        ...

    def in_flight(self) -> list[DrainRecord]:
        """Drains not done yet."""
        ...


# ------------------------------------------------------------------ ECS


@dataclass(frozen=True)
class ContainerInstance:
    arn: str
    ec2_instance_id: str
    status: str


@dataclass(frozen=True)
class TaskInfo:
    """A task on a container instance that has not stopped yet."""

    arn: str
    #: ``service:<name>`` for a service's task, else whatever the task was started with.
    group: str
    last_status: str
    desired_status: str
    #: A task of a DAEMON service: it stays until the instance goes, so nothing waits for it.
    daemon: bool

    @property
    def service(self) -> str | None:
        """The service that owns the task (DRAINING stops it), or None (StopTask does)."""
        return self.group.split(":", 1)[1] if self.group.startswith("service:") else None


class EcsPort(Protocol):
    """What a drain asks of ECS, for one cluster."""

    def find_container_instance(self, instance_id: str) -> ContainerInstance | None:
        """The container instance on EC2 instance ``instance_id``, or None if not in the cluster."""
        ...

    def tasks_on(
        self, container_instance_arn: str, known: Sequence[TaskInfo] = (), exact: bool = False
    ) -> list[TaskInfo]:
        """Tasks on the container instance that have not stopped yet: those desired RUNNING,
        and the stopping ones the adapter knows of; every stopping one when ``exact``, and
        whenever the answer would hold no task but daemons (it ends the drain). ``known``: the
        tasks as the drain record's last look left them (daemons too), which the adapter may
        take as its own last look when it has none (another container's)."""
        ...

    def saw_stopped(self, container_instance_arn: str, task_arn: str) -> None:
        """An ECS event said ``task_arn`` is STOPPED (final): a later read may take it as read."""
        ...

    def set_draining(self, arn: str) -> None: ...

    def stop_task(self, task_arn: str, reason: str) -> None: ...

    def protected(self, task_arns: list[str]) -> set[str]:
        """Those of ``task_arns`` whose scale-in protection is on now (the coordinator-free busy
        flag)."""
        ...


# ------------------------------------------------------------------ the coordinator

#: Job states in which an agent is working (it has accepted the job and not finished it).
BUSY_JOB_STATES = frozenset({"accepted", "running", "canceling"})
#: Connection states in which an agent can still be signalled.
LIVE_STATES = frozenset({"connected", "stopping"})


@dataclass(frozen=True)
class AgentView:
    """An agent as the coordinator shows it, with the task it runs in."""

    id: str
    name: str
    task_arn: str
    connection_state: str
    job_id: str | None
    job_state: str | None
    paused: bool

    @property
    def live(self) -> bool:
        return self.connection_state in LIVE_STATES

    @property
    def busy(self) -> bool:
        # A job without a state is taken as running: better wait than cut a job short.
        return self.job_id is not None and (self.job_state or "running") in BUSY_JOB_STATES


class CoordinatorPort(Protocol):
    """The coordinator, as a drain uses it. Raises ``CoordinatorUnavailable`` when it cannot be
    reached or refuses us (after its own retries), and its ``RateLimited`` when the
    organization's rate limit leaves nothing for the request now (a pause is refused before a
    read, a read before a forced stop: see ``coordinator.RESERVE``)."""

    #: Pages the last ``agents_for`` read.
    last_pages: int

    def agents_for(self, task_arns: Iterable[str]) -> list[AgentView]:
        """The agents running in these tasks."""
        ...

    def listing_cost(self, known_pages: int, asker: str) -> int:
        """Requests :meth:`agents_for` would spend now for drain ``asker`` (its instance id),
        ``known_pages`` being what its last listing took (0 when a listing that every drain
        shares is fresh)."""
        ...

    def agent(self, agent_id: str) -> AgentView | None:
        """One agent by id; None if the coordinator no longer knows it."""
        ...

    def pause(self, agent_id: str, note: str, timeout_minutes: int) -> bool:
        """Pause an agent; False when the coordinator says it cannot."""
        ...

    def stop(self, agent_id: str, force: bool) -> bool:
        """Stop an agent (``force``: cancel its job); False when it cannot."""
        ...


# ------------------------------------------------------------------ Auto Scaling, ticks, metrics


class LifecyclePort(Protocol):
    """The lifecycle action of a terminating instance. Raises ``LifecycleGone`` when the action
    no longer exists."""

    def heartbeat(self, asg_name: str, hook_name: str, token: str, instance_id: str) -> None: ...

    def complete(
        self, asg_name: str, hook_name: str, token: str, instance_id: str, result: str = ...
    ) -> None: ...


class TicksPort(Protocol):
    """Delayed messages that wake a drain up (the safety net under events)."""

    def schedule(
        self,
        instance_id: str,
        drain_id: str,
        tick_id: str,
        delay: int,
        record: DrainRecord | None = None,
    ) -> None:
        """Deliver a tick for the drain in ``delay`` seconds (at most the queue's ceiling).
        ``record``: the drain record as the step that sends the tick is saving it, carried in
        the tick (its step need not read it when nothing has written it since)."""
        ...


@dataclass(frozen=True)
class Tick:
    """One tick to send: what :meth:`TicksPort.schedule` takes, as a value (a batch of first
    steps holds its ticks back and sends them together: see ``batch``)."""

    instance_id: str
    drain_id: str
    tick_id: str
    delay: int
    record: DrainRecord | None = None


class MetricsPort(Protocol):
    """Where the core's metrics go (names in ``core``)."""

    def count(self, name: str, value: float = 1.0) -> None: ...

    def seconds(self, name: str, value: float) -> None: ...
