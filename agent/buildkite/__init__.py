"""The built-in worker: a Buildkite agent API v3 client."""
