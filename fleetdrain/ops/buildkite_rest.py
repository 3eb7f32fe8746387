"""The few Buildkite REST calls a game day makes, and the API token that must never leak.

``POST /v2/organizations/{org}/pipelines/{pipeline}/builds`` (create a build), ``GET
.../builds/{number}`` (the build and its jobs) and ``GET .../agents/{id}`` (an agent's tags and
state), over httpx. The token lives only in :class:`ApiToken` (its repr hides it) and the
Authorization header; errors name the call and the answer, never the headers.
"""

from __future__ import annotations

import json
from typing import Any

import httpx


class ApiError(Exception):
    """A REST call failed (or the token could not be had); the message is one line.

    ``transient``: the network, a 429 or a 5xx: the same read may well work in a moment.
    """

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


class ApiToken:
    """The REST API token; never in a repr, a log line or an error message."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        value = value.strip()
        if not value:
            raise ApiError("the API token is empty")
        self._value = value

    def reveal(self) -> str:
        """The token itself, for the Authorization header only."""
        return self._value

    def __repr__(self) -> str:
        return "ApiToken(***)"

    __str__ = __repr__


class BuildkiteRest:
    """The few REST calls the game day makes (``api_url``: e.g. https://api.buildkite.com)."""

    def __init__(
        self,
        api_url: str,
        org: str,
        token: ApiToken,
        *,
        timeout: float = 15.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._org = org
        self._client = httpx.Client(
            base_url=f"{api_url.rstrip('/')}/v2/organizations/{org}",
            headers={"Authorization": f"Bearer {token.reveal()}", "Accept": "application/json"},
            timeout=timeout,
            transport=transport,
        )

    def close(self) -> None:
        """Close the connection pool."""
        self._client.close()

    def _call(self, method: str, path: str, what: str, **kwargs: Any) -> Any:
        try:
            response = self._client.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            # httpx's message names the URL, never the headers: the token stays out.
            raise ApiError(f"{what}: {exc.__class__.__name__}: {exc}", transient=True) from None
        if response.status_code == 401:
            raise ApiError(f"{what}: the API refused the token (401)")
        if response.status_code >= 400:
            try:
                message = str(response.json().get("message", ""))
            except (ValueError, AttributeError):
                message = response.text[:200]
            status = response.status_code
            raise ApiError(
                f"{what}: HTTP {status} {message}".rstrip(),
                transient=status == 429 or status >= 500,
            )
        try:
            return response.json()
        except ValueError:
            raise ApiError(f"{what}: the answer is not JSON") from None

    def create_build(
        self, pipeline: str, *, commit: str, branch: str, message: str
    ) -> dict[str, Any]:
        """Start a build of ``pipeline``; the build as the API returns it."""
        body = {"commit": commit, "branch": branch, "message": message}
        out = self._call(
            "POST", f"/pipelines/{pipeline}/builds", f"creating a build of {pipeline}", json=body
        )
        if not isinstance(out, dict) or not isinstance(out.get("number"), int):
            raise ApiError(f"creating a build of {pipeline}: no build number in the answer")
        return out

    def get_build(self, pipeline: str, number: int) -> dict[str, Any]:
        """The build, with its jobs."""
        out = self._call(
            "GET", f"/pipelines/{pipeline}/builds/{number}", f"reading build #{number}"
        )
        return out if isinstance(out, dict) else {}

    def get_agent(self, agent_id: str) -> dict[str, Any]:
        """One agent (its ``meta_data`` tags and ``connection_state``)."""
        out = self._call("GET", f"/agents/{agent_id}", f"reading agent {agent_id}")
        return out if isinstance(out, dict) else {}


def token_from_secret(client: Any, secret_id: str) -> ApiToken:
    """The token from Secrets Manager: the secret string, or JSON with a ``token`` key."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        value = client.get_secret_value(SecretId=secret_id)["SecretString"]
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "?")
        raise ApiError(f"reading the API token from {secret_id}: {code}") from None
    except (BotoCoreError, KeyError) as exc:
        raise ApiError(f"reading the API token from {secret_id}: {exc}") from None
    try:
        doc = json.loads(value)
    except ValueError:
        return ApiToken(value)
    if isinstance(doc, dict):
        if not isinstance(doc.get("token"), str):
            raise ApiError(f"secret {secret_id} is JSON without a 'token' string")
        return ApiToken(doc["token"])
    return ApiToken(value)
