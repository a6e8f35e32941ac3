"""A syslog-over-UDP audit record repository for tests: every datagram's XML, parsed."""

from __future__ import annotations

import socket
import threading

from lxml import etree

from xca_gateway.audit.syslog import parse_message


class AuditInbox:
    """Binds a UDP port on loopback and keeps each audit message received (in a thread)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = int(self.sock.getsockname()[1])
        self.records: list[etree._Element] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def toml(self, audit_source_id: str) -> str:
        """The ``[audit]`` table of a gateway that audits here."""
        return f"""
[audit]
audit_source_id = "{audit_source_id}"
[[audit.destinations]]
name = "arr"
transport = "udp"
host = "127.0.0.1"
port = {self.port}
"""

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(70000)
            except OSError:
                continue
            msg = parse_message(data).msg
            self.records.append(etree.fromstring(msg[3:] if msg[:3] == b"\xef\xbb\xbf" else msg))

    def events(self) -> list[tuple[str, str, str]]:
        """(EventID code, EventTypeCode code or "", EventOutcomeIndicator) of each record."""
        found = []
        for root in list(self.records):
            ident = root.find("EventIdentification")
            assert ident is not None
            event_id, type_code = ident.find("EventID"), ident.find("EventTypeCode")
            found.append(
                (
                    event_id.get("csd-code", "") if event_id is not None else "",
                    type_code.get("csd-code", "") if type_code is not None else "",
                    ident.get("EventOutcomeIndicator", ""),
                )
            )
        return found

    def with_event(self, event_id: str) -> list[etree._Element]:
        """The records whose EventID is ``event_id`` (e.g. "110112")."""
        return [
            r
            for r in list(self.records)
            if (e := r.find("EventIdentification/EventID")) is not None
            and e.get("csd-code") == event_id
        ]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()
