"""The coordinator's REST API as the drain uses it: list agents, pause, stop.

``GET /v2/organizations/{org}/agents`` (paginated by ``Link: rel="next"``) finds an instance's
agents by their ``ecs:task-arn`` tag; ``PUT .../agents/{id}/pause`` and ``.../stop`` signal
them. The API token comes from Secrets Manager through :class:`SecretToken` (cached; refreshed
once on a 401) and is never logged: it only ever lives in the Authorization header.

Transport errors, timeouts, 429 and 5xx are retried a few times with a short back-off; what
is still failing then is :class:`CoordinatorUnavailable`, and the drain falls back to ECS.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from typing import Any

import httpx
from botocore.exceptions import BotoCoreError, ClientError

from fleetdrain.controller.drain.aws_errors import reraise_retryable
from fleetdrain.controller.drain.errors import CoordinatorUnavailable
from fleetdrain.controller.drain.ports import AgentView

MAX_PAGES = 100


class SecretToken:
    """The coordinator API token from Secrets Manager, cached for ``ttl`` seconds.

    The secret is either the token itself or JSON with a ``token`` key.
    """

    def __init__(
        self,
        client: Any,
        secret_id: str,
        clock: Callable[[], float] = time.monotonic,
        ttl: float = 300.0,
    ) -> None:
        self._sm = client
        self._secret_id = secret_id
        self._clock = clock
        self._ttl = ttl
        self._value: str | None = None
        self._fetched_at = 0.0
        self.fetches = 0

    def __repr__(self) -> str:
        return f"SecretToken({self._secret_id!r}, cached={self._value is not None})"

    def get(self) -> str:
        if self._value is None or self._clock() - self._fetched_at >= self._ttl:
            try:
                out = self._sm.get_secret_value(SecretId=self._secret_id)
            except (ClientError, BotoCoreError) as exc:
                reraise_retryable(exc, "Secrets Manager GetSecretValue")
                raise CoordinatorUnavailable(
                    f"cannot read the coordinator token secret: {type(exc).__name__}"
                ) from exc
            raw = str(out.get("SecretString") or "").strip()
            if raw.startswith("{"):
                try:
                    raw = str(json.loads(raw).get("token", "")).strip()
                except ValueError:
                    raw = ""
            if not raw:
                raise CoordinatorUnavailable("the coordinator token secret is empty")
            self._value = raw
            self._fetched_at = self._clock()
            self.fetches += 1
        return self._value

    def invalidate(self) -> None:
        self._value = None


class CoordinatorClient:
    """:class:`~fleetdrain.controller.drain.ports.CoordinatorPort`: REST client for one
    organization. ``token`` is called for the token before each call."""

    def __init__(
        self,
        base_url: str,
        org: str,
        token: Callable[[], str],
        invalidate: Callable[[], None] = lambda: None,
        *,
        http: httpx.Client | None = None,
        timeout: float = 5.0,
        attempts: int = 3,
        backoff: float = 0.2,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._base = f"{base_url.rstrip('/')}/v2/organizations/{org}/agents"
        self._token = token
        self._invalidate = invalidate
        self._http = http or httpx.Client(
            timeout=httpx.Timeout(timeout, connect=min(timeout, 2.0)),
            headers={"User-Agent": "fleetdrain-controller"},
        )
        self._attempts = max(1, attempts)
        self._backoff = backoff
        self._sleep = sleep
        self.requests = 0
        #: How many pages the last :meth:`agents_for` read (the size of the organization).
        self.last_pages = 0

    def close(self) -> None:
        self._http.close()

    def _request(
        self, method: str, url: str, *, json_body: dict[str, Any] | None = None
    ) -> httpx.Response:
        refreshed = False
        attempt = 0
        while True:
            attempt += 1
            headers = {"Authorization": f"Bearer {self._token()}"}
            self.requests += 1
            try:
                response = self._http.request(method, url, headers=headers, json=json_body)
            except httpx.HTTPError as exc:
                if attempt >= self._attempts:
                    raise CoordinatorUnavailable(
                        f"{method} {_path(url)}: {type(exc).__name__}"
                    ) from exc
                self._sleep(self._backoff * attempt)
                continue
            if response.status_code == 401 and not refreshed:
                refreshed = True
                self._invalidate()
                continue
            if response.status_code == 429 or response.status_code >= 500:
                if attempt >= self._attempts:
                    raise CoordinatorUnavailable(
                        f"{method} {_path(url)}: HTTP {response.status_code}"
                    )
                self._sleep(self._backoff * attempt)
                continue
            if response.status_code in (401, 403):
                raise CoordinatorUnavailable(f"{method} {_path(url)}: HTTP {response.status_code}")
            return response

    def agents_for(self, task_arns: Iterable[str]) -> list[AgentView]:
        """Agents whose ``ecs:task-arn`` tag is one of ``task_arns`` (every page)."""
        wanted = set(task_arns)
        found: list[AgentView] = []
        url: str | None = f"{self._base}?per_page=100"
        pages = 0
        while url and pages < MAX_PAGES:
            pages += 1
            response = self._request("GET", url)
            if response.status_code != 200:
                raise CoordinatorUnavailable(f"GET agents: HTTP {response.status_code}")
            try:
                rows = response.json()
            except ValueError as exc:
                raise CoordinatorUnavailable("GET agents: not JSON") from exc
            if not isinstance(rows, list):
                raise CoordinatorUnavailable("GET agents: not a list")
            for row in rows:
                view = _agent_view(row)
                if view is not None and view.task_arn in wanted:
                    found.append(view)
            url = response.links.get("next", {}).get("url")
        self.last_pages = pages
        return found

    def agent(self, agent_id: str) -> AgentView | None:
        """One agent by id (``GET .../agents/{id}``); None if the coordinator no longer knows
        it. One request, where :meth:`agents_for` pages through the whole organization."""
        response = self._request("GET", f"{self._base}/{agent_id}")
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise CoordinatorUnavailable(f"GET agent: HTTP {response.status_code}")
        try:
            row = response.json()
        except ValueError as exc:
            raise CoordinatorUnavailable("GET agent: not JSON") from exc
        return _agent_view(row)

    def pause(self, agent_id: str, note: str, timeout_minutes: int) -> bool:
        """Pause an agent; False when the coordinator says it cannot (not connected, unknown)."""
        body = {"note": note, "timeout_in_minutes": max(1, min(10080, timeout_minutes))}
        response = self._request("PUT", f"{self._base}/{agent_id}/pause", json_body=body)
        return self._done(response, "pause")

    def stop(self, agent_id: str, force: bool) -> bool:
        """Stop an agent (``force``: cancel its job, reported ``agent_stop``); False if it can't."""
        response = self._request("PUT", f"{self._base}/{agent_id}/stop", json_body={"force": force})
        return self._done(response, "stop")

    @staticmethod
    def _done(response: httpx.Response, what: str) -> bool:
        if response.status_code in (200, 204):
            return True
        if response.status_code in (400, 404, 422):
            return False  # the agent is gone or not connected: nothing left to signal
        raise CoordinatorUnavailable(f"{what}: HTTP {response.status_code}")


def _path(url: str) -> str:
    return httpx.URL(url).path


def _agent_view(row: Any) -> AgentView | None:
    if not isinstance(row, dict) or not isinstance(row.get("id"), str):
        return None
    task_arn = ""
    for tag in row.get("meta_data") or []:
        if isinstance(tag, str) and tag.startswith("ecs:task-arn="):
            task_arn = tag.split("=", 1)[1]
    if not task_arn:
        return None
    job = row.get("job") if isinstance(row.get("job"), dict) else None
    return AgentView(
        id=row["id"],
        name=str(row.get("name", "")),
        task_arn=task_arn,
        connection_state=str(row.get("connection_state", "")),
        job_id=str(job["id"]) if job and job.get("id") else None,
        job_state=str(job.get("state")) if job and job.get("state") else None,
        paused=bool(row.get("paused", False)),
    )
