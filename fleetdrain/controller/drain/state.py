"""The drain record: one item per EC2 instance in DynamoDB, written with conditions.

Items (one table, string key ``pk``):

- ``drain#<instance-id>``: the record. ``doc`` holds it as JSON; ``version`` is the optimistic
  lock (every write is conditional on the version read); ``phase`` is there for listing; ``ttl``
  (epoch seconds) lets DynamoDB expire it a while after its last change.
- ``ci#<container-instance-arn>``: points at the instance, so that an ECS task event (which
  names the container instance, not the EC2 instance) finds its drain with one strongly
  consistent read.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Literal, Protocol

from botocore.exceptions import ClientError
from pydantic import BaseModel, ConfigDict, Field

from fleetdrain.controller.drain.errors import error_code, reraise_retryable

Phase = Literal["soft", "hard", "done"]
LifecycleState = Literal["none", "pending", "completed", "gone"]

MAX_SEEN_EVENTS = 32


class DrainRecord(BaseModel):
    """Everything a drain knows; see ``core`` for what each phase does with it."""

    model_config = ConfigDict(extra="ignore")

    instance_id: str
    drain_id: str
    cluster: str
    version: int = 0
    phase: Phase = "soft"
    reasons: list[str] = Field(default_factory=list)
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
    agent_ids: dict[str, str] = Field(default_factory=dict)
    #: Pages the last listing of the organization's agents took (its cost in requests).
    listing_pages: int = 0
    paused_agents: list[str] = Field(default_factory=list)
    stopped_agents: list[str] = Field(default_factory=list)
    stopped_tasks: list[str] = Field(default_factory=list)
    draining_at: float | None = None
    forced_at: float | None = None
    fallback: bool = False
    coordinator_down_at: float | None = None
    jobs_force_cancelled: int = 0
    last_task_stopped_at: float | None = None
    completed_at: float | None = None
    outcome: str | None = None
    outcome_reason: str | None = None
    seen_events: list[str] = Field(default_factory=list)
    tick_id: str | None = None
    tick_due: float | None = None
    steps: int = 0
    #: The step that holds the record now (claimed with a conditional write; released by the
    #: step's own save). Only the holder writes until ``lease_until``.
    lease_id: str | None = None
    lease_until: float | None = None

    def leased(self, now: float) -> bool:
        return self.lease_id is not None and (self.lease_until or 0.0) > now

    def saw(self, event_id: str) -> bool:
        return bool(event_id) and event_id in self.seen_events

    def remember(self, event_id: str) -> None:
        if event_id and event_id not in self.seen_events:
            self.seen_events = [*self.seen_events, event_id][-MAX_SEEN_EVENTS:]


class Conflict(Exception):
    """Someone else wrote the record since we read it (or it already exists)."""


class DrainStore(Protocol):
    """Where drain records live."""

    def get(self, instance_id: str) -> DrainRecord | None: ...

    def create(self, record: DrainRecord) -> DrainRecord:
        """Write a new record (Conflict if one exists); returns it at version 1."""
        ...

    def save(self, record: DrainRecord) -> DrainRecord:
        """Write if still at ``record.version`` (Conflict otherwise); returns it one higher."""
        ...

    def link(self, container_instance_arn: str, instance_id: str) -> None: ...

    def instance_for(self, container_instance_arn: str) -> str | None: ...

    def in_flight(self) -> list[DrainRecord]: ...


class DynamoDrainStore:
    """:class:`DrainStore` on a DynamoDB table (low-level client; strongly consistent reads)."""

    def __init__(
        self, client: Any, table: str, clock: Callable[[], float], ttl_seconds: float
    ) -> None:
        self._ddb = client
        self._table = table
        self._clock = clock
        self._ttl = ttl_seconds

    def _call(self, what: str, fn: Callable[..., Any], **kwargs: Any) -> Any:
        try:
            return fn(TableName=self._table, **kwargs)
        except ClientError as exc:
            if error_code(exc) == "ConditionalCheckFailedException":
                raise Conflict(what) from exc
            reraise_retryable(exc, f"DynamoDB {what}")
            raise

    def get(self, instance_id: str) -> DrainRecord | None:
        out = self._call(
            "GetItem",
            self._ddb.get_item,
            Key={"pk": {"S": f"drain#{instance_id}"}},
            ConsistentRead=True,
        )
        item = out.get("Item")
        if not item:
            return None
        record = DrainRecord.model_validate_json(item["doc"]["S"])
        record.version = int(item["version"]["N"])
        return record

    def _item(self, record: DrainRecord, version: int) -> dict[str, Any]:
        doc = record.model_copy(update={"version": version})
        return {
            "pk": {"S": f"drain#{record.instance_id}"},
            "version": {"N": str(version)},
            "phase": {"S": record.phase},
            "drain_id": {"S": record.drain_id},
            "ttl": {"N": str(int(self._clock() + self._ttl))},
            "doc": {"S": doc.model_dump_json()},
        }

    def create(self, record: DrainRecord) -> DrainRecord:
        self._call(
            "PutItem",
            self._ddb.put_item,
            Item=self._item(record, 1),
            ConditionExpression="attribute_not_exists(pk)",
        )
        return record.model_copy(update={"version": 1})

    def save(self, record: DrainRecord) -> DrainRecord:
        self._call(
            "PutItem",
            self._ddb.put_item,
            Item=self._item(record, record.version + 1),
            ConditionExpression="version = :v",
            ExpressionAttributeValues={":v": {"N": str(record.version)}},
        )
        return record.model_copy(update={"version": record.version + 1})

    def link(self, container_instance_arn: str, instance_id: str) -> None:
        self._call(
            "PutItem",
            self._ddb.put_item,
            Item={
                "pk": {"S": f"ci#{container_instance_arn}"},
                "instance_id": {"S": instance_id},
                "ttl": {"N": str(int(self._clock() + self._ttl))},
            },
        )

    def instance_for(self, container_instance_arn: str) -> str | None:
        out = self._call(
            "GetItem",
            self._ddb.get_item,
            Key={"pk": {"S": f"ci#{container_instance_arn}"}},
            ConsistentRead=True,
        )
        item = out.get("Item")
        return str(item["instance_id"]["S"]) if item else None

    def in_flight(self) -> list[DrainRecord]:
        """Drains not done yet (a scan: for ``fleetdrain status``, not for the hot path)."""
        records: list[DrainRecord] = []
        kwargs: dict[str, Any] = {
            "FilterExpression": "begins_with(pk, :p) AND phase <> :done",
            "ExpressionAttributeValues": {":p": {"S": "drain#"}, ":done": {"S": "done"}},
        }
        while True:
            out = self._call("Scan", self._ddb.scan, **kwargs)
            for item in out.get("Items", []):
                record = DrainRecord.model_validate_json(item["doc"]["S"])
                record.version = int(item["version"]["N"])
                records.append(record)
            if "LastEvaluatedKey" not in out:
                return records
            kwargs["ExclusiveStartKey"] = out["LastEvaluatedKey"]


def record_json(record: DrainRecord) -> dict[str, Any]:
    """The record as plain JSON (for logs and status output)."""
    return dict(json.loads(record.model_dump_json()))
