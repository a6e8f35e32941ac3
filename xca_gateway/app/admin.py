"""The plain-HTTP admin application: liveness, readiness, Prometheus metrics, mounted APIs.

It is bound to loopback only (enforced by the configuration loader). ``/healthz``, ``/readyz``
and ``/metrics`` carry no PHI and need no credentials (probes and Prometheus call them). APIs
mounted below it that read or change state (``/consent``) pass an :class:`AdminGate` first:

* the ``Host`` header must name this listener (its own host:port, or localhost / 127.0.0.1 /
  [::1] with its port): a web page the operator's browser opened cannot reach the API through a
  DNS name it rebinds to 127.0.0.1 (DNS rebinding), because the browser sends that name;
* ``Authorization: Bearer <token>``: one of the operators' tokens from a file (``name token``
  per line, readable by its owner only). Tokens are kept as SHA-256 digests and compared in
  constant time; the operator's name is the principal every change is audited under.

Why tokens and not a unix socket: the admin port already is a TCP listener (probes, Prometheus,
replicas behind a load balancer), a socket's peer credentials name only a uid, whereas a token
names the operator, who appears in every audit record; a token file with mode 0600 gives the
same "only this account" guarantee the socket's file mode would.

A refused request (wrong Host, no or unknown token) is answered 403 / 401 with a JSON body and
audited once by the caller's ``on_refusal`` (the gateway's door guard: a Security Alert naming
the address it came from).
"""

from __future__ import annotations

import json
from collections.abc import Callable

from xca_gateway.metrics import CONTENT_TYPE, GatewayMetrics
from xca_gateway.protocol.http_server import App, Request, Response


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
        # The operator page (xca_gateway.app.operator_page): GET / (HTML) and /status.json.
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
