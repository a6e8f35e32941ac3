"""The plain-HTTP admin application: liveness, readiness and Prometheus metrics.

It is bound to loopback only (enforced by the configuration loader): it carries no PHI, but it
has no authentication either.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from xca_gateway.metrics import CONTENT_TYPE, GatewayMetrics
from xca_gateway.server import App, Request, Response


class AdminApp:
    def __init__(
        self,
        metrics: GatewayMetrics,
        readiness: Callable[[], dict[str, bool]],
        ports: Callable[[], dict[str, int]] | None = None,
    ) -> None:
        self.metrics = metrics
        self.readiness = readiness
        self.ports = ports
        self.mounts: dict[str, App] = {}
        # The operator page (xca_gateway.operator_page): GET / (HTML) and /status.json.
        self.index: App | None = None

    def mount(self, prefix: str, app: App) -> None:
        """Serve ``prefix`` and everything below it with ``app`` (e.g. /consent)."""
        self.mounts[prefix.rstrip("/")] = app

    async def __call__(self, request: Request) -> Response:
        for prefix, app in self.mounts.items():
            if request.path == prefix or request.path.startswith(prefix + "/"):
                return await app(request)
        if request.method not in ("GET", "HEAD"):
            return Response(405, [("allow", "GET, HEAD"), ("content-type", "text/plain")], b"")
        if request.path == "/healthz":
            return Response(200, [("content-type", "text/plain")], b"ok\n")
        if request.path == "/readyz":
            checks = self.readiness()
            ready = all(checks.values())
            report: dict[str, object] = {"ready": ready, "checks": checks}
            if self.ports is not None and ready:
                report["ports"] = self.ports()
            body = json.dumps(report).encode() + b"\n"
            return Response(200 if ready else 503, [("content-type", "application/json")], body)
        if request.path == "/metrics":
            return Response(200, [("content-type", CONTENT_TYPE)], self.metrics.render())
        if self.index is not None and request.path in ("/", "/status.json"):
            return await self.index(request)
        return Response(404, [("content-type", "text/plain")], b"not found\n")
