"""The drain store on DynamoDB: one item per EC2 instance, written with conditions (the record
itself, :class:`~fleetdrain.controller.drain.ports.DrainRecord`, is the core's).

Items (one table, string key ``pk``):

- ``drain#<instance-id>``: the record. ``doc`` holds it as JSON; ``version`` is the optimistic
  lock (every write is conditional on the version read); ``phase`` is there for listing; ``ttl``
  (epoch seconds) lets DynamoDB expire it a while after its last change; ``lease_id`` and
  ``lease_until``, while a step holds the record, mirror the doc's, so that
  :meth:`DynamoDrainStore.claim` can claim in one ``UpdateItem`` (they win over the doc's: a
  claim writes them alone).
- ``ci#<container-instance-arn>``: points at the instance, so that an ECS task event (which
  names the container instance, not the EC2 instance) finds its drain with one strongly
  consistent read. Written in the same transaction as the save of the drain's first step.
- ``agents#<cluster>``: the cluster's agents as the last listing of the organization saw them,
  shared by every drain (:class:`DynamoListingCache`, for ``shared_listing``): ``doc`` the
  agents as compact JSON rows, ``fetched_at`` and ``pages``, and ``refresh_until`` while a
  container refreshes it.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

from botocore.exceptions import ClientError
from pydantic import TypeAdapter

from fleetdrain.controller.drain.aws_errors import error_code, reraise_retryable
from fleetdrain.controller.drain.errors import Conflict, Retryable
from fleetdrain.controller.drain.ports import AgentView, DrainRecord
from fleetdrain.controller.drain.shared_listing import AgentListing

#: Container instance links one store remembers (the oldest is forgotten first).
MAX_LINKS = 4096
#: A listing bigger than this is not stored (DynamoDB's item limit is 400 KB).
MAX_LISTING_BYTES = 350_000
#: A transaction cancelled for one of these lost a race (another write came first).
_LOST_RACE = frozenset({"ConditionalCheckFailed", "TransactionConflict"})
#: ... and for one of these, throttled (a cancelled transaction says so per item).
_THROTTLED = frozenset({"ThrottlingError", "ProvisionedThroughputExceeded", "RequestLimitExceeded"})

#: The record's JSON form (``doc``): pydantic validates what is read (types, phases; unknown
#: fields are ignored, so an older controller reads a newer one's records).
_RECORD = TypeAdapter(DrainRecord)


def record_to_doc(record: DrainRecord) -> str:
    """The record as the JSON an item's ``doc`` holds."""
    return _RECORD.dump_json(record).decode()


def record_from_doc(doc: str) -> DrainRecord:
    """The record in an item's ``doc`` (a pydantic ``ValidationError`` if it is not one)."""
    return _RECORD.validate_json(doc)


def record_from_item(item: dict[str, Any]) -> DrainRecord:
    """The record of a ``drain#`` item, at the item's version."""
    record = record_from_doc(item["doc"]["S"])
    record.version = int(item["version"]["N"])
    if "lease_id" in item:
        record.lease_id = str(item["lease_id"]["S"])
        record.lease_until = float(item["lease_until"]["N"])
    return record


