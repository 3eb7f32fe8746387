"""The drill's scenarios: what loses builds in real fleets, replayed on a local fleet.

Each scenario gets a fresh :class:`~fleetdrain.drill.world.fleet.Fleet` (moto with template.yaml
deployed, the coordinator, the controller, real agent processes) and returns a
:class:`~fleetdrain.drill.report.model.ScenarioReport`. Durations written here are drill seconds
(what they would be on AWS); the fleet's clock turns them into wall seconds.

"after" scenarios are fleetdrain as designed and must lose nothing; "before" scenarios are
the anti-patterns and must show the loss (or the drill could not see one).

The wrapped scenarios with a Buildkite agent (``wrapped-stop-task``, ``wrapped-scale-in``,
``wrapped-spot``) run behind ``wrap`` the agent the drill was given (:attr:`Run.wrapped_agent`:
the Go ``buildkite-agent``, or our agent as its stand-in: :mod:`fleetdrain.drill.wrapped_agent`)
and say which in their report; every other scenario runs our agent.

Compression has a floor. The agents' cancel grace and drain margin are AWS durations too
(10 s and 5 s: the forced stop comes 15 s before SIGKILL, and the worker has 14.5 s of it to
report), but what the worker does in that window (handle a signal, stop its job, post the
rest of its log and the finish) takes wall time, not AWS time. So the window is never scaled
below :attr:`Run.force_window` wall seconds, what the machine can meet as the drill measured it
(:mod:`fleetdrain.drill.pace`): on a loaded machine the forced stop comes earlier in AWS time,
never closer to the SIGKILL than that.
"""

from __future__ import annotations

import contextlib
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleetdrain.agent.pid1 import FINAL_MARGIN
from fleetdrain.drill.coordinator import Fault, RetryRule
from fleetdrain.drill.pace import FORCE_WINDOW_FLOOR, WALL_PER_DRILL_SECOND
from fleetdrain.drill.report.model import ScenarioKind, ScenarioReport, WrappedAgent
from fleetdrain.drill.world.fleet import CLUSTER, LOST_AGENT_TIMEOUT, Fleet
from fleetdrain.drill.world.queue_worker import UnitWatch, WorkQueue
from fleetdrain.drill.world.task_runtime import AGENT_PROGRAM, RunningTask, TaskDefinition
from fleetdrain.drill.wrapped_agent import DEFAULT, stand_in, wrapped_command

#: The pipeline's retry rules, as Buildkite recommends for agents that can go away.
RETRY = [RetryRule(exit_status="-1", limit=2), RetryRule(signal_reason="agent_stop", limit=2)]
FAMILY = "ci-agents"
STOP_TIMEOUT = 120.0  # the task definition's stopTimeout (infra/)
CANCEL_GRACE = 10.0  # the agent's defaults
DRAIN_MARGIN = 5.0
IMDS_POLL = 5.0  # wrap's --imds-poll-interval default
BUSY_INTERVAL = 1.0  # wrap's --busy-interval default
WRAPPED_FAMILY = "ci-agents-wrapped"
WORKER_FAMILY = "queue-workers"
#: wrap as infra/wrap.Dockerfile has it, with the task definition's additions: PID 1, task
#: protection while busy, IMDS notices.
WRAP_ENTRYPOINT = (AGENT_PROGRAM, "wrap", "--task-protection", "--watch-imds", "--")


@dataclass
class Spec:
    """A scenario: kind, description, how many instances it needs, and its body."""

    kind: ScenarioKind
    description: str
    instances: int
    run: Callable[[Run], None]
    #: The ASG also sends lifecycle notifications to an SQS queue (see ``local_fleet``).
    notification_queue: bool = False
    #: The stack is deployed with ``CoordinatorGraphqlUrl`` (the embedded coordinator's
    #: ``/graphql/v1``): drains find their agents with GraphQL lookups.
    graphql: bool = False


