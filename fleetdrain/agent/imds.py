"""EC2 instance metadata (IMDSv2): instance tags and the notices that start a drain.

Timeouts are short on purpose: off EC2, or from a bridge-networked container on an instance
whose IMDS hop limit is 1 (the token response is dropped one hop short), every call would
otherwise hang for the client's default timeout while the agent is starting.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from fleetdrain.agent import wire
from fleetdrain.agent.minihttp import HttpClient, HttpError

log = logging.getLogger("fleetdrain.imds")

DEFAULT_BASE_URL = "http://169.254.169.254"
TOKEN_TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN_HEADER = "X-aws-ec2-metadata-token"
MAX_TOKEN_TTL = 21600

#: target-lifecycle-state values that mean "this instance is going away".
TERMINATING_STATES = frozenset({"Terminated", "Warmed:Terminated"})

_TAG_PATHS = {
    "aws:instance-id": "instance-id",
    "aws:instance-life-cycle": "instance-life-cycle",
    "aws:availability-zone": "placement/availability-zone",
    "aws:instance-type": "instance-type",
    "aws:ami-id": "ami-id",
}


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


class ImdsError(Exception):
    """IMDS could not be reached or gave an unusable answer."""


@dataclass(frozen=True)
class SpotAction:
    """A spot interruption notice: ``action`` is terminate, stop or hibernate."""

    action: str
    time: datetime


@dataclass(frozen=True)
class Notice:
    """Something IMDS said that should start a drain.

    ``deadline`` is when the instance goes away (spot) or None (lifecycle, where the
    lifecycle hook's timeout, not IMDS, bounds the time). ``detail`` is the spot action or
    the lifecycle state, for logs.
    """

    kind: Literal["spot", "lifecycle-terminated"]
    deadline: datetime | None
    detail: str = ""


class ImdsClient:
    """IMDSv2 client: a session token (cached, refreshed before it expires), then GETs."""

    def __init__(
        self,
        client: HttpClient,
        base_url: str | None = DEFAULT_BASE_URL,
        *,
        token_ttl: int = MAX_TOKEN_TTL,
        timeout: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        """``base_url`` None means the EC2 default; ``token_ttl`` in seconds (1..21600);
        ``clock`` is monotonic seconds."""
        if not 1 <= token_ttl <= MAX_TOKEN_TTL:
            raise ValueError(f"token_ttl must be 1..{MAX_TOKEN_TTL}")
        self._client = client
        self._base = (base_url or DEFAULT_BASE_URL).rstrip("/")
        self._ttl = token_ttl
        # Refresh early enough that a token never expires between our check and IMDS's.
        self._refresh_before = min(60.0, token_ttl / 2)
        self._timeout = timeout
        self._clock = clock
        self._token: str | None = None
        self._token_expires = 0.0
        self._token_lock = asyncio.Lock()

    async def token(self) -> str:
        """Return a valid session token, fetching a new one when needed."""
        async with self._token_lock:
            if (
                self._token is not None
                and self._clock() < self._token_expires - self._refresh_before
            ):
                return self._token
            requested_at = self._clock()
            url = f"{self._base}/latest/api/token"
            try:
                response = await self._client.put(
                    url, headers={TOKEN_TTL_HEADER: str(self._ttl)}, timeout=self._timeout
                )
            except HttpError as exc:
                raise ImdsError(f"IMDS token: unreachable ({exc})") from exc
            if response.status_code != 200 or not response.text:
                raise ImdsError(f"IMDS token: HTTP {response.status_code}")
            self._token = response.text.strip()
            self._token_expires = requested_at + self._ttl
            return self._token

    async def get(self, path: str) -> str | None:
        """GET ``/latest/<path>``; None when IMDS answers 404. Raises :class:`ImdsError`."""
        url = f"{self._base}/latest/{path.lstrip('/')}"
        for attempt in range(2):
            token = await self.token()
            try:
                response = await self._client.get(
                    url, headers={TOKEN_HEADER: token}, timeout=self._timeout
                )
            except HttpError as exc:
                raise ImdsError(f"IMDS {path}: unreachable ({exc})") from exc
            if response.status_code == 401 and attempt == 0:
                # IMDS forgot the token (instance stopped and started, or our clock ran
                # slow): get a new one once.
                self._token = None
                continue
            if response.status_code == 404:
                return None
            if response.status_code != 200:
                raise ImdsError(f"IMDS {path}: HTTP {response.status_code}")
            return response.text
        raise ImdsError(f"IMDS {path}: HTTP 401 with a fresh token")

    async def ec2_tags(self) -> dict[str, str]:
        """Instance tags: ``aws:instance-id``, ``aws:instance-life-cycle`` (spot/on-demand),
        ``aws:availability-zone``, ``aws:instance-type``, ``aws:ami-id``.

        Keys IMDS does not have (404) are left out; anything else raises :class:`ImdsError`.
        """
        await self.token()
        values = await asyncio.gather(*(self.get(f"meta-data/{p}") for p in _TAG_PATHS.values()))
        return {
            key: value.strip()
            for key, value in zip(_TAG_PATHS, values, strict=True)
            if value and value.strip()
        }

    async def spot_instance_action(self) -> SpotAction | None:
        """The pending spot interruption, or None. Raises :class:`ImdsError`."""
        text = await self.get("meta-data/spot/instance-action")
        if text is None:
            return None
        try:
            doc = wire.json_object(text)
            action = wire.text(doc, "action")
            when = wire.parse_time(wire.text(doc, "time"))
        except wire.FieldError as exc:
            raise ImdsError(
                f"IMDS spot/instance-action: unusable ({exc}) {_one_line(text[:200])!r}"
            ) from exc
        return SpotAction(action=action, time=when)

    async def target_lifecycle_state(self) -> str | None:
        """The Auto Scaling target lifecycle state (``InService``, ``Terminated``...), or None
        when the instance is not in an Auto Scaling group. Raises :class:`ImdsError`."""
        text = await self.get("meta-data/autoscaling/target-lifecycle-state")
        return text.strip() if text is not None and text.strip() else None


NoticeCallback = Callable[[Notice], Awaitable[None] | None]


class ImdsWatcher:
    """Polls IMDS for spot interruption notices and lifecycle termination."""

    def __init__(self, imds: ImdsClient, *, interval: float = 5.0):
        """``interval`` seconds between polls: a spot notice gives two minutes, so seconds count."""
        self._imds = imds
        self._interval = interval
        self._seen: set[Notice] = set()
        self._failing: dict[str, str] = {}

    @property
    def notices(self) -> frozenset[Notice]:
        """Every notice delivered so far."""
        return frozenset(self._seen)

    async def run(self, on_notice: NoticeCallback) -> None:
        """Poll until cancelled; call ``on_notice`` once per distinct notice. Never raises."""
        while True:
            await self.poll_once(on_notice)
            await asyncio.sleep(self._interval)

    async def poll_once(self, on_notice: NoticeCallback) -> list[Notice]:
        """Poll both paths once and deliver new notices; returns the ones delivered."""
        found: list[Notice] = []
        spot = await self._guarded("spot/instance-action", self._imds.spot_instance_action)
        if isinstance(spot, SpotAction):
            found.append(Notice(kind="spot", deadline=spot.time, detail=spot.action))
        state = await self._guarded(
            "autoscaling/target-lifecycle-state", self._imds.target_lifecycle_state
        )
        if isinstance(state, str) and state in TERMINATING_STATES:
            found.append(Notice(kind="lifecycle-terminated", deadline=None, detail=state))
        delivered = []
        for notice in found:
            if notice in self._seen:
                continue
            self._seen.add(notice)
            delivered.append(notice)
            log.warning(
                "IMDS notice: %s (%s), deadline %s", notice.kind, notice.detail, notice.deadline
            )
            try:
                result = on_notice(notice)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                log.exception("notice handler failed for %s", notice)
        return delivered

    async def _guarded(self, what: str, call: Callable[[], Awaitable[object]]) -> object:
        try:
            result = await call()
        except Exception as exc:  # polling must go on whatever one poll hit
            message = _one_line(exc)
            # Off EC2 this fails every few seconds for as long as the agent runs.
            if self._failing.get(what) != message:
                log.warning("IMDS %s poll failed: %s", what, message)
            self._failing[what] = message
            return None
        if self._failing.pop(what, None) is not None:
            log.info("IMDS %s poll works again", what)
        return result