class DynamoDrainStore:
    """:class:`~fleetdrain.controller.drain.ports.DrainStorePort` on a DynamoDB table (low-level
    client; strongly consistent reads)."""

    def __init__(
        self, client: Any, table: str, clock: Callable[[], float], ttl_seconds: float
    ) -> None:
        self._ddb = client
        self._table = table
        self._clock = clock
        self._ttl = ttl_seconds
        #: Links seen (a container instance is one EC2 instance for its whole life, so a link
        #: never changes: every task event after the first costs no read in this container).
        self._links: dict[str, str] = {}

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
        return record_from_item(item) if item else None

    def _item(self, record: DrainRecord, version: int) -> dict[str, Any]:
        doc = dataclasses.replace(record, version=version)
        item = {
            "pk": {"S": f"drain#{record.instance_id}"},
            "version": {"N": str(version)},
            "phase": {"S": record.phase},
            "drain_id": {"S": record.drain_id},
            "ttl": {"N": str(int(self._clock() + self._ttl))},
            "doc": {"S": record_to_doc(doc)},
        }
        if record.tick_id is not None:
            item["tick_id"] = {"S": record.tick_id}
        if record.lease_id is not None:
            item["lease_id"] = {"S": record.lease_id}
            item["lease_until"] = {"N": repr(record.lease_until or 0.0)}
        return item

    def claim(
        self, instance_id: str, lease_id: str, lease_until: float, now: float
    ) -> tuple[DrainRecord | None, bool]:
        """Claim the record in one ``UpdateItem``; its answer is the read, whether the claim
        took or not (``ReturnValuesOnConditionCheckFailure``)."""
        try:
            out = self._call(
                "UpdateItem",
                self._ddb.update_item,
                Key={"pk": {"S": f"drain#{instance_id}"}},
                UpdateExpression="SET #v = #v + :one, lease_id = :id, lease_until = :until",
                ConditionExpression=(
                    "attribute_exists(pk) AND #p <> :done"
                    " AND (attribute_not_exists(lease_until) OR lease_until <= :now)"
                ),
                ExpressionAttributeNames={"#v": "version", "#p": "phase"},
                ExpressionAttributeValues={
                    ":one": {"N": "1"},
                    ":id": {"S": lease_id},
                    ":until": {"N": repr(lease_until)},
                    ":done": {"S": "done"},
                    ":now": {"N": repr(now)},
                },
                ReturnValues="ALL_NEW",
                ReturnValuesOnConditionCheckFailure="ALL_OLD",
            )
        except Conflict as lost:
            # The refusal carries the record as it is (its ClientError's response).
            refused = lost.__cause__
            item = refused.response.get("Item") if isinstance(refused, ClientError) else None
            return (record_from_item(item) if item else None), False
        return record_from_item(out["Attributes"]), True

    def create(self, record: DrainRecord, link: str | None = None) -> DrainRecord:
        put = {"Item": self._item(record, 1), "ConditionExpression": "attribute_not_exists(pk)"}
        if link is None:
            self._call("PutItem", self._ddb.put_item, **put)
        else:
            # As save's: one write for the record and its link.
            self._remember_link(link, record.instance_id)
            self._transact(
                [
                    {"Put": {"TableName": self._table, **put}},
                    {"Put": {"TableName": self._table, "Item": self._link_item(link, record)}},
                ]
            )
        return dataclasses.replace(record, version=1)

    def save(
        self, record: DrainRecord, link: str | None = None, expect_tick: str | None = None
    ) -> DrainRecord:
        values: dict[str, Any] = {":v": {"N": str(record.version)}}
        condition = "version = :v"
        if expect_tick is not None:
            condition += " AND tick_id = :t"
            values[":t"] = {"S": expect_tick}
        put = {
            "Item": self._item(record, record.version + 1),
            "ConditionExpression": condition,
            "ExpressionAttributeValues": values,
        }
        if link is None:
            self._call("PutItem", self._ddb.put_item, **put)
        else:
            # One write for both: the link costs no call of its own (Put in a transaction is
            # authorised as PutItem).
            self._remember_link(link, record.instance_id)
            self._transact(
                [
                    {"Put": {"TableName": self._table, **put}},
                    {"Put": {"TableName": self._table, "Item": self._link_item(link, record)}},
                ]
            )
        return dataclasses.replace(record, version=record.version + 1)

    def _transact(self, items: list[dict[str, Any]]) -> None:
        try:
            self._ddb.transact_write_items(TransactItems=items)
        except ClientError as exc:
            code = error_code(exc)
            reasons = exc.response.get("CancellationReasons") or []
            if code == "TransactionConflictException" or (
                code == "TransactionCanceledException"
                and any(r.get("Code") in _LOST_RACE for r in reasons)
            ):
                raise Conflict("TransactWriteItems") from exc
            if any(r.get("Code") in _THROTTLED for r in reasons):
                raise Retryable(f"DynamoDB TransactWriteItems: {exc}") from exc
            reraise_retryable(exc, "DynamoDB TransactWriteItems")
            raise

    def _remember_link(self, container_instance_arn: str, instance_id: str) -> None:
        self._links[container_instance_arn] = instance_id
        while len(self._links) > MAX_LINKS:
            self._links.pop(next(iter(self._links)))

    def _link_item(self, container_instance_arn: str, record: DrainRecord) -> dict[str, Any]:
        return {
            "pk": {"S": f"ci#{container_instance_arn}"},
            "instance_id": {"S": record.instance_id},
            "ttl": {"N": str(int(self._clock() + self._ttl))},
        }

    def learn_link(self, container_instance_arn: str, instance_id: str) -> None:
        self._remember_link(container_instance_arn, instance_id)

    def instance_for(self, container_instance_arn: str) -> str | None:
        known = self._links.get(container_instance_arn)
        if known is not None:
            return known
        out = self._call(
            "GetItem",
            self._ddb.get_item,
            Key={"pk": {"S": f"ci#{container_instance_arn}"}},
            ConsistentRead=True,
        )
        item = out.get("Item")
        if not item:
            return None  # not remembered: a link may come later
        found = str(item["instance_id"]["S"])
        self._remember_link(container_instance_arn, found)
        return found

    def in_flight(self) -> list[DrainRecord]:
        """Drains not done yet (a scan: for ``fleetdrain status``, not for the hot path)."""
        records: list[DrainRecord] = []
        kwargs: dict[str, Any] = {
            "FilterExpression": "begins_with(pk, :p) AND phase <> :done",
            "ExpressionAttributeValues": {":p": {"S": "drain#"}, ":done": {"S": "done"}},
        }
        while True:
            out = self._call("Scan", self._ddb.scan, **kwargs)
            records.extend(record_from_item(item) for item in out.get("Items", []))
            if "LastEvaluatedKey" not in out:
                return records
            kwargs["ExclusiveStartKey"] = out["LastEvaluatedKey"]


