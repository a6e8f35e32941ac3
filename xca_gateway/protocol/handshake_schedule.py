"""Who handshakes next: the TLS handshakes a listener starts, by source, fairly and at a rate.

A TLS handshake is the dearest thing a caller can make the gateway do before it has proved
anything (the server's signature, the key exchange, the client certificate's verification),
and it runs on the event loop. So a handshake starts only when the :class:`HandshakeSchedule`
grants it, before a byte of the ClientHello is read:

* each source (an IPv4 address, an IPv6 /64) has a token bucket of handshakes
  (``rate`` per second, ``burst`` at once) and a number of handshakes in progress at once;
* all sources together have a bucket of their own, so that many sources each within its
  rate cannot take the loop either;
* connections waiting for a grant are queued per source, and sources are served round-robin:
  a peer's one handshake waits for one turn of each other waiting source, not behind a
  source's hundred.

Plain bookkeeping with the clock passed in (no sockets, no event loop): the listener
(``http_server.ConnectionGate``) turns grants into woken connections and sleeps until
:meth:`HandshakeSchedule.next_grant_at` when tokens are what waiters lack.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass


@dataclass
class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up; starts full."""

    rate: float
    burst: float
    tokens: float
    stamp: float

    @classmethod
    def full(cls, rate: float, burst: float, now: float) -> TokenBucket:
        return cls(rate, burst, burst, now)

    def refill(self, now: float) -> None:
        if now > self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = max(self.stamp, now)

    def ready(self, now: float) -> bool:
        self.refill(now)
        return self.tokens >= 1.0

    def take(self) -> None:
        self.tokens -= 1.0

    def next_token_at(self, now: float) -> float:
        self.refill(now)
        if self.tokens >= 1.0:
            return now
        if self.rate <= 0:
            return float("inf")
        return now + (1.0 - self.tokens) / self.rate

    def is_full(self, now: float) -> bool:
        self.refill(now)
        return self.tokens >= self.burst


@dataclass(frozen=True)
class HandshakeLimits:
    # Per source: handshakes in progress at once, started per second, and saved up.
    per_source_concurrency: int = 16
    per_source_rate: float = 200.0
    per_source_burst: float = 400.0
    # All sources together: handshakes started per second, and saved up.
    rate: float = 1000.0
    burst: float = 1000.0


class _Source:
    __slots__ = ("bucket", "in_progress", "queue")

    def __init__(self, bucket: TokenBucket) -> None:
        self.bucket = bucket
        self.queue: deque[Hashable] = deque()
        self.in_progress = 0


class HandshakeSchedule:
    """Queues of connections waiting to handshake, by source, and the grants to start.

    :meth:`enqueue` a connection when its ClientHello is there to read; :meth:`grants` says
    which connections start now (call it after every change and at :meth:`next_grant_at`);
    :meth:`finished` when a granted handshake ends; :meth:`cancel` when a queued one gives up.
    """

    def __init__(self, limits: HandshakeLimits, now: float) -> None:
        self.limits = limits
        self._global = TokenBucket.full(limits.rate, limits.burst, now)
        self._sources: dict[str, _Source] = {}
        # Sources with connections waiting, in the order they are served next.
        self._ring: deque[str] = deque()

    def enqueue(self, key: Hashable, source: str, now: float) -> None:
        entry = self._sources.get(source)
        if entry is None:
            bucket = TokenBucket.full(
                self.limits.per_source_rate, self.limits.per_source_burst, now
            )
            entry = self._sources[source] = _Source(bucket)
        if not entry.queue:
            self._ring.append(source)
        entry.queue.append(key)

    def penalize(self, source: str, handshakes: float, now: float) -> None:
        """Take ``handshakes`` tokens from ``source``'s bucket (it may go below zero, down to
        minus its burst): what its misbehaviour cost, paid in waiting for its next ones."""
        entry = self._sources.get(source)
        if entry is None:
            bucket = TokenBucket.full(
                self.limits.per_source_rate, self.limits.per_source_burst, now
            )
            entry = self._sources[source] = _Source(bucket)
        entry.bucket.refill(now)
        entry.bucket.tokens = max(-entry.bucket.burst, entry.bucket.tokens - handshakes)

    def cancel(self, key: Hashable, source: str, now: float) -> None:
        """A queued connection gives up (timed out, displaced, closed) before its grant."""
        entry = self._sources.get(source)
        if entry is None or key not in entry.queue:
            return
        entry.queue.remove(key)
        if not entry.queue:
            self._ring.remove(source)
        self._forget_if_idle(source, entry, now)

    def finished(self, source: str, now: float) -> None:
        """A granted handshake ended (either way): its source may start another."""
        entry = self._sources.get(source)
        if entry is None:
            return
        entry.in_progress -= 1
        self._forget_if_idle(source, entry, now)

    def grants(self, now: float) -> list[Hashable]:
        """The connections that start their handshake now, one per source per round."""
        granted: list[Hashable] = []
        while self._ring and self._global.ready(now):
            progressed = False
            for _ in range(len(self._ring)):
                if not self._global.ready(now):
                    break
                source = self._ring.popleft()
                entry = self._sources[source]
                if entry.in_progress < self.limits.per_source_concurrency and entry.bucket.ready(
                    now
                ):
                    entry.bucket.take()
                    self._global.take()
                    entry.in_progress += 1
                    granted.append(entry.queue.popleft())
                    progressed = True
                if entry.queue:
                    self._ring.append(source)  # to the back: the others go first
            if not progressed:
                break
        return granted

    def next_grant_at(self, now: float) -> float | None:
        """When a waiting connection may be granted for want of tokens alone; None if none
        waits, or if all that wait need a handshake in progress to end first."""
        if not self._ring:
            return None
        candidates = [
            self._sources[source].bucket.next_token_at(now)
            for source in self._ring
            if self._sources[source].in_progress < self.limits.per_source_concurrency
        ]
        if not candidates:
            return None
        return max(min(candidates), self._global.next_token_at(now))

    def tokens(self, source: str, now: float) -> float:
        """Handshakes ``source`` may start now (below zero: it is paying a penalty)."""
        entry = self._sources.get(source)
        if entry is None:
            return self.limits.per_source_burst
        entry.bucket.refill(now)
        return entry.bucket.tokens

    def waiting(self, source: str) -> int:
        entry = self._sources.get(source)
        return len(entry.queue) if entry is not None else 0

    def in_progress(self, source: str) -> int:
        entry = self._sources.get(source)
        return entry.in_progress if entry is not None else 0

    @property
    def sources(self) -> int:
        """Sources remembered (waiting, handshaking, or with tokens still to regain)."""
        return len(self._sources)

    def sweep(self, now: float) -> None:
        """Forget sources with nothing queued or in progress whose bucket is full again."""
        for source, entry in list(self._sources.items()):
            self._forget_if_idle(source, entry, now)

    def _forget_if_idle(self, source: str, entry: _Source, now: float) -> None:
        # A source's bucket must outlive its connections until it is full again: forgetting it
        # earlier would hand a source that connects, closes and reconnects a fresh burst.
        if not entry.queue and entry.in_progress <= 0 and entry.bucket.is_full(now):
            del self._sources[source]
