"""Lambda: EC2 spot interruption warning (hard drain, deadline = notice + 120 s - margin) and
rebalance recommendation (soft drain, or ignored: ``FLEETDRAIN_REBALANCE_ACTION``). Instances
that are not container instances of the cluster are ignored (logged)."""

from __future__ import annotations

from typing import Any

from fleetdrain.controller.drain.signals import RebalanceSignal, SpotSignal
from fleetdrain.controller.runtime import handle, logger, metrics


@metrics.log_metrics
@logger.inject_lambda_context(clear_state=True)
def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    return handle(event, (SpotSignal, RebalanceSignal), "spot interruption")
