"""Lambda: advances drains. ``ECS Task State Change`` (STOPPED) events complete the hook the
moment the last task stops; delayed SQS ticks of our own are the safety net. Agent containers
that exited 137 (SIGKILLed: their job was lost) are counted (``AgentsSigkilled``)."""

from __future__ import annotations

from typing import Any

from fleetdrain.controller.drain.signals import (
    InstanceDrainingSignal,
    TaskStoppedSignal,
    TickSignal,
)
from fleetdrain.controller.runtime import handle, logger, metrics


@metrics.log_metrics
@logger.inject_lambda_context(clear_state=True)
def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    return handle(event, (TaskStoppedSignal, InstanceDrainingSignal, TickSignal), "drain monitor")
