"""The built-in worker: a Buildkite agent API v3 client."""

import sys

# httpx imports its command-line client (rich, pygments, click: ~7 MB and ~40 ms) whenever
# those happen to be installed, as they are here for the drill. The agent never runs it, and
# httpx carries on without it when the import fails, which a None entry makes it do. Here, so
# that it precedes every import of httpx in the agent (only this package uses httpx).
sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]
