"""What the drain asks of ECS: the container instance of an EC2 instance, its tasks, DRAINING,
StopTask, and task scale-in protection (the coordinator-free busy flag).

Every call goes through one boto3 ECS client (adaptive retry mode, set up by the caller);
what the retries gave up on and is worth another try comes out as :class:`Retryable`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from typing import Any, TypeVar

from botocore.exceptions import BotoCoreError, ClientError

from fleetdrain.controller.drain.aws_errors import reraise_retryable
from fleetdrain.controller.drain.ports import ContainerInstance, TaskInfo

T = TypeVar("T")


def _chunks(items: list[T], size: int) -> Iterator[list[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class EcsFleet:
    """:class:`~fleetdrain.controller.drain.ports.EcsPort`: ECS calls for one cluster."""

    def __init__(self, client: Any, cluster: str, clock: Callable[[], float]) -> None:
        self._ecs = client
        self.cluster = cluster
        self._clock = clock
        self._daemon: dict[str, bool] = {}

    def _call(self, what: str, fn: Callable[..., Any], **kwargs: Any) -> Any:
        try:
            return fn(cluster=self.cluster, **kwargs)
        except (ClientError, BotoCoreError) as exc:
            reraise_retryable(exc, f"ECS {what}")
            raise

    # ------------------------------------------------------------------ container instance

    def find_container_instance(self, instance_id: str) -> ContainerInstance | None:
        """The container instance on EC2 instance ``instance_id``, or None if not in the cluster.

        Asks with the ``ec2InstanceId ==`` filter first but believes only what
        DescribeContainerInstances says (the filter is cluster query language, and not every
        implementation honours it); if that finds nothing, pages through every container
        instance of the cluster.
        """
        arns = self._list_instances(filter=f"ec2InstanceId == {instance_id}")
        found = self._match(arns, instance_id)
        if found is None:
            found = self._match(self._list_instances(), instance_id, skip=set(arns))
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

    def _match(
        self, arns: list[str], instance_id: str, skip: Iterable[str] = ()
    ) -> ContainerInstance | None:
        skipped = set(skip)
        todo = [a for a in arns if a not in skipped]
        for batch in _chunks(todo, 100):
            out = self._call(
                "DescribeContainerInstances",
                self._ecs.describe_container_instances,
                containerInstances=batch,
            )
            for ci in out.get("containerInstances", []):
                if ci.get("ec2InstanceId") == instance_id:
                    return ContainerInstance(
                        ci["containerInstanceArn"], instance_id, ci.get("status", "")
                    )
        return None

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
        out = self._call(
            "UpdateContainerInstancesState",
            self._ecs.update_container_instances_state,
            containerInstances=[arn],
            status="DRAINING",
        )
        failures = out.get("failures") or []
        if failures:
            reason = failures[0].get("reason", "unknown")
            raise RuntimeError(f"UpdateContainerInstancesState DRAINING failed: {reason}")

    # ------------------------------------------------------------------ tasks

    def tasks_on(self, container_instance_arn: str) -> list[TaskInfo]:
        """Tasks on the container instance that have not stopped yet (stopping ones too)."""
        arns: list[str] = []
        for desired in ("RUNNING", "STOPPED"):
            token: str | None = None
            while True:
                page = self._call(
                    "ListTasks",
                    self._ecs.list_tasks,
                    containerInstance=container_instance_arn,
                    desiredStatus=desired,
                    **({"nextToken": token} if token else {}),
                )
                arns.extend(a for a in page.get("taskArns", []) if a not in arns)
                token = page.get("nextToken")
                if not token:
                    break
        described: list[dict[str, Any]] = []
        for batch in _chunks(arns, 100):
            out = self._call("DescribeTasks", self._ecs.describe_tasks, tasks=batch)
            described.extend(out.get("tasks", []))
        live = [
            t
            for t in described
            if t.get("lastStatus") != "STOPPED"
            and t.get("containerInstanceArn", container_instance_arn) == container_instance_arn
        ]
        daemons = self._daemon_services(
            {t["group"].split(":", 1)[1] for t in live if t.get("group", "").startswith("service:")}
        )
        return [
            TaskInfo(
                arn=t["taskArn"],
                group=t.get("group", ""),
                last_status=t.get("lastStatus", ""),
                desired_status=t.get("desiredStatus", ""),
                daemon=t.get("group", "").removeprefix("service:") in daemons
                and t.get("group", "").startswith("service:"),
            )
            for t in live
        ]

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