@dataclass
class Run:
    """One scenario run: the fleet and what the body has found out."""

    fleet: Fleet
    report: ScenarioReport
    keys: list[str] = field(default_factory=list)
    tasks: list[RunningTask] = field(default_factory=list)
    #: The queue of a non-Buildkite worker scenario: its units count as its builds.
    work: WorkQueue | None = None
    #: The shortest wall-clock window between an agent's forced stop and its SIGKILL.
    force_window: float = FORCE_WINDOW_FLOOR
    #: The builds and units the scenario ran (filled in by the report).
    expected: int = 0
    #: What runs as the Buildkite agent behind wrap (:meth:`wrapped_definition`).
    wrapped_agent: WrappedAgent = field(default_factory=lambda: stand_in(DEFAULT))

    # -- time

    def wall(self, drill_seconds: float) -> float:
        return self.fleet.clock.wall(drill_seconds)

    def sleep(self, drill_seconds: float) -> None:
        time.sleep(self.wall(drill_seconds))

    @property
    def time_scale(self) -> float:
        """The pace (1.0: :data:`WALL_PER_DRILL_SECOND` per drill second): what wall-clock
        waits that are not AWS durations are multiplied by."""
        return 1.0 / (WALL_PER_DRILL_SECOND * self.fleet.clock.scale)

    def margins(self) -> tuple[float, float]:
        """The agents' cancel grace period and drain margin, wall seconds: AWS's 10 s and 5 s
        at the drill's pace, stretched (both alike) where that would leave less than
        :attr:`force_window` between the forced stop and the agent's own last-resort kill
        (:data:`~fleetdrain.agent.pid1.FINAL_MARGIN` before the deadline)."""
        grace, margin = self.wall(CANCEL_GRACE), self.wall(DRAIN_MARGIN)
        need = self.force_window + FINAL_MARGIN
        if grace + margin < need:
            stretch = need / (grace + margin)
            grace, margin = grace * stretch, margin * stretch
        return grace, margin

    def force_lead(self) -> float:
        """Drill seconds before the deadline at which an agent forces its job (15 s on AWS;
        more where :meth:`margins` stretched them)."""
        grace, margin = self.margins()
        return (grace + margin) * self.fleet.clock.scale

    # -- fleet

    def agent_definition(self, family: str = FAMILY, **kw: Any) -> TaskDefinition:
        """The agent's task definition: stopTimeout 120, the agent's own graces, scaled."""
        grace, margin = self.margins()
        definition = TaskDefinition(
            family,
            kw.pop("stop_timeout", STOP_TIMEOUT),
            ("--cancel-grace-period", f"{grace:.3f}", "--drain-margin", f"{margin:.3f}"),
            **kw,
        )
        self.fleet.runtime.register(definition)
        return definition

    def wrap_environment(self) -> tuple[tuple[str, str], ...]:
        """wrap's settings in the container's environment (infra/wrap.Dockerfile's ``ENV``),
        durations at the drill's pace (the grace and margin no shorter than :meth:`margins`
        allows); wrap's own /status on a port of its own."""
        grace, margin = self.margins()
        return (
            ("FLEETDRAIN_HEALTH_CHECK_ADDR", "127.0.0.1:{port:wrap}"),
            ("BUILDKITE_CANCEL_GRACE_PERIOD", f"{grace:.3f}"),
            ("FLEETDRAIN_DRAIN_MARGIN", f"{margin:.3f}"),
            ("FLEETDRAIN_IMDS_POLL_INTERVAL", f"{self.wall(IMDS_POLL):.3f}"),
            ("FLEETDRAIN_BUSY_INTERVAL", f"{self.wall(BUSY_INTERVAL):.3f}"),
        )

    def wrapped_definition(self, family: str = WRAPPED_FAMILY) -> TaskDefinition:
        """The agent behind wrap: ``entryPoint`` wrap, ``command`` the agent (as a task
        definition for infra/wrap.Dockerfile's image registers them): :attr:`wrapped_agent`,
        the Go agent or its stand-in (:func:`~fleetdrain.drill.wrapped_agent.wrapped_command`).

        For the Go agent the coordinator's intervals go out as whole seconds from here on (it
        cannot decode a fraction into its ``int`` fields and exits): set before any agent
        registers, since they are handed out at register."""
        agent = self.wrapped_agent
        grace, _margin = self.margins()
        command, agent_environment = wrapped_command(agent, grace)
        if agent.go:
            if self.fleet.coord.agents():
                raise RuntimeError("the Go agent's integer intervals come before any agent")
            self.fleet.coord.integer_intervals = True
        self.report.agent = agent.label
        definition = TaskDefinition(
            family,
            STOP_TIMEOUT,
            entry_point=WRAP_ENTRYPOINT,
            command=command,
            environment=(
                *self.wrap_environment(),
                ("BUILDKITE_AGENT_HEALTH_CHECK_ADDR", "127.0.0.1:{port:agent}"),
                *(
                    [("FLEETDRAIN_BUSY_PROBE", f"http://127.0.0.1:{{port:agent}}{BUSY_PROBE_PATH}")]
                    if BUSY_PROBE_PATH is not None
                    else []
                ),
                *agent_environment,
            ),
            status_port="wrap",
        )
        self.fleet.runtime.register(definition)
        return definition

    def worker_definition(self, work: WorkQueue, family: str = WORKER_FAMILY) -> TaskDefinition:
        """A queue consumer behind wrap: no busy probe (busy = it has children)."""
        definition = TaskDefinition(
            family,
            STOP_TIMEOUT,
            entry_point=WRAP_ENTRYPOINT,
            command=("/bin/bash", str(work.script)),
            environment=(*self.wrap_environment(), *work.environment(self.wall(1))),
            status_port="wrap",
        )
        self.fleet.runtime.register(definition)
        return definition

    def start_worker(self, instance: int, name: str, family: str = WORKER_FAMILY) -> RunningTask:
        """A worker task on the fleet's ``instance``-th instance, its worker running (wrap
        says ``idle``: there is no coordinator agent to wait for)."""
        task = self.fleet.runtime.run_task(self.fleet.instances[instance], family, name=name)
        self.tasks.append(task)
        self.fleet.wait(
            lambda: wrap_state(task) == "idle", self.wall(300), f"{name}'s worker to start"
        )
        return task

    def start(self, instance: int, name: str, family: str = FAMILY) -> RunningTask:
        """An agent task on the fleet's ``instance``-th instance, connected."""
        task = self.fleet.runtime.run_task(self.fleet.instances[instance], family, name=name)
        self.tasks.append(task)
        self.fleet.wait(
            lambda: (
                (a := self.fleet.coord.agent_named(name)) is not None
                and a.connection_state == "connected"
            ),
            self.wall(300),
            f"{name} to connect",
        )
        return task

    def job(
        self,
        key: str,
        seconds: float,
        *,
        first_attempt_only: bool = False,
        instance: int | None = None,
        gate: Path | None = None,
    ) -> str:
        """A build step of ``seconds`` (drill); ``first_attempt_only``: only the first attempt
        takes that long (a retry elsewhere is quick and passes); ``instance``: only agents on
        the fleet's ``instance``-th instance may take it (their ``aws:instance-id`` tag);
        ``gate``: its ``seconds`` count from when that file appears (it runs, waiting, until
        then), so that they count from a moment of the scenario's rather than from the start
        of a job that a busy machine may have started long before. Returns the job id."""
        sleep = f"{self.wall(seconds):.3f}"
        body = f'echo "step {key} on $BUILDKITE_AGENT_NAME"; '
        if gate is not None:
            body += f"while [ ! -e {shlex.quote(str(gate))} ]; do sleep 0.05; done; "
        if first_attempt_only:
            body += f'if [ "$BUILDKITE_RETRY_COUNT" = 0 ]; then sleep {sleep}; else sleep 0.5; fi; '
        else:
            body += f"sleep {sleep}; "
        body += 'echo "built"'
        rules = None if instance is None else [f"aws:instance-id={self.fleet.instances[instance]}"]
        job = self.fleet.coord.add_job(body, retry=RETRY, key=key, agent_query_rules=rules)
        self.keys.append(key)
        return job.id

    def running(self, job_id: str, on: str | None = None) -> None:
        """Wait until the job runs (on agent ``on``)."""

        def check() -> bool:
            job = self.fleet.coord.job(job_id)
            if job.state != "running":
                return False
            if on is None:
                return True
            agent = self.fleet.coord.agent_named(on)
            return agent is not None and job.agent_id == agent.id

        self.fleet.wait(check, self.wall(300), f"job {job_id} to run")

    def stop_task(self, task: RunningTask, reason: str) -> None:
        """``ecs stop-task`` (what a game day or an operator does)."""
        with self.fleet.lock:
            self.fleet.client("ecs").stop_task(cluster=CLUSTER, task=task.arn, reason=reason)

    def outcomes(self, timeout_drill: float, *, final: tuple[str, ...] = ("passed",)) -> None:
        """Wait until every step is in one of ``final`` outcomes (or failed/canceled)."""
        done = (*final, "failed", "canceled")
        self.fleet.wait(
            lambda: all(self.fleet.coord.step(k).outcome in done for k in self.keys),
            self.wall(timeout_drill),
            "every build step to end",
        )

    def note(self, text: str) -> None:
        self.report.notes.append(text)

    def drain(self, instance: int) -> Any:
        """The controller's drain record of the fleet's ``instance``-th instance."""
        with self.fleet.lock:
            return self.fleet.controller.store.get(self.fleet.instances[instance])

    def wait_drain_done(self, instance: int, timeout_drill: float) -> Any:
        self.fleet.wait(
            lambda: (r := self.drain(instance)) is not None and r.phase == "done",
            self.wall(timeout_drill),
            "the drain to finish",
        )
        return self.drain(instance)

    def timeline(self, kind: str, subject: str, what: str, **detail: Any) -> None:
        self.fleet.timeline.record(kind, subject, what, detail)


