"""Lambda: an instance is terminating (Auto Scaling lifecycle action) -> start or join its drain.

Takes the ``EC2 Instance-terminate Lifecycle Action`` EventBridge event, an SQS batch of
lifecycle notifications (raw, or in an SNS envelope), or the same notification from an SNS
topic the function is subscribed to (``Records[].Sns``); ``autoscaling:TEST_NOTIFICATION`` and
other transitions are ignored cleanly.
"""

from __future__ import annotations

from typing import Any

from fleetdrain.controller.drain.signals import LifecycleSignal
from fleetdrain.controller.runtime import handle, logger, metrics


@metrics.log_metrics
@logger.inject_lambda_context(clear_state=True)
def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    return handle(event, (LifecycleSignal,), "lifecycle hook")
