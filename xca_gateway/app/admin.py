"""The plain-HTTP admin application: liveness, readiness, Prometheus metrics, mounted APIs.

It is bound to loopback only (enforced by the configuration loader). ``/healthz``, ``/readyz``
and ``/metrics`` carry no PHI and need no credentials (probes and Prometheus call them). APIs
mounted below it that read or change state (``/consent``) pass an :class:`AdminGate` first (and
the operator page, ``/`` and ``/status.json``, the Host check of the first point):

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
from xca_gateway.security.callers import AccessDecision, Door, Identity
from xca_gateway.security.operators import host_allowed


class AdminApp:
    def __init__(
        self,
        metrics: GatewayMetrics,
        readiness: Callable[[], dict[str, bool]],
        ports: Callable[[], dict[str, int]] | None = None,
        *,
        listener: Callable[[], tuple[str, int]] | None = None,
        on_refusal: Callable[[AccessDecision, str], None] | None = None,
    ) -> None:
        self.metrics = metrics
        self.readiness = readiness
        self.ports = ports
        # The admin listener's configured host and bound port: the operator page answers only a
        # Host header that names it (see _foreign_host).
        self.listener = listener
        self.on_refusal = on_refusal
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
            refused = self._foreign_host(request)
            return refused if refused is not None else await self.index(request)
        return Response(404, [("content-type", "text/plain")], b"not found\n")

    def _foreign_host(self, request: Request) -> Response | None:
        """403 when the Host header does not name this listener.

        The operator page shows what peers said in their faults and who was refused, which may
        name a patient or a person: a web page the operator's browser opened must not read it
        through a DNS name it rebinds to 127.0.0.1 (the browser then sends that name as Host).
        Probes and Prometheus (/healthz, /readyz, /metrics) carry no such text and skip it.
        """
        if self.listener is None:
            return None
        host = next((v for k, v in request.headers if k == "host"), None)
        listener_host, port = self.listener()
        if host_allowed(host, listener_host, port):
            return None
        if self.on_refusal is not None:
            reason = (
                f"Host header {(host or '')[:100]!r} does not name this admin listener "
                "(a DNS-rebinding web page sends its own name)"
            )
            decision = AccessDecision(
                False, Door.ADMIN, Identity(address=request.peer.address), None, reason
            )
            self.on_refusal(decision, request.path)
        return Response(
            403,
            [("content-type", "text/plain")],
            b"the Host header does not name this admin listener\n",
            close=True,
        )
