"""What the drain asks of ECS: the container instance of an EC2 instance, its tasks, DRAINING,
StopTask, and task scale-in protection (the coordinator-free busy flag).

Every call goes through one boto3 ECS client (adaptive retry mode, set up by the caller);
what the retries gave up on and is worth another try comes out as :class:`Retryable`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from botocore.exceptions import BotoCoreError, ClientError

from fleetdrain.controller.drain.aws_errors import reraise_retryable
from fleetdrain.controller.drain.ports import ContainerInstance, TaskInfo

T = TypeVar("T")

#: Seconds a look at a container instance's tasks that read both listings (RUNNING and
#: STOPPED) stands in for the STOPPED one (on the drain clock): see :meth:`EcsFleet.tasks_on`.
#: Never, as built: a look reads the stopping tasks only when it is to be exact (a forced stop,
#: an answer that ends the drain). The bench's ``--before`` sets 0 (both, every look).
FULL_LISTING_EVERY = math.inf
#: Container instances whose last look is remembered (the oldest is forgotten first).
MAX_REMEMBERED = 512
#: EC2 instance ids in one ``ec2InstanceId in [...]`` filter (well inside its length).
FILTER_IDS = 20


def _chunks(items: list[T], size: int) -> Iterator[list[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _unique(first: Iterable[str], then: Iterable[str]) -> list[str]:
    """``first`` and then ``then``, each ARN once, in order."""
    return list(dict.fromkeys([*first, *then]))


def _service(task: dict[str, Any]) -> str | None:
    """The service a described task belongs to (``group`` ``service:<name>``), or None."""
    group = str(task.get("group", ""))
    return group.split(":", 1)[1] if group.startswith("service:") else None


def _keep(memo: dict[str, Any], key: str, value: Any) -> None:
    """``memo[key] = value`` as its newest entry, the oldest forgotten beyond
    :data:`MAX_REMEMBERED` (a container lives for many drains)."""
    memo.pop(key, None)
    memo[key] = value
    while len(memo) > MAX_REMEMBERED:
        memo.pop(next(iter(memo)))


@dataclass
class _Seen:
    """One container instance's tasks as :meth:`EcsFleet.tasks_on` last saw them."""

    #: Not STOPPED then (desired RUNNING, or stopping), as last described: one still listed
    #: RUNNING is not described again (its group never changes, its desired status is what
    #: the listing says; its last status is read by nothing).
    live: dict[str, dict[str, Any]]
    #: Seen STOPPED (final: never described again).
    stopped: set[str]
    #: When both listings were last read.
    full_at: float


@dataclass
class _Look:
    """A look at one container instance's tasks between its listings and its describe."""

    ci: str
    now: float
    seen: _Seen | None
    #: Both listings read (or to be: see :meth:`EcsFleet._answer`).
    full: bool
    known_stopped: set[str]
    #: Tasks still listed RUNNING as the last look described them.
    again: list[dict[str, Any]]
    to_describe: list[str]


