"""A private rsyslogd as an Audit Record Repository (tests, benchmarks, demos).

Runs Debian's rsyslogd (with rsyslog-gnutls) unprivileged-friendly in a directory of its own:
a syslog-TLS listener with mutual authentication (RFC 5425, ``x509/certvalid``: the client must
present a certificate from our CA) and a syslog-UDP listener (RFC 5426), both on loopback. Every
message received is written to ``received.log``, one per line, as rsyslog's raw message
(``rawmsg``) JSON-escaped, so the exact bytes can be read back and compared.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

RSYSLOGD = "rsyslogd"
GTLS_MODULE_DIRS = (
    Path("/usr/lib/x86_64-linux-gnu/rsyslog"),
    Path("/usr/lib/aarch64-linux-gnu/rsyslog"),
    Path("/usr/lib/rsyslog"),
)


def rsyslogd_path() -> str | None:
    return shutil.which(RSYSLOGD) or next(
        (p for p in ("/usr/sbin/rsyslogd", "/sbin/rsyslogd") if os.path.exists(p)), None
    )


def gtls_available() -> bool:
    return any((d / "lmnsd_gtls.so").exists() for d in GTLS_MODULE_DIRS)


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _quote(value: str | int | Path) -> str:
    return json.dumps(str(value))


@dataclass
class RsyslogRepository:
    workdir: Path
    ca: Path
    certificate: Path
    private_key: Path
    tls_port: int = field(default_factory=free_port)
    udp_port: int = field(default_factory=lambda: free_port(socket.SOCK_DGRAM))
    auth_mode: str = "x509/certvalid"
    max_message_size: str = "256k"
    _process: subprocess.Popen[bytes] | None = None

    @property
    def output(self) -> Path:
        return self.workdir / "received.log"

    @property
    def config_path(self) -> Path:
        return self.workdir / "rsyslog.conf"

    @property
    def log_path(self) -> Path:
        return self.workdir / "rsyslogd.log"

    def config_text(self) -> str:
        spool = self.workdir / "spool"
        return f"""
global(
  workDirectory={_quote(spool)}
  maxMessageSize={_quote(self.max_message_size)}
  parser.escapeControlCharactersOnReceive="off"
  defaultNetstreamDriver="gtls"
  defaultNetstreamDriverCAFile={_quote(self.ca)}
  defaultNetstreamDriverCertFile={_quote(self.certificate)}
  defaultNetstreamDriverKeyFile={_quote(self.private_key)}
)
# Let a stop finish writing what was received (the default gives up after 1.5 s).
main_queue(queue.timeoutShutdown="20000" queue.timeoutActionCompletion="20000")
module(load="imtcp" streamDriver.name="gtls" streamDriver.mode="1"
       streamDriver.authMode={_quote(self.auth_mode)})
input(type="imtcp" address="127.0.0.1" port={_quote(self.tls_port)})
module(load="imudp")
input(type="imudp" address="127.0.0.1" port={_quote(self.udp_port)})
template(name="rawjson" type="list") {{
  constant(value="{{\\"input\\":\\"")
  property(name="inputname")
  constant(value="\\",\\"raw\\":\\"")
  property(name="rawmsg" format="json")
  constant(value="\\"}}\\n")
}}
action(type="omfile" file={_quote(self.output)} template="rawjson")
"""

    def write_config(self) -> None:
        (self.workdir / "spool").mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.config_text())

    def check_config(self) -> None:
        self.write_config()
        binary = rsyslogd_path() or RSYSLOGD
        result = subprocess.run(
            [binary, "-N1", "-f", str(self.config_path)],
            capture_output=True,
            timeout=30,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"rsyslogd rejects its configuration: {result.stderr.decode()}")

    def start(self, timeout: float = 15.0) -> None:
        if self._process is not None and self._process.poll() is None:
            return
        self.write_config()
        binary = rsyslogd_path() or RSYSLOGD
        logfile = self.log_path.open("ab")
        try:
            self._process = subprocess.Popen(
                [
                    binary,
                    "-n",
                    "-f",
                    str(self.config_path),
                    "-i",
                    str(self.workdir / "rsyslogd.pid"),
                ],
                stdin=subprocess.DEVNULL,
                stdout=logfile,
                stderr=subprocess.STDOUT,
            )
        finally:
            logfile.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"rsyslogd exited with {self._process.returncode}: {self.log_tail()}"
                )
            if self._listening():
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"rsyslogd did not listen on {self.tls_port}: {self.log_tail()}")

    def _listening(self) -> bool:
        # Look for the listening socket instead of connecting (a bare TCP connect to the TLS
        # port would be logged as a failed handshake).
        wanted = f":{self.tls_port:04X}"
        try:
            with open("/proc/net/tcp") as fh:
                for line in fh:
                    parts = line.split()
                    if len(parts) > 3 and parts[1].endswith(wanted) and parts[3] == "0A":
                        return True
        except OSError:
            return _probe(self.tls_port)
        return False

    def stop(self, timeout: float = 30.0) -> None:
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        self._process = None

    @property
    def pid(self) -> int | None:
        """rsyslogd's process id while it runs (it runs in the foreground, ``-n``)."""
        return self._process.pid if self.running and self._process is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def messages(self, transport: str | None = None) -> list[bytes]:
        """Every message received so far (over ``transport`` "tls" or "udp", or both), as the
        exact bytes of the SYSLOG-MSG, in the order rsyslog wrote them."""
        try:
            data = self.output.read_bytes()
        except FileNotFoundError:
            return []
        wanted = {"tls": "imtcp", "udp": "imudp"}.get(transport or "")
        received = []
        # A line without its newline is still being written.
        for line in data.split(b"\n")[:-1]:
            if line:
                entry = json.loads(line)
                if wanted is None or entry["input"] == wanted:
                    received.append(entry["raw"].encode("utf-8"))
        return received

    def wait_for(
        self, count: int, timeout: float = 30.0, transport: str | None = None
    ) -> list[bytes]:
        """Poll (bounded) until at least ``count`` messages arrived; return them all."""
        deadline = time.monotonic() + timeout
        while True:
            received = self.messages(transport)
            if len(received) >= count or time.monotonic() >= deadline:
                return received
            time.sleep(0.05)


def _probe(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False
