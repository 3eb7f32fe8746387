"""Lambda: the EC2 notices that an instance goes. Spot interruption warning (hard drain,
deadline = notice + 120 s - margin); ``EC2 Instance State-change Notification`` to stopping or
shutting-down (stopped or terminated outside the group: hard drain forced at once); AWS Health
scheduled change of an instance (soft drain, forced ``FLEETDRAIN_MAINTENANCE_MARGIN_SECONDS``
before it starts); rebalance recommendation (soft drain, or ignored:
``FLEETDRAIN_REBALANCE_ACTION``). None of them names the cluster: an instance that is not a
container instance of it is ignored (logged) at the cost of one filtered lookup."""

from __future__ import annotations

from typing import Any

from fleetdrain.controller.drain.signals import (
    MaintenanceSignal,
    RebalanceSignal,
    SpotSignal,
    StoppingSignal,
)
from fleetdrain.controller.runtime import handle, logger, metrics

ACCEPTS = (SpotSignal, RebalanceSignal, MaintenanceSignal, StoppingSignal)


@metrics.log_metrics
@logger.inject_lambda_context(clear_state=True)
def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    return handle(event, ACCEPTS, "spot interruption")
