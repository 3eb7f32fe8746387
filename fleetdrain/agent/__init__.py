"""fleetdrain-agent: a PID-1-safe build agent for ECS that drains without losing jobs."""