class DynamoListingCache:
    """:class:`~fleetdrain.controller.drain.shared_listing.ListingCachePort` on the drain
    table: the ``agents#<cluster>`` item."""

    def __init__(
        self, client: Any, table: str, cluster: str, clock: Callable[[], float], ttl: float
    ) -> None:
        self._store = DynamoDrainStore(client, table, clock, ttl)
        self._ddb = client
        self._key = {"pk": {"S": f"agents#{cluster}"}}
        self._clock = clock
        self._ttl = ttl

    def get(self) -> AgentListing | None:
        out = self._store._call("GetItem", self._ddb.get_item, Key=self._key, ConsistentRead=True)
        item = out.get("Item")
        if not item or "doc" not in item:
            return None
        try:
            rows = json.loads(item["doc"]["S"])
            agents = tuple(
                AgentView(
                    id=r[0],
                    name=r[1],
                    task_arn=r[2],
                    connection_state=r[3],
                    job_id=r[4],
                    job_state=r[5],
                    paused=bool(r[6]),
                )
                for r in rows
            )
            return AgentListing(agents, float(item["fetched_at"]["N"]), int(item["pages"]["N"]))
        except (KeyError, IndexError, TypeError, ValueError):
            return None  # not one we wrote: the next refresh replaces it

    def claim(self, now: float, until: float) -> bool:
        try:
            self._store._call(
                "UpdateItem",
                self._ddb.update_item,
                Key=self._key,
                UpdateExpression="SET refresh_until = :until, #ttl = :ttl",
                ConditionExpression="attribute_not_exists(refresh_until) OR refresh_until < :now",
                ExpressionAttributeNames={"#ttl": "ttl"},
                ExpressionAttributeValues={
                    ":until": {"N": repr(until)},
                    ":now": {"N": repr(now)},
                    ":ttl": {"N": str(int(self._clock() + self._ttl))},
                },
            )
        except Conflict:
            return False
        return True

    def put(self, listing: AgentListing) -> None:
        rows = [
            [a.id, a.name[:64], a.task_arn, a.connection_state, a.job_id, a.job_state, a.paused]
            for a in listing.agents
        ]
        doc = json.dumps(rows, separators=(",", ":"))
        if len(doc) > MAX_LISTING_BYTES:
            raise ValueError(
                f"{len(listing.agents)} agents ({len(doc)} bytes) do not fit in one item"
            )
        self._store._call(
            "PutItem",
            self._ddb.put_item,
            Item={
                **self._key,
                "doc": {"S": doc},
                "fetched_at": {"N": repr(listing.fetched_at)},
                "pages": {"N": str(listing.pages)},
                "ttl": {"N": str(int(self._clock() + self._ttl))},
            },
            ConditionExpression="attribute_not_exists(fetched_at) OR fetched_at < :f",
            ExpressionAttributeValues={":f": {"N": repr(listing.fetched_at)}},
        )


def record_json(record: DrainRecord) -> dict[str, Any]:
    """The record as plain JSON (for logs and status output)."""
    return dict(json.loads(record_to_doc(record)))
