"""A step's reads of the world, kept for the step's whole life (:mod:`~fleetdrain.controller.
drain.core` looks before it claims the drain record).

A step first looks (ECS tasks, the coordinator's agents, task protection) without holding the
record; most steps of a long drain find nothing to do but wait, and those save once. A step
that must act claims the record and then acts on what it looked at: the reads are not asked
again. Only reads are kept; every action (DRAINING, StopTask, pause, stop) goes to the port
behind.

Invariant: a kept answer never outlives the step that asked (a new :class:`Looked` each step,
each retry of a step), so nothing here is older than the claim that follows it by more than
the few calls of one look.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from fleetdrain.controller.drain.ports import (
    AgentView,
    ContainerInstance,
    CoordinatorPort,
    EcsPort,
    TaskInfo,
)


class LookedFleet:
    """:class:`~fleetdrain.controller.drain.ports.EcsPort` whose reads are asked once."""

    def __init__(self, fleet: EcsPort) -> None:
        self.behind = fleet
        self._instances: dict[str, ContainerInstance | None] = {}
        #: Container instance -> (read exactly, its tasks).
        self._tasks: dict[str, tuple[bool, list[TaskInfo]]] = {}
        self._protected: dict[tuple[str, ...], set[str]] = {}

    def find_container_instance(self, instance_id: str) -> ContainerInstance | None:
        if instance_id not in self._instances:
            self._instances[instance_id] = self.behind.find_container_instance(instance_id)
        return self._instances[instance_id]

    def tasks_on(
        self, container_instance_arn: str, known: Sequence[TaskInfo] = (), exact: bool = False
    ) -> list[TaskInfo]:
        kept = self._tasks.get(container_instance_arn)
        if kept is None or (exact and not kept[0]):
            kept = (exact, self.behind.tasks_on(container_instance_arn, known, exact=exact))
            self._tasks[container_instance_arn] = kept
        return list(kept[1])

    def protected(self, task_arns: list[str]) -> set[str]:
        key = tuple(task_arns)
        if key not in self._protected:
            self._protected[key] = self.behind.protected(task_arns)
        return set(self._protected[key])

    def saw_stopped(self, container_instance_arn: str, task_arn: str) -> None:
        self.behind.saw_stopped(container_instance_arn, task_arn)

    def set_draining(self, arn: str) -> None:
        self.behind.set_draining(arn)

    def stop_task(self, task_arn: str, reason: str) -> None:
        self.behind.stop_task(task_arn, reason)


class LookedCoordinator:
    """:class:`~fleetdrain.controller.drain.ports.CoordinatorPort` whose reads are asked once."""

    def __init__(self, coordinator: CoordinatorPort) -> None:
        self.behind = coordinator
        self.last_pages = coordinator.last_pages
        self._listings: dict[tuple[str, ...], tuple[list[AgentView], int]] = {}
        self._agents: dict[str, AgentView | None] = {}

    def agents_for(self, task_arns: Iterable[str]) -> list[AgentView]:
        key = tuple(task_arns)
        if key not in self._listings:
            agents = self.behind.agents_for(key)
            self._listings[key] = (agents, self.behind.last_pages)
        agents, self.last_pages = self._listings[key]
        return list(agents)

    def listing_cost(self, known_pages: int, asker: str) -> int:
        return self.behind.listing_cost(known_pages, asker)

    def agent(self, agent_id: str) -> AgentView | None:
        if agent_id not in self._agents:
            self._agents[agent_id] = self.behind.agent(agent_id)
        return self._agents[agent_id]

    def pause(self, agent_id: str, note: str, timeout_minutes: int) -> bool:
        return self.behind.pause(agent_id, note, timeout_minutes)

    def stop(self, agent_id: str, force: bool) -> bool:
        return self.behind.stop(agent_id, force)
