"""The controller's settings, from the function's environment (template.yaml sets them)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError as exc:
        raise ValueError(f"{name} must be a number, got {raw!r}") from exc
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {raw!r}")
    return value


@dataclass(frozen=True)
class Settings:
    """What a drain needs to know. Durations are seconds."""

    cluster: str
    #: The Auto Scaling group and lifecycle hook whose actions are ours; a lifecycle action of
    #: another group or hook is ignored (a shared notification queue can carry them, and IAM
    #: lets us complete only our group's). Empty: any.
    asg_name: str = ""
    hook_name: str = ""
    table_name: str = ""
    queue_url: str = ""
    coordinator_url: str = ""
    coordinator_org: str = ""
    #: Buildkite's GraphQL endpoint (``https://graphql.buildkite.com/v1``): an instance's agents
    #: are found there by meta-data, one request whatever the organization's size, instead of
    #: a REST listing of the whole organization shared by the drains. Empty: REST only (the
    #: token needs GraphQL access for this).
    coordinator_graphql_url: str = ""
    coordinator_token_secret_arn: str = ""
    #: Scale-in: how long agents may keep working (lifecycle heartbeats) before a forced drain.
    drain_budget: float = 3600.0
    #: Spot: force this long before the two-minute notice runs out.
    spot_margin: float = 20.0
    #: AWS Health scheduled change: force this long before the maintenance starts.
    maintenance_margin: float = 300.0
    #: "drain" (soft drain on a rebalance recommendation) or "ignore".
    rebalance_action: str = "drain"
    #: RecordLifecycleActionHeartbeat at most this often. Keep it at most 40 % of the hook's
    #: HeartbeatTimeout (infra/: 300 s), so a heartbeat that fails has time for its retries
    #: (every 30 s); each is an Auto Scaling call, and a 1,000-instance scale-in makes one per
    #: instance this often (120 s: 8 a second).
    heartbeat_interval: float = 120.0
    #: The safety-net tick: how often a drain in flight is looked at without any event.
    tick_interval: float = 20.0
    #: A drain that has waited a while (for a long job, for tasks to exit) may be looked at
    #: less often: its tick grows to half its wait so far, up to this (never past a heartbeat,
    #: the force or a rate-limit reset that is due sooner). 0: it does not grow.
    max_tick_interval: float = 60.0
    #: Container names that are agents (their exit 137 is counted as a SIGKILLed agent).
    agent_containers: frozenset[str] = field(default_factory=lambda: frozenset({"agent"}))
    #: Drain records are kept this long after their last change (DynamoDB TTL).
    record_ttl: float = 7 * 86400.0
    #: The coordinator pause's own timeout (it lapses if we die), minutes.
    pause_minutes: int = 120
    #: How long a step may hold the drain record (no other step runs meanwhile). At least the
    #: function timeout: a step killed by the timeout leaves its lease to expire.
    step_lease: float = 60.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        cluster = env.get("FLEETDRAIN_CLUSTER", "").strip()
        if not cluster:
            raise ValueError("FLEETDRAIN_CLUSTER is required")
        rebalance = env.get("FLEETDRAIN_REBALANCE_ACTION", "drain").strip().lower() or "drain"
        if rebalance not in ("drain", "ignore"):
            raise ValueError(f"FLEETDRAIN_REBALANCE_ACTION must be drain or ignore: {rebalance!r}")
        containers = env.get("FLEETDRAIN_AGENT_CONTAINERS", "agent")
        return cls(
            cluster=cluster,
            asg_name=env.get("FLEETDRAIN_AUTOSCALING_GROUP", "").strip(),
            hook_name=env.get("FLEETDRAIN_LIFECYCLE_HOOK", "").strip(),
            table_name=env.get("FLEETDRAIN_TABLE", ""),
            queue_url=env.get("FLEETDRAIN_QUEUE_URL", ""),
            coordinator_url=env.get("FLEETDRAIN_COORDINATOR_URL", "").rstrip("/"),
            coordinator_org=env.get("FLEETDRAIN_COORDINATOR_ORG", ""),
            coordinator_graphql_url=env.get("FLEETDRAIN_COORDINATOR_GRAPHQL_URL", "").strip(),
            coordinator_token_secret_arn=env.get("FLEETDRAIN_COORDINATOR_TOKEN_SECRET_ARN", ""),
            drain_budget=_float(env, "FLEETDRAIN_DRAIN_BUDGET_SECONDS", 3600.0),
            spot_margin=_float(env, "FLEETDRAIN_SPOT_MARGIN_SECONDS", 20.0),
            maintenance_margin=_float(env, "FLEETDRAIN_MAINTENANCE_MARGIN_SECONDS", 300.0),
            rebalance_action=rebalance,
            heartbeat_interval=max(1.0, _float(env, "FLEETDRAIN_HEARTBEAT_SECONDS", 120.0)),
            tick_interval=max(1.0, _float(env, "FLEETDRAIN_TICK_SECONDS", 20.0)),
            max_tick_interval=_float(env, "FLEETDRAIN_MAX_TICK_SECONDS", 60.0),
            agent_containers=frozenset(c.strip() for c in containers.split(",") if c.strip()),
            record_ttl=_float(env, "FLEETDRAIN_RECORD_TTL_SECONDS", 7 * 86400.0),
            step_lease=max(1.0, _float(env, "FLEETDRAIN_STEP_LEASE_SECONDS", 60.0)),
        )
