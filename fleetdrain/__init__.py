"""fleetdrain: CI build agents on AWS ECS that never lose a build when the fleet shrinks or moves.

- ``fleetdrain.agent``: ``fleetdrain-agent`` (``start``: the Buildkite agent; ``wrap``: its
  PID-1 layer in front of another worker).
- ``fleetdrain.controller``: the drain controller (Lambda handlers over the ``drain`` core).
- ``fleetdrain.drill``: the game day on one machine (embedded coordinator, AWS in moto).
- ``fleetdrain.ops``: what an operator runs against a real account (``status``, ``drill --aws``).
"""

__version__ = "0.1.0"