# ---------------------------------------------------------------------------- after


def stop_task(run: Run, name: str = "stop-task", family: str = FAMILY) -> None:
    """``ecs stop-task`` under a running build: it finishes on the same agent."""
    if family == FAMILY:
        run.agent_definition()
    task = run.start(0, f"{name}-a1", family)
    job = run.job(name, 25)
    run.running(job)
    run.sleep(5)
    run.stop_task(task, "game day: stop-task under a build")
    run.outcomes(200)
    run.fleet.runtime.wait_stopped([task], run.wall(60))
    expect_clean_exit(run, [task])
    if run.fleet.coord.step(name).retries:
        run.note("the build was retried: it should have finished where it ran")


def deadline(run: Run) -> None:
    """``ecs stop-task`` under a build longer than stopTimeout, no controller involved: the
    agent cancels it before SIGKILL could come, reports ``agent_stop``, the retry rule re-runs
    it on another agent, and it passes there."""
    run.agent_definition()
    task = run.start(0, "deadline-a1")
    job = run.job("deadline", 600, first_attempt_only=True)
    run.running(job, on="deadline-a1")
    run.start(1, "deadline-b1")  # where the retry can run
    run.stop_task(task, "game day: stop-task under a long build")
    run.outcomes(STOP_TIMEOUT + 120)
    run.fleet.runtime.wait_stopped([task], run.wall(STOP_TIMEOUT + 30))
    expect_clean_exit(run, [task])
    first = run.fleet.coord.job(job)
    if first.signal_reason != "agent_stop":
        run.note(f"the first attempt was reported signal_reason={first.signal_reason}")


