"""``fleetdrain status``: the drains in flight, read from the controller's drain table.

Reads with :meth:`fleetdrain.controller.drain.state.DynamoDrainStore.in_flight` (a scan; this is an
operator's command, not the hot path). The client is plain boto3, so the region, credentials
and endpoint come from wherever boto3 takes them (``AWS_REGION``, ``AWS_PROFILE``,
``AWS_ENDPOINT_URL`` for a moto server or LocalStack), with ``--region`` on top.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import IO, Any

from pydantic import BaseModel, ValidationError

from fleetdrain.controller.drain.ports import DrainRecord


class StatusError(Exception):
    """The table could not be read; the message is one line for the operator."""


class DrainStatus(BaseModel):
    """One drain as ``fleetdrain status`` shows it (``--json`` prints a list of these)."""

    instance_id: str
    drain_id: str
    cluster: str
    phase: str
    reasons: list[str]
    started_at: str
    age_seconds: float
    force_at: str | None
    forces_in_seconds: float | None
    spot_deadline: str | None
    forced: bool
    fallback: bool
    agents_paused: int
    agents_stopped: int
    tasks_stopped: int
    jobs_force_cancelled: int
    hook: str
    hook_heartbeat_age_seconds: float | None
    #: Non-daemon tasks still on the instance, and those of them busy (task scale-in protection
    #: on: the agent holds it exactly while it works). None when ECS was not asked.
    tasks_left: int | None = None
    tasks_busy: int | None = None
    #: The instance's drain episode (1: its first; a later event that needed action started
    #: each next one), how the episode ended (with ``--all``), and a scheduled change's start.
    episode: int = 1
    outcome: str | None = None
    maintenance_at: str | None = None


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


def drain_status(record: DrainRecord, now: float, load: TaskLoad | None = None) -> DrainStatus:
    """What an operator needs to know about one drain record, at ``now`` (epoch seconds)."""
    hook: str = record.lifecycle_state
    if record.hook_name:
        hook = f"{record.lifecycle_state} ({record.asg_name}/{record.hook_name})"
    if record.other_tokens:
        hook += f" + {len(record.other_tokens)} other token(s) answered"
    return DrainStatus(
        instance_id=record.instance_id,
        drain_id=record.drain_id,
        cluster=record.cluster,
        phase=record.phase,
        reasons=list(record.reasons),
        started_at=_iso(record.started_at) or "",
        age_seconds=round(now - record.started_at, 1),
        force_at=_iso(record.force_at),
        forces_in_seconds=None if record.force_at is None else round(record.force_at - now, 1),
        spot_deadline=_iso(record.spot_deadline),
        forced=record.forced_at is not None,
        fallback=record.fallback,
        agents_paused=len(record.paused_agents),
        agents_stopped=len(record.stopped_agents),
        tasks_stopped=len(record.stopped_tasks),
        jobs_force_cancelled=record.jobs_force_cancelled,
        hook=hook,
        hook_heartbeat_age_seconds=(
            None if record.last_heartbeat_at is None else round(now - record.last_heartbeat_at, 1)
        ),
        tasks_left=None if load is None else load.left,
        tasks_busy=None if load is None else load.busy,
        episode=record.episode,
        outcome=record.outcome,
        maintenance_at=_iso(record.maintenance_at),
    )


@dataclass(frozen=True)
class TaskLoad:
    """What is still running on a draining instance."""

    left: int
    busy: int


def task_load(ecs: Any, record: DrainRecord) -> TaskLoad | None:
    """Tasks left on the drain's container instance and how many are busy (None if unknown).

    Uses the controller's own ECS view (:class:`fleetdrain.controller.drain.ecs_fleet.EcsFleet`):
    the same tasks, the same daemon rule and the same busy flag (task scale-in protection) it drains
    by.
    """
    from botocore.exceptions import BotoCoreError, ClientError

    from fleetdrain.controller.drain.ecs_fleet import EcsFleet
    from fleetdrain.controller.drain.errors import Retryable

    if not record.container_instance_arn:
        return None
    fleet = EcsFleet(ecs, record.cluster, time.time)
    try:
        tasks = [t for t in fleet.tasks_on(record.container_instance_arn) if not t.daemon]
        busy = fleet.protected([t.arn for t in tasks]) if tasks else set()
    except (ClientError, BotoCoreError, Retryable):
        return None
    return TaskLoad(left=len(tasks), busy=len(busy))


def read_drains(client: Any, table: str, *, include_done: bool = False) -> list[DrainRecord]:
    """Drain records from ``table``: those in flight (or every one with ``include_done``)."""
    from botocore.exceptions import BotoCoreError, ClientError

    from fleetdrain.controller.drain.state import DynamoDrainStore, record_from_item

    store = DynamoDrainStore(client, table, clock=time.time, ttl_seconds=0)
    try:
        if not include_done:
            return sorted(store.in_flight(), key=lambda r: r.started_at)
        records = []
        kwargs: dict[str, Any] = {
            "TableName": table,
            "FilterExpression": "begins_with(pk, :p)",
            "ExpressionAttributeValues": {":p": {"S": "drain#"}},
        }
        while True:
            out = client.scan(**kwargs)
            for item in out.get("Items", []):
                records.append(record_from_item(item))
            if "LastEvaluatedKey" not in out:
                return sorted(records, key=lambda r: r.started_at)
            kwargs["ExclusiveStartKey"] = out["LastEvaluatedKey"]
    except ClientError as exc:
        error = exc.response.get("Error", {})
        code, message = error.get("Code", "?"), error.get("Message", "")
        if code == "ResourceNotFoundException":
            raise StatusError(f"drain table {table!r} not found ({message})") from None
        raise StatusError(f"reading drain table {table!r}: {code}: {message}") from None
    except BotoCoreError as exc:
        raise StatusError(f"reading drain table {table!r}: {exc}") from None
    except (ValidationError, KeyError, ValueError) as exc:
        # A foreign or half-written item must be one clear line, not a traceback.
        first = str(exc).splitlines()[0]
        raise StatusError(f"drain table {table!r} holds an unreadable record: {first}") from None


def _client(service: str, region: str | None) -> Any:
    try:
        import boto3
        from botocore.exceptions import BotoCoreError
    except ImportError:
        raise StatusError("boto3 is not installed: pip install 'fleetdrain[controller]'") from None
    try:
        return boto3.client(service, region_name=region)
    except BotoCoreError as exc:
        raise StatusError(f"AWS client: {exc}") from None


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    sign = "-" if seconds < 0 else ""
    s = abs(int(seconds))
    if s >= 3600:
        return f"{sign}{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{sign}{s // 60}m{s % 60:02d}s"
    return f"{sign}{s}s"


def print_status(drains: list[DrainStatus], table_name: str, out: IO[str]) -> None:
    """The drains as a table (``out`` is a terminal or a log: 120 columns when piped)."""
    from rich.table import Table

    from fleetdrain.drill.report.terminal import make_console

    console = make_console(out)
    if not drains:
        console.print(f"no drains in flight in {table_name}")
        return
    table = Table(title=f"drains in flight ({table_name})", title_justify="left")
    for column in (
        "instance",
        "phase",
        "reasons",
        "started",
        "age",
        "forces in",
        "agents paused/stopped",
        "tasks busy/left",
        "hook",
    ):
        table.add_column(column, no_wrap=column not in ("reasons", "hook"))
    for d in drains:
        forces = _age(d.forces_in_seconds)
        if d.forced:
            forces = "forced"
        elif d.spot_deadline:
            forces += " (spot)"
        elif d.maintenance_at:
            forces += " (scheduled change)"
        table.add_row(
            d.instance_id,
            d.phase
            + (" (fallback)" if d.fallback else "")
            + (f" (episode {d.episode})" if d.episode > 1 else ""),
            ", ".join(d.reasons),
            d.started_at,
            _age(d.age_seconds),
            forces,
            f"{d.agents_paused}/{d.agents_stopped}",
            "?" if d.tasks_left is None else f"{d.tasks_busy}/{d.tasks_left}",
            d.hook
            + (
                f", heartbeat {_age(d.hook_heartbeat_age_seconds)} ago"
                if d.hook_heartbeat_age_seconds is not None
                else ""
            ),
        )
    console.print(table)


def run_status(
    ns: argparse.Namespace,
    *,
    client: Any = None,
    ecs: Any = None,
    clock: Callable[[], float] = time.time,
    out: IO[str] | None = None,
) -> int:
    """``fleetdrain status``: print the drains in flight; 0, or 2 with one line on error."""
    stream = out if out is not None else sys.stdout
    if not ns.table:
        print("fleetdrain: error: --table (or $FLEETDRAIN_TABLE) is required", file=sys.stderr)
        return 2
    try:
        ddb = client if client is not None else _client("dynamodb", ns.region)
        records = read_drains(ddb, ns.table, include_done=ns.all)
        if ns.ecs and ecs is None and any(r.phase != "done" for r in records):
            ecs = _client("ecs", ns.region)
    except StatusError as exc:
        print(f"fleetdrain: error: {exc}", file=sys.stderr)
        return 2
    now = clock()
    drains = [
        drain_status(r, now, task_load(ecs, r) if ns.ecs and r.phase != "done" else None)
        for r in records
    ]
    if ns.json:
        json.dump([d.model_dump() for d in drains], stream, indent=2)
        stream.write("\n")
    else:
        print_status(drains, ns.table, stream)
    return 0
