"""The drain core: knows nothing of Lambda; every side effect sits behind a port.

The core (pure: standard library only, no botocore, boto3, httpx or pydantic):

- ``ports``: every Protocol the core calls through (``DrainStorePort``, ``EcsPort``,
  ``CoordinatorPort``, ``LifecyclePort``, ``TicksPort``, ``MetricsPort``, clocks) and the values
  that cross them (``DrainRecord``, ``TaskInfo``, ``AgentView``, ...).
- ``signals``: every event the controller consumes, in normal form.
- ``merge``: how an event merges into its drain record (pure rules).
- ``core``: the two-phase drain state machine.
- ``errors``: the errors the core tells apart (``Retryable``, ``Conflict``, ...).
- ``config``: the settings, from the environment.

The adapters (``runtime`` wires them into the core):

- ``events``: pydantic models of every event's wire format, parsed into signals.
- ``state``: ``DrainStorePort`` on DynamoDB (conditional writes, TTL).
- ``ecs_fleet``: ``EcsPort``: container instance, tasks, DRAINING, StopTask, task protection.
- ``coordinator``: ``CoordinatorPort``: the coordinator's REST API (pause / stop agents), token
  from Secrets Manager.
- ``lifecycle``: ``LifecyclePort``: RecordLifecycleActionHeartbeat / CompleteLifecycleAction.
- ``ticks``: ``TicksPort``: delayed SQS messages that wake a drain up.
- ``aws_errors``: what botocore's errors mean (throttling, 5xx, transport -> ``Retryable``),
  shared by the AWS adapters.
"""
