"""Time as the project writes it: RFC 3339 in UTC to the millisecond, and the spans between."""

from __future__ import annotations

from datetime import UTC, datetime


def now() -> str:
    """The current time as RFC 3339 in UTC, to the millisecond."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_time(timestamp: str) -> datetime:
    """A time written by :func:`now`."""
    return datetime.fromisoformat(timestamp.replace("Z", "+00:00"))


def seconds_between(start: str | None, end: str | None) -> float | None:
    """Seconds from one time of ours to another; None when either is missing."""
    if not start or not end:
        return None
    return (parse_time(end) - parse_time(start)).total_seconds()


def age_seconds(timestamp: str | None) -> float:
    """Seconds since a time of ours; 0 when there is none."""
    if not timestamp:
        return 0.0
    return max(0.0, (datetime.now(UTC) - parse_time(timestamp)).total_seconds())
