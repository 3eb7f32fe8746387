"""fleetdrain drill: the whole system on one machine (embedded coordinator, local fleet)."""