def deploy(run: Run) -> None:
    """A service deployment replaces every task; the busy one is protected and finishes."""
    run.agent_definition()
    old = [run.start(0, "deploy-old-1"), run.start(0, "deploy-old-2")]
    job = run.job("deploy", 120)
    run.running(job)
    busy = next(t for t in old if run.fleet.coord.job(job).agent_id == agent_id(run, t.name))
    run.fleet.wait(lambda: protected(run, busy), run.wall(60), "the busy task's protection")
    run.timeline("note", "ecs", "deployment: new revision rolls out")
    run.agent_definition()  # revision 2 of the family
    # A rolling deployment starts the new tasks, then stops old ones (not protected ones).
    runtime = run.fleet.runtime
    new = [runtime.run_task(run.fleet.instances[1], FAMILY, name=f"deploy-new-{i}") for i in (1, 2)]
    replace_old_tasks(run, old)
    run.outcomes(300)
    run.fleet.runtime.wait_stopped(old, run.wall(120))
    expect_clean_exit(run, old)
    if run.fleet.coord.step("deploy").retries:
        run.note("the busy agent's build was retried: protection did not hold")
    run.tasks = [*old, *new]


def replace_old_tasks(run: Run, old: list[RunningTask]) -> None:
    """The ECS service scheduler's part of a deployment: stop each old task, but not while its
    scale-in protection is on (ECS leaves protected tasks until protection ends)."""
    pending = list(old)
    deadline = time.monotonic() + run.wall(600)
    while pending and time.monotonic() < deadline:
        for task in list(pending):
            if not protected(run, task):
                run.stop_task(task, "ECS deployment: replaced by a new revision")
                pending.remove(task)
        time.sleep(0.1)
    if pending:
        run.note(f"still protected after 600s: {[t.name for t in pending]}")


def scale_in(run: Run, name: str = "scale-in", family: str = FAMILY) -> None:
    """ASG scale-in under a build longer than stopTimeout: the two-phase drain lets it finish,
    then the hook completes."""
    if family == FAMILY:
        run.agent_definition()
    busy = run.start(0, f"{name}-a1", family)
    # The build's 200 s count from the scale-in: the agents started after it may take a while
    # on a busy machine, and the build must still outlast stopTimeout (120 s) once the drain
    # begins, or the scenario would not show what only the soft phase makes possible.
    gate = run.fleet.workdir / f"{name}.scale-in-begun"
    job = run.job(name, 200, gate=gate)
    run.running(job, on=f"{name}-a1")
    idle = run.start(0, f"{name}-a2", family)
    run.start(1, f"{name}-b1", family)
    run.fleet.runtime.scale_in(run.fleet.instances[0])
    gate.touch()
    run.outcomes(400)
    rec = run.wait_drain_done(0, 200)
    run.fleet.runtime.wait_stopped([busy, idle], run.wall(60))
    expect_clean_exit(run, [busy, idle])
    expect_hook_continued(run, 0)
    if rec.forced_at is not None:
        run.note("the drain was forced")
    if run.fleet.coord.step(name).retries:
        run.note("the long build was retried instead of finishing")


