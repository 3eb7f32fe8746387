"""Delayed SQS messages of our own that wake a drain up (the safety net under events).

A tick carries the drain record as the step that sent it saved it (its version included): the
step the tick wakes takes it as read, and its writes, conditional on that version as every
write is, find out if anything wrote the record since (a Conflict, and then it is read)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from fleetdrain.controller.drain.aws_errors import reraise_retryable
from fleetdrain.controller.drain.events import TICK_KIND
from fleetdrain.controller.drain.ports import DrainRecord, Tick
from fleetdrain.controller.drain.state import record_to_doc

MAX_DELAY = 900  # SQS DelaySeconds ceiling
#: A record bigger than this is not carried (SQS takes 256 KiB a message; a record is a few KB,
#: more only with hundreds of tasks on one instance): the tick's step reads it instead.
MAX_CARRIED = 200_000


def tick_body(
    instance_id: str, drain_id: str, tick_id: str, record: DrainRecord | None = None
) -> str:
    """The message body of a tick (what ``events.parse_message`` reads back)."""
    body: dict[str, Any] = {
        "kind": TICK_KIND,
        "instance_id": instance_id,
        "drain_id": drain_id,
        "tick_id": tick_id,
    }
    if record is not None:
        doc = record_to_doc(record)
        if len(doc.encode()) <= MAX_CARRIED:
            body["record"] = doc
    return json.dumps(body)


def _message(tick: Tick) -> dict[str, Any]:
    """A tick's SQS message: its body and its delay (within the queue's ceiling)."""
    return {
        "MessageBody": tick_body(tick.instance_id, tick.drain_id, tick.tick_id, tick.record),
        "DelaySeconds": max(0, min(MAX_DELAY, int(tick.delay))),
    }


class SqsTicks:
    """:class:`~fleetdrain.controller.drain.ports.TicksPort` on the drain queue."""

    def __init__(self, client: Any, queue_url: str) -> None:
        self._sqs = client
        self._queue_url = queue_url

    def schedule(
        self,
        instance_id: str,
        drain_id: str,
        tick_id: str,
        delay: int,
        record: DrainRecord | None = None,
    ) -> None:
        try:
            self._sqs.send_message(
                QueueUrl=self._queue_url,
                **_message(Tick(instance_id, drain_id, tick_id, delay, record)),
            )
        except (ClientError, BotoCoreError) as exc:
            reraise_retryable(exc, "SQS SendMessage")
            raise

    def schedule_many(self, ticks: Sequence[Tick]) -> set[str]:
        """Several ticks, 10 a ``SendMessageBatch``; the tick ids SQS did not take (a call
        that fails as a whole raises, as :meth:`schedule` does)."""
        failed: set[str] = set()
        for start in range(0, len(ticks), 10):
            batch = ticks[start : start + 10]
            entries = [{"Id": str(n), **_message(t)} for n, t in enumerate(batch)]
            try:
                out = self._sqs.send_message_batch(QueueUrl=self._queue_url, Entries=entries)
            except (ClientError, BotoCoreError) as exc:
                reraise_retryable(exc, "SQS SendMessageBatch")
                raise
            failed.update(batch[int(f["Id"])].tick_id for f in out.get("Failed") or [])
        return failed
