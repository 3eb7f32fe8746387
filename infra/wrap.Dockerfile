# The official Buildkite agent image, with `fleetdrain-agent wrap` as PID 1 in front of it.
#
# The image's own entrypoint runs the agent under tini (dumb-init on older tags): signals are
# forwarded, but nothing knows the task's 120 s stopTimeout, so a job longer than that dies at
# SIGKILL unreported. `wrap` forwards the same signals and adds the deadline: at
# stopTimeout - cancel grace - margin (120 - 10 - 5 = 105 s) it sends the agent SIGQUIT, the agent
# cancels its job and finishes it as `signal_reason: agent_stop` (retry rules re-run it), and
# just before SIGKILL wrap kills whatever is left and exits on its own terms. It also keeps ECS
# task scale-in protection on while the agent is busy and serves /health and /status.
# Choosing between this and `fleetdrain-agent start`: docs/start-or-wrap.md.
#
# The ENTRYPOINT is exec form on purpose: `wrap` must be PID 1 (a shell in front of it would never
# forward SIGTERM). In the task definition: no `entryPoint` override, `initProcessEnabled` off,
# `stopTimeout` equal to FLEETDRAIN_STOP_TIMEOUT, and the container healthCheck below.
#
# Build from the repository root:
#   docker build -f infra/wrap.Dockerfile -t buildkite-agent-wrapped .
ARG AGENT_IMAGE=buildkite/agent:3-ubuntu-24.04
FROM ${AGENT_IMAGE}

# The agent image has no Python; wrap needs 3.11+ (Ubuntu 24.04 ships 3.12) and its own venv.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
# template.yaml: fleetdrain/drill/aws/template.yaml links to it (the drill's package data).
COPY pyproject.toml README.md template.yaml /tmp/fleetdrain/
COPY fleetdrain /tmp/fleetdrain/fleetdrain
RUN python3 -m venv /opt/fleetdrain \
 && /opt/fleetdrain/bin/pip install --no-cache-dir /tmp/fleetdrain \
 && ln -s /opt/fleetdrain/bin/fleetdrain-agent /usr/local/bin/fleetdrain-agent \
 && rm -rf /tmp/fleetdrain

# The Go agent serves /status.json (aggregate_status idle/busy, v3.72+) on 3901: wrap's busy
# probe. wrap's own /health and /status are on 3902. BUILDKITE_CANCEL_GRACE_PERIOD is read by
# both: the agent's time to cancel a job is the time wrap leaves it before the deadline.
ENV BUILDKITE_AGENT_HEALTH_CHECK_ADDR=127.0.0.1:3901 \
    BUILDKITE_CANCEL_GRACE_PERIOD=10 \
    FLEETDRAIN_STOP_TIMEOUT=120 \
    FLEETDRAIN_BUSY_PROBE=http://127.0.0.1:3901/status.json \
    FLEETDRAIN_HEALTH_CHECK_ADDR=127.0.0.1:3902

# `health` checks $FLEETDRAIN_HEALTH_CHECK_ADDR (wrap's server) before
# $BUILDKITE_AGENT_HEALTH_CHECK_ADDR (the Go agent's), so it needs no --addr here.
HEALTHCHECK --interval=30s --timeout=5s CMD ["fleetdrain-agent", "health"]

# ssh-env-config.sh (from the base image) sets up SSH keys from the environment, then execs the
# agent: the agent stays wrap's direct child. (The base entrypoint's /docker-entrypoint.d hook
# scripts are not run: put them in the agent's own hooks, or in front of ssh-env-config.sh.)
ENTRYPOINT ["fleetdrain-agent", "wrap", "--watch-imds", "--", "/usr/local/bin/ssh-env-config.sh", "/usr/local/bin/buildkite-agent"]
CMD ["start"]