def spot(run: Run, name: str = "spot", family: str = FAMILY) -> None:
    """A spot interruption under a build that cannot finish in two minutes: cancelled and
    reported ``agent_stop`` before the instance dies, retried on another instance, passes."""
    if family == FAMILY:
        run.agent_definition()
    doomed = run.start(0, f"{name}-a1", family)
    job = run.job(name, 600, first_attempt_only=True)
    run.running(job, on=f"{name}-a1")
    run.start(1, f"{name}-b1", family)  # where the retry can run
    notice = run.fleet.clock()
    run.fleet.runtime.spot_interruption(run.fleet.instances[0])
    run.outcomes(400)
    run.fleet.runtime.wait_stopped([doomed], run.wall(150))
    first = run.fleet.coord.job(job)
    if first.signal_reason != "agent_stop":
        run.note(
            f"the first attempt was reported signal_reason={first.signal_reason} "
            f"exit_status={first.exit_status}, not agent_stop"
        )
        explain_spot_race(run, doomed, notice)
    if doomed.exit_code == 137:
        run.note("the agent was SIGKILLed with the instance")
    if not run.fleet.coord.step(name).retries:
        run.note("the build was not retried")


def explain_spot_race(run: Run, task: RunningTask, notice: float) -> None:
    """Say who cancelled the build first: the controller's forced stop (a server-side cancel,
    which the agent reports as ``cancel``) or the agent's own deadline (``agent_stop``)."""
    rec = run.drain(0)
    if rec is None or rec.forced_at is None or task.sigterm_drill is None:
        return
    lead = run.force_lead()
    own = task.sigterm_drill + STOP_TIMEOUT - lead
    margin = run.fleet.controller.settings.spot_margin
    run.note(
        f"the controller forced the drain {rec.forced_at - notice:.0f}s after the notice "
        f"(SpotMarginSeconds {margin:.0f}), before the agent's own deadline cancel at "
        f"{own - notice:.0f}s (stopTimeout {STOP_TIMEOUT:.0f} - cancel grace and drain margin "
        f"{lead:.0f} after SIGTERM)"
    )


def rebalance(run: Run) -> None:
    """A rebalance recommendation: a soft drain, the build finishes, the instance is retired
    (DRAINING, empty) with nothing lost and nothing forced."""
    run.agent_definition()
    busy = run.start(0, "rebalance-a1")
    # Both agents up before the build starts: the build's 60 s are not spent starting the other
    # (which takes wall time, seconds on a loaded machine, not AWS time).
    run.start(1, "rebalance-b1")
    job = run.job("rebalance", 60, instance=0)
    run.running(job, on="rebalance-a1")
    run.fleet.runtime.rebalance_recommendation(run.fleet.instances[0])
    run.outcomes(300)
    rec = run.wait_drain_done(0, 200)
    run.fleet.runtime.wait_stopped([busy], run.wall(60))
    expect_clean_exit(run, [busy])
    if rec.outcome != "drained" or rec.forced_at is not None:
        run.note(f"drain outcome {rec.outcome}, forced={rec.forced_at is not None}")
    if run.fleet.runtime.tasks_on(run.fleet.instances[0]):
        run.note("tasks still run on the retired instance")


