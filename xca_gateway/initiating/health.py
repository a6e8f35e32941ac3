"""Peer health: a circuit breaker per peer community, so a dead peer costs no deadline."""

from __future__ import annotations

import time


class PeerHealth:
    """Consecutive-failure circuit breaker for one peer, and its typical answer time."""

    def __init__(self, failures: int, open_seconds: float) -> None:
        self.threshold = failures
        self.open_seconds = open_seconds
        self.consecutive_failures = 0
        self.open_until = 0.0
        # Exponentially weighted answer time: the fan-out sends to the slowest peers first,
        # so the few milliseconds it takes to send twenty requests never delay the one that
        # decides the total time.
        self.latency = 0.0

    def observe(self, seconds: float) -> None:
        self.latency = seconds if self.latency == 0.0 else 0.8 * self.latency + 0.2 * seconds

    def is_open(self) -> bool:
        return time.monotonic() < self.open_until

    def success(self) -> None:
        self.consecutive_failures = 0
        self.open_until = 0.0

    def failure(self) -> None:
        self.consecutive_failures += 1
        if self.consecutive_failures >= self.threshold:
            self.open_until = time.monotonic() + self.open_seconds
