"""A community served by N gateway replicas behind HAProxy, sharing state in PostgreSQL.

What ``xca-gateway demo --replicas N`` and the replica tests start, all on loopback:

* :class:`PrivatePostgres`: a PostgreSQL cluster of its own (``initdb`` in a work directory,
  trust authentication on 127.0.0.1 only), the shared database of the replicas;
* :func:`haproxy_config` / :class:`Haproxy`: HAProxy in TCP mode on the community's public
  port (mutual TLS stays end to end, between the client and a replica), ``send-proxy-v2`` so
  that each replica sees the client's address, health checks on each replica's ``/readyz``
  (admin port) so that a draining or database-less replica leaves the rotation;
* :func:`replica_config_toml`: one community's configuration made a replica's (its own ports,
  data directory and audit spool; the shared database; PROXY protocol from the balancer).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

# How long PostgreSQL and HAProxy may take to come up (initdb is the slow part, seconds).
START_TIMEOUT = 120.0


class ReplicaSetupError(RuntimeError):
    pass


def _postgres_bindir() -> Path | None:
    for candidate in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (candidate / "initdb").exists() and (candidate / "postgres").exists():
            return candidate
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _run_as_postgres(paths: list[Path]) -> list[str]:
    """initdb and postgres refuse to run as root: as root, drop to the postgres account."""
    if os.geteuid() != 0:
        return []
    import pwd  # local: POSIX-only, needed only when running as root

    try:
        account = pwd.getpwnam("postgres")
    except KeyError:
        raise ReplicaSetupError("running as root needs a 'postgres' account") from None
    for path in paths:
        os.chown(path, account.pw_uid, account.pw_gid)
    return [
        "setpriv",
        f"--reuid={account.pw_uid}",
        f"--regid={account.pw_gid}",
        "--clear-groups",
        "--",
    ]


def _others_may_enter(path: Path) -> bool:
    """Whether every existing ancestor of ``path`` lets other accounts traverse it."""
    for parent in [path, *path.parents]:
        if parent.exists() and not parent.stat().st_mode & 0o001:
            return False
    return True


def die_with_parent() -> None:
    """Linux: the child gets SIGTERM when the launcher dies, however it dies."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PrivatePostgres:
    """A PostgreSQL cluster in ``directory`` (created on first start, kept across restarts)."""

    directory: Path
    port: int = 0
    user: str = "gateway"
    database: str = "replicas"
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{self.database}"

    def start(self) -> None:
        bindir = _postgres_bindir()
        if bindir is None:
            raise ReplicaSetupError("PostgreSQL is not installed (Debian package postgresql)")
        if os.geteuid() == 0 and not _others_may_enter(self.directory):
            # As root, the cluster runs as 'postgres', which cannot enter a private work
            # directory (a 0700 temporary directory): it goes under /tmp, noted in the workdir.
            note = self.directory.parent / "postgres-location.txt"
            self.directory = Path(tempfile.mkdtemp(prefix="xca-gateway-pg-"))
            note.write_text(f"{self.directory}\n")
        data, sockets = self.directory / "data", self.directory / "sockets"
        self.directory.mkdir(parents=True, exist_ok=True)
        sockets.mkdir(exist_ok=True)
        fresh = not (data / "PG_VERSION").exists()
        data.mkdir(exist_ok=True, mode=0o700)
        if os.geteuid() == 0:
            os.chmod(self.directory, 0o755)
        run_as = _run_as_postgres([data, sockets])
        if fresh:
            subprocess.run(
                [
                    *run_as,
                    str(bindir / "initdb"),
                    "-D",
                    str(data),
                    "-U",
                    self.user,
                    "-A",
                    "trust",
                    "-E",
                    "UTF8",
                    "--locale=C",
                    "--no-sync",
                ],
                check=True,
                capture_output=True,
                timeout=START_TIMEOUT,
            )
        self.port = self.port or free_port()
        log = (self.directory / "postgres.log").open("ab")
        self.process = subprocess.Popen(
            [
                *run_as,
                str(bindir / "postgres"),
                "-D",
                str(data),
                "-p",
                str(self.port),
                "-h",
                "127.0.0.1",
                "-k",
                str(sockets),
                "-c",
                "max_connections=100",
                "-c",
                "shared_buffers=32MB",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=die_with_parent,
        )
        log.close()
        self._wait_and_create()

    def _wait_and_create(self) -> None:
        import psycopg  # local: the optional PostgreSQL driver, only when replicas are asked for

        assert self.process is not None
        deadline = time.monotonic() + START_TIMEOUT
        admin_url = f"postgresql://{self.user}@127.0.0.1:{self.port}/postgres"
        while True:
            if self.process.poll() is not None:
                raise ReplicaSetupError(f"postgres exited; see {self.directory / 'postgres.log'}")
            try:
                with psycopg.connect(admin_url, connect_timeout=2, autocommit=True) as conn:
                    found = conn.execute(
                        "SELECT 1 FROM pg_database WHERE datname = %s", [self.database]
                    ).fetchone()
                    if found is None:
                        conn.execute(f'CREATE DATABASE "{self.database}"')
                    return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise ReplicaSetupError("postgres did not accept connections") from None
                time.sleep(0.2)

    def database_url(self, name: str) -> str:
        """The URL of database ``name`` in this cluster, created if it does not exist."""
        import psycopg  # local: the optional PostgreSQL driver, only when replicas are asked for

        if not re.fullmatch(r"[a-z][a-z0-9_]{0,62}", name):
            raise ReplicaSetupError(f"not a database name: {name!r}")
        admin_url = f"postgresql://{self.user}@127.0.0.1:{self.port}/postgres"
        with psycopg.connect(admin_url, connect_timeout=5, autocommit=True) as conn:
            found = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone()
            if found is None:
                conn.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        if self.process is None:
            return
        # Fast shutdown (SIGINT): connected sessions are ended, not waited for (SIGTERM's
        # "smart" shutdown would wait on any client still connected).
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        self.process = None
        if self.directory.name.startswith("xca-gateway-pg-"):
            shutil.rmtree(self.directory, ignore_errors=True)


@dataclass(frozen=True)
class Backend:
    """One replica as the balancer sees it: its HTTPS port (PROXY v2) and its admin port."""

    name: str
    https_port: int
    admin_port: int


def haproxy_config(
    public_port: int,
    backends: list[Backend],
    *,
    stats_port: int | None = None,
    direct_ports: dict[str, int] | None = None,
    public_fd: int | None = None,
) -> str:
    """HAProxy in TCP mode: ``public_port`` balanced over ``backends``.

    ``direct_ports`` (replica name -> port) adds a frontend per replica that reaches only it,
    through the same PROXY protocol path (tests use them to say which replica answers).
    ``public_fd``: a listening socket HAProxy inherits (``bind fd@N``) instead of binding
    ``public_port`` itself (the demo binds every port before it writes a configuration).
    """
    # A check answered late is a failed one: on a loaded machine the admin port may take a
    # moment, so the check gets seconds, not the interval, and three misses mark a replica
    # down (a killed one refuses at once: down within about 3 s, its connections redispatched).
    checks = "check inter 1s fall 3 rise 2"
    lines = [
        "global",
        "    maxconn 4096",
        "",
        "defaults",
        "    mode tcp",
        "    timeout connect 5s",
        # Long enough for a large study streamed by RAD-69 (the gateway has its own deadlines).
        "    timeout client 300s",
        "    timeout server 300s",
        "    timeout check 5s",
        # A replica that refuses the connection (killed, draining): try another.
        "    retries 3",
        "    option redispatch",
        "",
        "frontend community",
        f"    bind fd@{public_fd}"
        if public_fd is not None
        else f"    bind 127.0.0.1:{public_port}",
        "    default_backend replicas",
        "",
        "backend replicas",
        "    balance roundrobin",
        # Health on the replica's admin port: 503 while draining or without the shared database.
        "    option httpchk",
        "    http-check send meth GET uri /readyz",
        "    http-check expect status 200",
    ]
    for b in backends:
        server = f"    server {b.name} 127.0.0.1:{b.https_port} send-proxy-v2"
        lines.append(f"{server} {checks} port {b.admin_port}")
    for name, port in (direct_ports or {}).items():
        b = next(x for x in backends if x.name == name)
        lines += [
            "",
            f"frontend direct-{name}",
            f"    bind 127.0.0.1:{port}",
            f"    default_backend only-{name}",
            "",
            f"backend only-{name}",
            f"    server {name} 127.0.0.1:{b.https_port} send-proxy-v2",
        ]
    if stats_port is not None:
        lines += [
            "",
            "frontend stats",
            "    mode http",
            f"    bind 127.0.0.1:{stats_port}",
            "    stats enable",
            "    stats uri /stats",
        ]
    return "\n".join(lines) + "\n"


@dataclass
class Haproxy:
    """``haproxy -db -f <config>`` (foreground, no daemon)."""

    config_path: Path
    public_port: int
    process: subprocess.Popen[bytes] | None = None
    pass_fds: tuple[int, ...] = ()

    def start(self) -> None:
        binary = shutil.which("haproxy") or "/usr/sbin/haproxy"
        if not Path(binary).exists():
            raise ReplicaSetupError("HAProxy is not installed (Debian package haproxy)")
        check = subprocess.run(
            [binary, "-c", "-q", "-f", str(self.config_path)],
            capture_output=True,
            timeout=30,
            pass_fds=self.pass_fds,
        )
        if check.returncode != 0:
            raise ReplicaSetupError(f"haproxy config refused: {check.stderr.decode()[-2000:]}")
        log = (self.config_path.parent / "haproxy.log").open("ab")
        self.process = subprocess.Popen(
            [binary, "-db", "-f", str(self.config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            pass_fds=self.pass_fds,
            preexec_fn=die_with_parent,
        )
        log.close()
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ReplicaSetupError("haproxy exited; see haproxy.log")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.public_port), timeout=1),
            ):
                return
            time.sleep(0.1)
        raise ReplicaSetupError("haproxy did not listen in time")

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        self.process = None


