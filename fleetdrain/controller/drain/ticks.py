"""Delayed SQS messages of our own that wake a drain up (the safety net under events)."""

from __future__ import annotations

import json
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from fleetdrain.controller.drain.aws_errors import reraise_retryable
from fleetdrain.controller.drain.events import TICK_KIND

MAX_DELAY = 900  # SQS DelaySeconds ceiling


def tick_body(instance_id: str, drain_id: str, tick_id: str) -> str:
    """The message body of a tick (what ``events.parse_message`` reads back)."""
    return json.dumps(
        {"kind": TICK_KIND, "instance_id": instance_id, "drain_id": drain_id, "tick_id": tick_id}
    )


class SqsTicks:
    """:class:`~fleetdrain.controller.drain.ports.TicksPort` on the drain queue."""

    def __init__(self, client: Any, queue_url: str) -> None:
        self._sqs = client
        self._queue_url = queue_url

    def schedule(self, instance_id: str, drain_id: str, tick_id: str, delay: int) -> None:
        try:
            self._sqs.send_message(
                QueueUrl=self._queue_url,
                MessageBody=tick_body(instance_id, drain_id, tick_id),
                DelaySeconds=max(0, min(MAX_DELAY, int(delay))),
            )
        except (ClientError, BotoCoreError) as exc:
            reraise_retryable(exc, "SQS SendMessage")
            raise
