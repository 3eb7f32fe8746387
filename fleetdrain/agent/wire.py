"""Checked reads of small JSON documents (ECS task metadata and protection, IMDS notices).

The PID-1 layer reads a handful of fields from each of them; pydantic would cost ``wrap`` more
memory than the rest of it together, so the checks are spelled out here: a missing or wrongly
typed field is a :class:`FieldError` naming it, unknown fields are ignored.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any


class FieldError(ValueError):
    """A document or one of its fields is not what was expected; the message names it."""


def json_object(data: bytes | str, what: str = "body") -> dict[str, Any]:
    """Parse ``data`` as a JSON object."""
    try:
        parsed = json.loads(data)
    except ValueError:
        raise FieldError(f"{what}: not JSON") from None
    return as_object(parsed, what)


def as_object(value: Any, what: str) -> dict[str, Any]:
    """``value`` if it is a JSON object."""
    if not isinstance(value, dict):
        raise FieldError(f"{what}: expected an object, got {_kind(value)}")
    return value


def optional_object(obj: dict[str, Any], name: str) -> dict[str, Any] | None:
    """Member ``name``: an object, or None when absent or null."""
    value = obj.get(name)
    return None if value is None else as_object(value, name)


def text(obj: dict[str, Any], name: str) -> str:
    """Member ``name``: a string, required."""
    value = optional_text(obj, name)
    if value is None:
        raise FieldError(f"{name}: Field required")
    return value


def optional_text(obj: dict[str, Any], name: str) -> str | None:
    """Member ``name``: a string, or None when absent or null."""
    value = obj.get(name)
    if value is None or isinstance(value, str):
        return value
    raise FieldError(f"{name}: expected a string, got {_kind(value)}")


def flag(obj: dict[str, Any], name: str) -> bool:
    """Member ``name``: a JSON boolean, required."""
    value = obj.get(name)
    if isinstance(value, bool):
        return value
    if value is None:
        raise FieldError(f"{name}: Field required")
    raise FieldError(f"{name}: expected a boolean, got {_kind(value)}")


def optional_time(obj: dict[str, Any], name: str) -> datetime | None:
    """Member ``name``: an RFC 3339 time (UTC when it has no offset), or None when absent."""
    value = optional_text(obj, name)
    return None if value is None else parse_time(value, name)


def parse_time(value: str, what: str = "time") -> datetime:
    """An RFC 3339 / ISO 8601 time as an aware datetime (no offset: UTC)."""
    try:
        when = datetime.fromisoformat(value.strip())
    except ValueError:
        raise FieldError(f"{what}: not an RFC 3339 time: {value[:60]!r}") from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def _kind(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}.get(
        type(value), "a number" if isinstance(value, int | float) else "null"
    )
