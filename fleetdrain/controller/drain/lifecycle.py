"""The Auto Scaling lifecycle action of a terminating instance: heartbeat and complete.

An action that is no longer there (completed by someone, timed out, or the token is stale)
answers ``ValidationError: No active Lifecycle Action found ...``: that is
:class:`LifecycleGone`, an answer, never a reason to retry.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from fleetdrain.controller.drain.aws_errors import error_code, reraise_retryable
from fleetdrain.controller.drain.errors import LifecycleGone


def _gone(exc: ClientError) -> bool:
    message = str(exc.response.get("Error", {}).get("Message", ""))
    return error_code(exc) == "ValidationError" and "No active Lifecycle Action" in message


class LifecycleActions:
    """:class:`~fleetdrain.controller.drain.ports.LifecyclePort`: RecordLifecycleActionHeartbeat /
    CompleteLifecycleAction on one boto3 client."""

    def __init__(self, client: Any) -> None:
        self._asg = client

    def _call(self, what: str, fn: Callable[..., Any], **kwargs: Any) -> None:
        try:
            fn(**kwargs)
        except ClientError as exc:
            if _gone(exc):
                raise LifecycleGone(str(exc.response["Error"].get("Message", ""))) from exc
            reraise_retryable(exc, f"Auto Scaling {what}")
            raise
        except BotoCoreError as exc:
            reraise_retryable(exc, f"Auto Scaling {what}")
            raise

    def heartbeat(self, asg_name: str, hook_name: str, token: str, instance_id: str) -> None:
        self._call(
            "RecordLifecycleActionHeartbeat",
            self._asg.record_lifecycle_action_heartbeat,
            AutoScalingGroupName=asg_name,
            LifecycleHookName=hook_name,
            LifecycleActionToken=token,
            InstanceId=instance_id,
        )

    def complete(
        self, asg_name: str, hook_name: str, token: str, instance_id: str, result: str = "CONTINUE"
    ) -> None:
        self._call(
            "CompleteLifecycleAction",
            self._asg.complete_lifecycle_action,
            AutoScalingGroupName=asg_name,
            LifecycleHookName=hook_name,
            LifecycleActionToken=token,
            InstanceId=instance_id,
            LifecycleActionResult=result,
        )
