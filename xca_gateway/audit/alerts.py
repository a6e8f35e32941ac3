"""Aggregation of repeated Security Alerts, so that a flood cannot fill the spool or the ARR.

A caller that opens a thousand connections and never finishes a handshake, or knocks on a door
it may not use in a loop, would otherwise write one audit record per attempt (about a hundred
per second in issue #16). Within ``window`` seconds, the alerts of one kind from one source are
one burst: its first alert is recorded at once (nothing is delayed), the others are counted,
and when the window closes one more record stands for them, the latest of them with the count
(ParticipantObjectDetail ``Repeat Count``) and the span in EventOutcomeDescription. Metrics
still count every alert.

Plain logic: the audit trail calls :meth:`AlertAggregator.offer` with the clock and records
what it returns.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import datetime

from xca_gateway.audit.messages import AuditMessage, EventId

REPEAT_COUNT = "Repeat Count"
# Distinct sources followed at once; beyond that, alerts of a kind share one burst (a flood
# from many addresses is still one burst per window, not one record per address).
MAX_BURSTS = 10_000
_MANY_SOURCES = "(many sources)"

AlertKey = tuple[str, str, str]


def is_security_alert(message: AuditMessage) -> bool:
    return message.event.event_id.code == EventId.SECURITY_ALERT.code


def alert_source(message: AuditMessage) -> str:
    """Who caused the alert: the requesting participant's identity and network address.

    Two callers behind one address (a certificate each) are two sources; the port of a
    connection without a certificate (its UserID is ``address:port``) is not part of it.
    """
    for participant in message.participants:
        if participant.user_is_requestor:
            address = participant.network_access_point_id or ""
            user = participant.user_id
            port = user[len(address) + 1 :] if address and user.startswith(f"{address}:") else ""
            if port.isdigit():
                user = address
            return f"{user} at {address}" if address and user != address else user
    return "unknown"


def alert_key(message: AuditMessage) -> AlertKey:
    kind = ",".join(code.code for code in message.event.type_codes)
    return (kind, alert_source(message), message.event.outcome_description or "")


@dataclass
class _Burst:
    opened: float
    first_time: datetime
    repeats: int = 0
    latest: AuditMessage | None = None


class AlertAggregator:
    def __init__(self, window: float, *, max_bursts: int = MAX_BURSTS) -> None:
        self.window = window
        self.max_bursts = max_bursts
        self._bursts: dict[AlertKey, _Burst] = {}
        self.aggregated = 0

    def offer(self, message: AuditMessage, now: float) -> list[AuditMessage]:
        """Records to write now: the summaries of bursts that ended, then ``message`` if it
        opens a burst (nothing if it only adds to one)."""
        out = self.expire(now)
        key = alert_key(message)
        if key not in self._bursts and len(self._bursts) >= self.max_bursts:
            key = (key[0], _MANY_SOURCES, key[2])
        burst = self._bursts.get(key)
        if burst is None:
            self._bursts[key] = _Burst(now, message.event.date_time)
            out.append(message)
        else:
            burst.repeats += 1
            burst.latest = message
            self.aggregated += 1
        return out

    def expire(self, now: float) -> list[AuditMessage]:
        """Summaries of the bursts whose window has closed (oldest first)."""
        out: list[AuditMessage] = []
        for key, burst in list(self._bursts.items()):
            if now - burst.opened < self.window:
                break  # insertion order is opening order: the rest are younger
            del self._bursts[key]
            summary = _summary(burst, self.window)
            if summary is not None:
                out.append(summary)
        return out

    def flush(self) -> list[AuditMessage]:
        """Summaries of every open burst (on stop)."""
        out = [s for b in self._bursts.values() if (s := _summary(b, self.window)) is not None]
        self._bursts.clear()
        return out

    @property
    def open_bursts(self) -> int:
        return len(self._bursts)


def _summary(burst: _Burst, window: float) -> AuditMessage | None:
    latest = burst.latest
    if latest is None or burst.repeats == 0:
        return None
    count = str(burst.repeats)
    span = (
        f"repeated {count} more time(s) since {burst.first_time.isoformat()} "
        f"(one record per {window:g} s)"
    )
    description = latest.event.outcome_description
    event = dataclasses.replace(
        latest.event, outcome_description=f"{description}; {span}" if description else span
    )
    objects = latest.objects
    if objects:
        first = objects[0]
        objects = (
            dataclasses.replace(first, details=(*first.details, (REPEAT_COUNT, count.encode()))),
            *objects[1:],
        )
    return dataclasses.replace(latest, event=event, objects=objects)