class EcsFleet:
    """:class:`~fleetdrain.controller.drain.ports.EcsPort`: ECS calls for one cluster."""

    def __init__(self, client: Any, cluster: str, clock: Callable[[], float]) -> None:
        self._ecs = client
        self.cluster = cluster
        self._clock = clock
        self._daemon: dict[str, bool] = {}
        #: What :meth:`tasks_on` saw of each container instance last (most recent last).
        self._seen: dict[str, _Seen] = {}
        #: How long a look that read both listings stands in for ``ListTasks(STOPPED)``.
        self.full_listing_every = FULL_LISTING_EVERY
        #: Tasks an ECS event said are STOPPED, by container instance, not looked at since.
        self._told_stopped: dict[str, set[str]] = {}

    def _call(self, what: str, fn: Callable[..., Any], **kwargs: Any) -> Any:
        try:
            return fn(cluster=self.cluster, **kwargs)
        except (ClientError, BotoCoreError) as exc:
            reraise_retryable(exc, f"ECS {what}")
            raise

    # ------------------------------------------------------------------ container instance

    def find_container_instance(self, instance_id: str) -> ContainerInstance | None:
        """The container instance on EC2 instance ``instance_id``, or None if not in the cluster.

        One ``ListContainerInstances`` with the filter ``ec2InstanceId == <id>`` (the cluster
        query language, exact in ECS): the one ARN it names is the answer (its status is not
        read: nothing asks for it). Only if it names several is each described and believed
        where the instance id matches. No match: None, and nothing else is asked. An EC2 notice
        for an instance of another cluster (every spot warning of a shared account reaches us)
        costs that one call, never a listing of the cluster.
        """
        arns = self._list_instances(filter=f"ec2InstanceId == {instance_id}")
        if len(arns) == 1:
            return ContainerInstance(arns[0], instance_id, "")
        return self._match(arns, instance_id)

    def find_container_instances(
        self, instance_ids: Sequence[str]
    ) -> dict[str, ContainerInstance | None]:
        """:meth:`find_container_instance` of several EC2 instances at once: one
        ``ListContainerInstances`` with ``ec2InstanceId in [...]`` (:data:`FILTER_IDS` ids a
        filter) and one ``DescribeContainerInstances`` (100 a call) to pair the ARNs it names
        with their EC2 instances, where one instance at a time takes a listing each. Two or
        fewer are asked one by one (that is no more calls)."""
        ids = list(dict.fromkeys(instance_ids))
        if len(ids) <= 2:
            return {iid: self.find_container_instance(iid) for iid in ids}
        found: dict[str, ContainerInstance | None] = dict.fromkeys(ids)
        for group in _chunks(ids, FILTER_IDS):
            arns = self._list_instances(filter=f"ec2InstanceId in [{', '.join(group)}]")
            found.update(self._pair(arns, set(group)))
        return found

    def _list_instances(self, **kwargs: Any) -> list[str]:
        arns: list[str] = []
        token: str | None = None
        while True:
            page = self._call(
                "ListContainerInstances",
                self._ecs.list_container_instances,
                **kwargs,
                **({"nextToken": token} if token else {}),
            )
            arns.extend(page.get("containerInstanceArns", []))
            token = page.get("nextToken")
            if not token:
                return arns

    def _match(self, arns: list[str], instance_id: str) -> ContainerInstance | None:
        return self._pair(arns, {instance_id}).get(instance_id)

    def _pair(self, arns: list[str], wanted: set[str]) -> dict[str, ContainerInstance]:
        """The container instances among ``arns`` on the EC2 instances ``wanted`` (the first
        found of each), described 100 a call until every one of them is found."""
        found: dict[str, ContainerInstance] = {}
        for batch in _chunks(arns, 100):
            if len(found) == len(wanted):
                break
            out = self._call(
                "DescribeContainerInstances",
                self._ecs.describe_container_instances,
                containerInstances=batch,
            )
            for ci in out.get("containerInstances", []):
                iid = ci.get("ec2InstanceId")
                if iid in wanted and iid not in found:
                    found[iid] = ContainerInstance(
                        ci["containerInstanceArn"], iid, ci.get("status", "")
                    )
        return found

    def container_instance_status(self, arn: str) -> str | None:
        out = self._call(
            "DescribeContainerInstances",
            self._ecs.describe_container_instances,
            containerInstances=[arn],
        )
        for ci in out.get("containerInstances", []):
            return str(ci.get("status", ""))
        return None

    def set_draining(self, arn: str) -> None:
        failed = self.set_draining_many([arn])
        if failed:
            reason = next(iter(failed.values()))
            raise RuntimeError(f"UpdateContainerInstancesState DRAINING failed: {reason}")

    def set_draining_many(self, arns: Sequence[str]) -> dict[str, str]:
        """DRAINING for several container instances, 10 a call (what
        ``UpdateContainerInstancesState`` takes); the ones that failed, with ECS's reason."""
        failed: dict[str, str] = {}
        for batch in _chunks(list(dict.fromkeys(arns)), 10):
            out = self._call(
                "UpdateContainerInstancesState",
                self._ecs.update_container_instances_state,
                containerInstances=batch,
                status="DRAINING",
            )
            for failure in out.get("failures") or []:
                arn, reason = str(failure.get("arn", "")), str(failure.get("reason", "unknown"))
                # A failure that names no instance of ours is taken as all of the call's.
                failed.update({arn: reason} if arn in batch else dict.fromkeys(batch, reason))
        return failed

    # ------------------------------------------------------------------ tasks

    def saw_stopped(self, container_instance_arn: str, task_arn: str) -> None:
        """An ``ECS Task State Change`` said ``task_arn`` is ``STOPPED`` (its ``lastStatus``:
        final). The next :meth:`tasks_on` of the instance takes it as read, so the step that
        event wakes describes no task for it, in a new container too."""
        told = self._told_stopped.pop(container_instance_arn, set())
        if len(told) < 1000:  # a bound per instance, as _keep bounds the instances
            told.add(task_arn)
        _keep(self._told_stopped, container_instance_arn, told)

    def tasks_on(
        self, container_instance_arn: str, known: Sequence[TaskInfo] = (), exact: bool = False
    ) -> list[TaskInfo]:
        """Tasks on the container instance that have not stopped yet (stopping ones too).

        ECS lists by desired status only (no filter means RUNNING; a stopping task is desired
        STOPPED, and so is every task that stopped in the last hour or more), so an exact answer
        takes two listings. A look needs one: ``ListTasks(RUNNING)``, then one
        ``DescribeTasks`` (100 ARNs a call) of the tasks it lists that were not live at this
        instance's last look, and of those that were live then and are not listed now (they
        have begun stopping since). A task live at the last look and still listed RUNNING is
        taken as that look described it (its group never changes). What one listing misses is
        a task placed and stopped between two looks: one the drain need not pause or wait for
        (its agent, told to stop by whoever stopped it, drains itself), until the answer would
        end the drain or a forced stop must reach its agent. So ``ListTasks(STOPPED)`` is read
        too when ``exact`` (a forced stop), whenever the answer would hold no live task but
        daemons (the drain would end on it: that answer is always exact), and when this
        adapter's last full look is older than :attr:`full_listing_every` (never, as built).
        Tasks seen STOPPED are never described again (STOPPED is final), nor are those an event
        said are STOPPED (:meth:`saw_stopped`).

        ``known``: the tasks as a look elsewhere left them (a drain record's: a step in
        another Lambda container), the last look when this adapter has none of its own.
        """
        look = self._plan(container_instance_arn, known, exact)
        return self._answer(look, self._describe(look.ci, look.to_describe))

    def tasks_on_many(self, container_instance_arns: Sequence[str]) -> dict[str, list[TaskInfo]]:
        """:meth:`tasks_on` (not ``exact``, nothing ``known``) of several container instances
        at once: a ``ListTasks`` each, and the tasks to describe of all of them in shared
        ``DescribeTasks`` calls (100 ARNs a call, across instances), where one instance at a
        time takes one call each."""
        looks = [self._plan(ci, (), False) for ci in dict.fromkeys(container_instance_arns)]
        by_ci = self._describe_on([(look.ci, arn) for look in looks for arn in look.to_describe])
        return {look.ci: self._answer(look, by_ci.get(look.ci, [])) for look in looks}

    def _plan(self, ci: str, known: Sequence[TaskInfo], exact: bool) -> _Look:
        """A look's listings of ``ci`` (what :meth:`tasks_on` reads before it describes)."""
        now = self._clock()
        seen = self._seen.pop(ci, None)
        if seen is None and known:
            seen = self._seeded(known, now)
        full = exact or (seen is not None and now - seen.full_at >= self.full_listing_every)
        known_stopped = set(seen.stopped) if seen else set()
        known_stopped |= self._told_stopped.pop(ci, set())
        known_live = seen.live if seen else {}
        running = self._list_tasks(ci, "RUNNING")
        wanted = _unique(running, known_live)
        if full:
            wanted = _unique(wanted, self._list_tasks(ci, "STOPPED"))
        again = [{**known_live[a], "desiredStatus": "RUNNING"} for a in running if a in known_live]
        reused = {t["taskArn"] for t in again}
        return _Look(
            ci=ci,
            now=now,
            seen=seen,
            full=full,
            known_stopped=known_stopped,
            again=again,
            to_describe=[a for a in wanted if a not in known_stopped and a not in reused],
        )

    def _answer(self, look: _Look, described_now: list[dict[str, Any]]) -> list[TaskInfo]:
        """The answer of a look whose tasks to describe were described (``described_now``)."""
        ci, seen, full, known_stopped = look.ci, look.seen, look.full, look.known_stopped
        described = look.again + described_now
        live = [t for t in described if t.get("lastStatus") != "STOPPED"]
        daemons = self._daemons_of(live)
        if not full and all(_service(t) in daemons for t in live):
            # Nothing would be left to wait for: make sure with the listing of stopping tasks.
            full = True
            done = {t["taskArn"] for t in described}
            more = [
                a
                for a in self._list_tasks(ci, "STOPPED")
                if a not in done and a not in known_stopped
            ]
            extra = self._describe(ci, more)
            described += extra
            live += [t for t in extra if t.get("lastStatus") != "STOPPED"]
            daemons = self._daemons_of(live)
        known_stopped.update(t["taskArn"] for t in described if t.get("lastStatus") == "STOPPED")
        self._remember(
            ci,
            _Seen(
                live={t["taskArn"]: t for t in live},
                stopped=known_stopped,
                full_at=look.now if full else (seen.full_at if seen else look.now),
            ),
        )
        return [
            TaskInfo(
                arn=t["taskArn"],
                group=t.get("group", ""),
                last_status=t.get("lastStatus", ""),
                desired_status=t.get("desiredStatus", ""),
                daemon=_service(t) in daemons,
            )
            for t in live
        ]

    def _seeded(self, known: Sequence[TaskInfo], now: float) -> _Seen:
        """A last look made of ``known`` (a first look as to the STOPPED listing: its time is
        not known). Their services' scheduling strategy is taken as they say (it cannot be
        changed once a service is made)."""
        for task in known:
            service = _service({"group": task.group})
            if service is not None:
                self._daemon.setdefault(service, task.daemon)
        return _Seen(
            live={
                t.arn: {
                    "taskArn": t.arn,
                    "group": t.group,
                    "lastStatus": t.last_status,
                    "desiredStatus": t.desired_status,
                }
                for t in known
            },
            stopped=set(),
            full_at=now,
        )

    def _list_tasks(self, ci: str, desired: str) -> list[str]:
        arns: list[str] = []
        token: str | None = None
        while True:
            page = self._call(
                "ListTasks",
                self._ecs.list_tasks,
                containerInstance=ci,
                desiredStatus=desired,
                **({"nextToken": token} if token else {}),
            )
            arns.extend(page.get("taskArns", []))
            token = page.get("nextToken")
            if not token:
                return arns

    def _describe(self, ci: str, arns: list[str]) -> list[dict[str, Any]]:
        """The tasks of ``arns`` on ``ci`` (100 a call; a task ECS no longer knows is left
        out)."""
        return self._describe_on([(ci, arn) for arn in arns]).get(ci, [])

    def _describe_on(self, wanted: list[tuple[str, str]]) -> dict[str, list[dict[str, Any]]]:
        """The tasks of ``wanted`` ((container instance, task ARN) pairs), by container
        instance: 100 ARNs a ``DescribeTasks`` call, across instances; a task ECS no longer
        knows, or found on another instance, is left out."""
        by_ci: dict[str, list[dict[str, Any]]] = {}
        for batch in _chunks(wanted, 100):
            owner = dict((arn, ci) for ci, arn in batch)
            out = self._call(
                "DescribeTasks", self._ecs.describe_tasks, tasks=[arn for _, arn in batch]
            )
            for task in out.get("tasks", []):
                ci = owner.get(task.get("taskArn", ""))
                if ci is not None and task.get("containerInstanceArn", ci) == ci:
                    by_ci.setdefault(ci, []).append(task)
        return by_ci

    def _daemons_of(self, tasks: list[dict[str, Any]]) -> set[str]:
        """The DAEMON services among these tasks' services."""
        return self._daemon_services({s for t in tasks if (s := _service(t)) is not None})

    def _remember(self, ci: str, seen: _Seen) -> None:
        _keep(self._seen, ci, seen)

    def _daemon_services(self, services: set[str]) -> set[str]:
        unknown = sorted(s for s in services if s not in self._daemon)
        for batch in _chunks(unknown, 10):
            out = self._call("DescribeServices", self._ecs.describe_services, services=batch)
            for svc in out.get("services", []):
                self._daemon[svc["serviceName"]] = svc.get("schedulingStrategy") == "DAEMON"
            for name in batch:
                self._daemon.setdefault(name, False)
        return {s for s in services if self._daemon.get(s)}

    def stop_task(self, task_arn: str, reason: str) -> None:
        self._call("StopTask", self._ecs.stop_task, task=task_arn, reason=reason[:255])

    def protected(self, task_arns: list[str]) -> set[str]:
        """The tasks whose scale-in protection is on now (GetTaskProtection, 10 at a time)."""
        now = self._clock()
        on: set[str] = set()
        for batch in _chunks(task_arns, 10):
            out = self._call("GetTaskProtection", self._ecs.get_task_protection, tasks=batch)
            for p in out.get("protectedTasks", []):
                if not p.get("protectionEnabled"):
                    continue
                expires = p.get("expirationDate")
                if isinstance(expires, datetime) and expires.timestamp() <= now:
                    continue
                on.add(p["taskArn"])
        return on
