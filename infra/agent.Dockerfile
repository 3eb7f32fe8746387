# fleetdrain-agent as PID 1 in an ECS task.
#
# The ENTRYPOINT is exec form on purpose: with shell form (`ENTRYPOINT fleetdrain-agent start`)
# Docker runs `/bin/sh -c ...` as PID 1, the shell never forwards ECS's SIGTERM, and every
# running job is lost at SIGKILL. In exec form the agent itself is PID 1: it handles SIGTERM,
# reaps orphans, and drains within the task definition's stopTimeout (pass the same value as
# --stop-timeout / FLEETDRAIN_STOP_TIMEOUT). Do not set `initProcessEnabled`: the agent is the
# init process.
#
# Build from the repository root:  docker build -f infra/agent.Dockerfile -t fleetdrain-agent .
FROM python:3.12-slim

RUN apt-get update \
 && apt-get install -y --no-install-recommends git bash ca-certificates \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /src
# template.yaml: fleetdrain/drill/aws/template.yaml links to it (the drill's package data).
COPY pyproject.toml README.md template.yaml ./
COPY fleetdrain ./fleetdrain
RUN pip install --no-cache-dir . && rm -rf /src

RUN useradd --create-home --uid 10000 buildkite \
 && mkdir -p /var/lib/buildkite-agent/builds \
 && chown buildkite /var/lib/buildkite-agent/builds
USER buildkite
WORKDIR /var/lib/buildkite-agent

ENV BUILDKITE_BUILD_PATH=/var/lib/buildkite-agent/builds \
    BUILDKITE_AGENT_HEALTH_CHECK_ADDR=127.0.0.1:3901 \
    FLEETDRAIN_STOP_TIMEOUT=120

# The token comes from Secrets Manager through the task definition's `secrets`
# (BUILDKITE_AGENT_TOKEN), never from the image.
HEALTHCHECK --interval=30s --timeout=5s CMD ["fleetdrain-agent", "health"]

ENTRYPOINT ["fleetdrain-agent", "start"]
CMD ["--tags-from-ecs-meta-data", "--tags-from-ec2-meta-data"]
