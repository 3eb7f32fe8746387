"""The drain core: knows nothing of Lambda; every side effect sits behind a small object.

- ``events``: pydantic models of every event the controller consumes, and their normal form.
- ``state``: the drain record in DynamoDB (conditional writes, TTL).
- ``ecs_fleet``: container instance, tasks, DRAINING, StopTask, task protection.
- ``coordinator``: the coordinator's REST API (pause / stop agents), token from Secrets Manager.
- ``lifecycle``: RecordLifecycleActionHeartbeat / CompleteLifecycleAction.
- ``ticks``: delayed SQS messages that wake a drain up.
- ``core``: the two-phase drain state machine.
"""
