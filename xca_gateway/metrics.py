"""Prometheus metrics of one gateway (served on the admin port at ``/metrics``).

Each gateway instance has its own registry so that several gateways can live in one process
(tests, embedded use) without mixing their counts.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "xca_gateway_requests",
            "SOAP requests handled, by transaction and outcome",
            ["transaction", "outcome"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "xca_gateway_request_duration_seconds",
            "Time from request headers to the end of the response, by transaction",
            ["transaction"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.handshake_failures = Counter(
            "xca_gateway_tls_handshake_failures",
            "Refused or failed inbound TLS handshakes, by reason",
            ["reason"],
            registry=self.registry,
        )
        self.connections = Gauge(
            "xca_gateway_open_connections", "Open inbound connections", registry=self.registry
        )
        self.connections_refused = Counter(
            "xca_gateway_connections_refused",
            "Inbound connections refused or dropped before their handshake, by listener and "
            "reason (max_connections, max_connections_per_source, max_pending_handshakes)",
            ["listener", "reason"],
            registry=self.registry,
        )
        self.peer_up = Gauge(
            "xca_gateway_peer_up",
            "1 if the last call to the peer community succeeded, 0 if it failed",
            ["peer"],
            registry=self.registry,
        )
        self.peer_requests = Counter(
            "xca_gateway_peer_requests",
            "Outbound calls to peer communities, by peer and outcome",
            ["peer", "transaction", "outcome"],
            registry=self.registry,
        )
        self.peer_latency = Histogram(
            "xca_gateway_peer_request_duration_seconds",
            "Outbound call duration, by peer",
            ["peer", "transaction"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.bytes_sent = Counter(
            "xca_gateway_response_bytes",
            "Response body bytes sent, by transaction",
            ["transaction"],
            registry=self.registry,
        )

    def render(self) -> bytes:
        return bytes(generate_latest(self.registry))