def faults(run: Run) -> None:
    """Coordinator 5xx, latency and 401 bursts during two drains (a scale-in, and a spot
    notice that arrives before its own lifecycle action), the lifecycle event delivered three
    times by EventBridge and once more as an SQS notification: every build passes, none is
    lost."""
    fleet = run.fleet
    run.agent_definition()
    a1 = run.start(0, "faults-a1")
    job_a = run.job("faults-scale-in", 60)
    run.running(job_a, on="faults-a1")
    b1 = run.start(1, "faults-b1")
    job_b = run.job("faults-spot", 600, first_attempt_only=True)
    run.running(job_b, on="faults-b1")
    run.start(2, "faults-c1")  # where the spot build's retry can run
    # The REST API the controller uses: errors, slowness, a burst of 401s (token refreshed).
    injected = [
        Fault("rest_agents", "status", status=503, count=2),
        Fault("rest_pause", "status", status=500, count=1),
        Fault("rest_pause", "latency", seconds=run.wall(5), count=2),  # 5 AWS seconds
        Fault("rest_agents", "status", status=401, count=1),
    ]
    # The agent API while the agents drain: heartbeat and chunk 5xx, a slow finish.
    names = {agent_id(run, n): n for n in ("faults-a1", "faults-b1")}
    for aid in names:
        injected += [
            Fault("heartbeat", "status", status=502, count=3, agent_id=aid, while_draining=True),
            Fault("chunks", "status", status=503, count=2, agent_id=aid),
            Fault("finish", "latency", seconds=run.wall(3), count=1, agent_id=aid),
        ]
    for fault in injected:
        fleet.coord.faults.add(fault)
        subject = names.get(fault.agent_id, "coordinator")
        run.timeline("fault", subject, f"injected: {fault.endpoint} {fault.kind} x{fault.count}")
    lifecycle = fleet.runtime.scale_in(fleet.instances[0])
    for _ in range(2):  # EventBridge delivers at least once: the same event again
        fleet.router.put_event(lifecycle)
        run.timeline("fault", "eventbridge", "duplicate lifecycle event", id=lifecycle["id"])
    # Reordered: the spot notice first, its instance's lifecycle action after.
    fleet.runtime.spot_interruption(fleet.instances[1])
    run.sleep(5)
    fleet.runtime.scale_in(fleet.instances[1])
    run.outcomes(500)
    run.wait_drain_done(0, 300)
    run.wait_drain_done(1, 300)
    fleet.runtime.wait_stopped([a1, b1], run.wall(150))
    for iid in fleet.instances[:2]:
        action = fleet.gaps.actions[iid]
        if action.result != "CONTINUE":
            run.note(f"{iid}: lifecycle action {action.state} ({action.result})")
    first = fleet.coord.job(job_b)
    if first.signal_reason != "agent_stop":
        run.note(
            f"the spot build's first attempt was reported signal_reason={first.signal_reason}, "
            "not agent_stop"
        )
    if not fleet.coord.events_of("fault"):
        run.note("no fault fired: the scenario tested nothing")
    if a1.exit_code == 137 or b1.exit_code == 137:
        run.note("an agent was SIGKILLed")


# ---------------------------------------------------------------------------- wrapped

#: What wrap's busy probe would ask the agent behind it; None: no probe, busy while the agent
#: has a child process (it runs each job as one, and has none while idle): the protection
#: timeline tests/drill/test_wrapped_scenarios.py checks is that signal's. It holds for the Go
#: agent too (each job's bootstrap is its child; none while idle), so either agent runs behind
#: the same wrap. A probe would need a path per agent: ``start``'s ``/status`` carries
#: ``aggregate_status`` as the Go agent's ``/status.json`` does, but the Go agent's ``/status``
#: is an HTML page and ``start`` serves no ``/status.json``.
BUSY_PROBE_PATH: str | None = None


def wrapped_stop_task(run: Run) -> None:
    """``stop-task`` with the agent behind wrap: wrap passes SIGTERM on, the agent finishes
    the build, wrap exits with its status."""
    run.wrapped_definition()
    stop_task(run, "wrapped-stop-task", WRAPPED_FAMILY)
    expect_wrap_never_killed(run)


def wrapped_scale_in(run: Run) -> None:
    """``scale-in`` with every agent behind wrap: wrap sees the lifecycle state in IMDS and
    drains its agent softly, the controller pauses it too; the long build finishes, the wraps
    hold their tasks up until DRAINING, the hook completes."""
    run.wrapped_definition()
    scale_in(run, "wrapped-scale-in", WRAPPED_FAMILY)
    expect_wrap_never_killed(run)


def wrapped_spot(run: Run) -> None:
    """``spot`` with every agent behind wrap: wrap reads the notice from IMDS and drains its
    agent with the notice's deadline. The build is cancelled before the instance goes, by
    whichever comes first: the controller's forced stop (notice + 120 - SpotMarginSeconds,
    100 s) or wrap's force signal (the notice's time - cancel grace - margin, 105 s, earlier
    here by up to a drill-compressed second, as IMDS gives whole seconds); either way it is
    reported ``agent_stop`` and the retry passes elsewhere."""
    run.wrapped_definition()
    spot(run, "wrapped-spot", WRAPPED_FAMILY)
    expect_wrap_never_killed(run)