def replica_config_toml(
    community_toml: str,
    *,
    https_port: int,
    admin_port: int,
    data_dir: Path,
    database_url: str,
    balancers: tuple[str, ...] = ("127.0.0.1/32",),
    public_base_url: str | None = None,
    shared_images: Path | None = None,
    shared_repository: Path | None = None,
) -> str:
    """One community's configuration (as ``xca-gateway demo`` writes it) for one replica.

    The replica keeps its own ports, data directory and audit spool (a replica's records
    survive its own crash); the registry and the state the replicas must agree on go to the
    shared database; its HTTPS port takes connections from the balancers only, each starting
    with a PROXY v2 header. ``public_base_url`` is the balancer's address: what peers and
    audit records name. ``shared_images``, ``shared_repository``: the imaging source's files
    and the repository's documents, one copy for all (a shared file system in production).
    """
    text = community_toml
    text = re.sub(
        r"(?m)^\[server\]\n(?:.*\n)*?port = \d+\n",
        "[server]\n"
        'host = "127.0.0.1"\n'
        f"port = {https_port}\n"
        + (f'public_base_url = "{public_base_url}"\n' if public_base_url else "")
        + "proxy_protocol = true\n"
        + f"proxy_sources = [{', '.join(repr(b).replace(chr(39), chr(34)) for b in balancers)}]\n"
        + "drain_timeout = 10.0\n",
        text,
        count=1,
    )
    text = re.sub(
        r"(?m)^(\[admin\]\nhost = .*\n)port = \d+\n", rf"\g<1>port = {admin_port}\n", text
    )
    text = re.sub(r'(?m)^data_dir = ".*"$', f'data_dir = "{data_dir}"', text, count=1)
    shared = f'\n[shared]\ndatabase = "{database_url}"\n'
    if re.search(r"(?m)^\[registry\]$", text):
        text = re.sub(r"(?m)^\[registry\]$", f'[registry]\nurl = "{database_url}"', text, count=1)
    else:
        shared += f'\n[registry]\nurl = "{database_url}"\n'
    if shared_repository is not None and re.search(r"(?m)^\[repository\]$", text):
        text = re.sub(
            r"(?m)^\[repository\]$",
            f'[repository]\ndirectory = "{shared_repository}"',
            text,
            count=1,
        )
    if shared_images is not None:
        text = text.replace(
            'kind = "filesystem"\n', f'kind = "filesystem"\npath = "{shared_images}"\n', 1
        )
    return text + shared
