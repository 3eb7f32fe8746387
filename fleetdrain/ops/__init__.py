"""What operators run against a real account: ``fleetdrain status``, ``fleetdrain drill --aws``."""