def wrapped_worker_scale_in(run: Run) -> None:
    """ASG scale-in under a queue consumer behind wrap that never talks to the coordinator:
    busy from its children, task protection on while it works, soft drain from IMDS's
    target lifecycle state; the controller sees it busy only through ``GetTaskProtection``.
    The unit in hand (longer than stopTimeout) completes, new units go to the other instance,
    the hook completes; a unit killed half-way would be lost."""
    fleet = run.fleet
    work = WorkQueue(fleet.workdir / "work")
    run.work = work
    run.worker_definition(work)
    with UnitWatch(work, fleet.timeline.record):
        a1 = run.start_worker(0, "worker-a1")
        work.submit("unit-1", run.wall(200))
        fleet.wait(
            lambda: work.unit("unit-1").claimed_by == "worker-a1",
            run.wall(60),
            "worker-a1 to take unit-1",
        )
        fleet.wait(lambda: protected(run, a1), run.wall(60), "worker-a1's task protection")
        run.start_worker(1, "worker-b1")
        fleet.runtime.scale_in(fleet.instances[0])
        # Work that comes in during the drain: only the other instance may take it.
        for unit in ("unit-2", "unit-3"):
            work.submit(unit, run.wall(20))
        # Every unit completed, or lost: claimed by the worker that has stopped without it.
        fleet.wait(
            lambda: all(u.done_by or (u.lost and a1.stopped.is_set()) for u in work.units()),
            run.wall(400),
            "every unit to complete",
        )
        rec = run.wait_drain_done(0, 200)
        fleet.runtime.wait_stopped([a1], run.wall(60))
    expect_clean_exit(run, [a1])
    expect_hook_continued(run, 0)
    expect_wrap_never_killed(run)
    if rec.forced_at is not None:
        run.note("the drain was forced")
    units = {u.name: u for u in work.units()}
    if units["unit-1"].done_by != "worker-a1":
        run.note(f"unit-1 was not completed where it ran: {units['unit-1']}")
    for name in ("unit-2", "unit-3"):
        if units[name].claimed_by not in (None, "worker-b1"):
            run.note(f"{name} was taken by {units[name].claimed_by} while it drained")
    done_at = next(
        (e.t for e in fleet.timeline.sorted() if e.subject == "unit-1" and "completed" in e.what),
        None,
    )
    draining = [e.t for e in fleet.timeline.sorted() if e.what == "DRAINING"]
    if done_at is not None and draining and min(draining) < done_at:
        run.note("DRAINING came before the protected worker's unit completed")


def wrap_state(task: RunningTask) -> str | None:
    """wrap's own state (its /status), or None when it does not answer."""
    import httpx

    port = task.ports.get("wrap")
    if port is None:
        return None
    try:
        body = httpx.get(f"http://127.0.0.1:{port}/status", timeout=1.0).json()
    except (httpx.HTTPError, ValueError):
        return None
    state = body.get("state") if isinstance(body, dict) else None
    return state if isinstance(state, str) else None


def expect_wrap_never_killed(run: Run) -> None:
    """wrap's deadline SIGKILL is its last resort: in these scenarios it must never come."""
    for task in run.fleet.runtime.tasks.values():
        if "SIGKILL to the worker" in task.process.output():
            run.note(f"wrap SIGKILLed {task.name}'s worker at its deadline")


# ---------------------------------------------------------------------------- before


def shell_pid1(run: Run) -> None:
    """Before: ``sh -c`` as PID 1 never forwards SIGTERM; the agent runs until SIGKILL at
    stopTimeout and its build is lost."""
    run.agent_definition("ci-agents-shell", shell_entrypoint=True)
    task = run.start(0, "shell-pid1-a1", family="ci-agents-shell")
    job = run.job("shell-pid1", 400)
    run.running(job)
    run.stop_task(task, "game day: stop-task under a build")
    run.fleet.runtime.wait_stopped([task], run.wall(STOP_TIMEOUT + 60))
    # The coordinator notices only when the agent has been silent for its lost timeout.
    wait_for_loss(run, "shell-pid1", STOP_TIMEOUT + LOST_AGENT_TIMEOUT + 60)


def heartbeat_stops(run: Run) -> None:
    """Before: the agent stops heartbeating once it is drained (3.116.0): the coordinator
    declares it lost during a scale-in drain and its build with it."""
    fleet = run.fleet
    # What the regression looks like from the server: heartbeats stop once draining begins.
    fleet.coord.faults.add(Fault("heartbeat", "ignore", while_draining=True))
    run.timeline("fault", "coordinator", "heartbeats dropped once an agent drains")
    run.agent_definition()
    run.start(0, "heartbeat-stops-a1")
    job = run.job("heartbeat-stops", 400, first_attempt_only=True)
    run.running(job, on="heartbeat-stops-a1")
    run.start(1, "heartbeat-stops-b1")
    fleet.runtime.scale_in(fleet.instances[0])
    wait_for_loss(run, "heartbeat-stops", LOST_AGENT_TIMEOUT + 120)


# ---------------------------------------------------------------------------- helpers


def agent_id(run: Run, name: str) -> str | None:
    agent = run.fleet.coord.agent_named(name)
    return None if agent is None else agent.id


def protected(run: Run, task: RunningTask) -> bool:
    with run.fleet.lock:
        out = run.fleet.client("ecs").get_task_protection(cluster=CLUSTER, tasks=[task.arn])
    return any(p.get("protectionEnabled") for p in out.get("protectedTasks", []))


def expect_hook_continued(run: Run, instance: int) -> None:
    instance_id = run.fleet.instances[instance]
    # The runtime's watcher (50 ms polls) records the completion and terminates the instance:
    # wait for it, so the report's timeline never ends a scenario before its hook does.
    with contextlib.suppress(TimeoutError):
        run.fleet.wait(
            lambda: instance_id in run.fleet.runtime.terminated,
            5.0 * run.time_scale,
            "the instance to terminate",
        )
    action = run.fleet.gaps.actions[instance_id]
    if action.result != "CONTINUE" or action.state != "completed":
        run.note(f"lifecycle action {action.state} ({action.result}), not completed CONTINUE")


def expect_clean_exit(run: Run, tasks: list[RunningTask]) -> None:
    for task in tasks:
        if task.exit_code != 0:
            run.note(f"{task.name} exited {task.exit_code}")


def wait_for_loss(run: Run, key: str, timeout_drill: float) -> None:
    try:
        run.fleet.wait(
            lambda: run.fleet.coord.step(key).lost_attempts > 0,
            run.wall(timeout_drill),
            "the coordinator to lose the build",
        )
    except TimeoutError:
        run.note("no build was lost")


SPECS: dict[str, Spec] = {
    "stop-task": Spec(
        "after", "ecs stop-task under a running build: it finishes there", 1, stop_task
    ),
    "deadline": Spec(
        "after",
        "stop-task under a build longer than stopTimeout: cancelled, agent_stop, retried",
        2,
        deadline,
    ),
    "deploy": Spec(
        "after", "service deployment: the busy task is protected and finishes", 2, deploy
    ),
    "scale-in": Spec(
        "after",
        "ASG scale-in under a build longer than stopTimeout: two-phase drain, hook completes",
        2,
        scale_in,
    ),
    "spot": Spec(
        "after",
        "spot interruption under a build that cannot finish: cancelled, reported, retried",
        2,
        spot,
    ),
    "rebalance": Spec(
        "after",
        "rebalance recommendation: soft drain, instance retired, nothing lost",
        2,
        rebalance,
    ),
    "faults": Spec(
        "after",
        "coordinator 5xx/latency/401 bursts during drains; duplicate and reordered events",
        3,
        faults,
        notification_queue=True,
    ),
    "wrapped-stop-task": Spec(
        "after",
        "stop-task under a build, the agent behind wrap: SIGTERM passed on, it finishes there",
        1,
        wrapped_stop_task,
    ),
    "wrapped-scale-in": Spec(
        "after",
        "scale-in under a long build, every agent behind wrap: IMDS soft drain, wraps hold, "
        "hook completes",
        2,
        wrapped_scale_in,
    ),
    "wrapped-spot": Spec(
        "after",
        "spot under a build that cannot finish, agents behind wrap (IMDS notice): cancelled "
        "before the instance goes, agent_stop, retried",
        2,
        wrapped_spot,
    ),
    "wrapped-worker-scale-in": Spec(
        "after",
        "scale-in under a non-Buildkite queue worker behind wrap: busy from its children, "
        "protected, its unit completes",
        2,
        wrapped_worker_scale_in,
    ),
    "shell-pid1": Spec(
        "before", "sh -c as PID 1 never forwards SIGTERM: SIGKILL, build lost", 1, shell_pid1
    ),
    "heartbeat-stops": Spec(
        "before",
        "agent stops heartbeating while it drains (3.116.0): declared lost, build lost",
        2,
        heartbeat_stops,
    ),
}
