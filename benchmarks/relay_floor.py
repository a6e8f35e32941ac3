"""The floor of a relay hop whose loop runs in Python, against nginx relaying the same bytes.

Issue 22 asks the gateway's imaging hop to cost at most 1.25 x nginx's CPU per GB. This
benchmark takes everything but TLS away: an upstream TLS server sends ``--size`` bytes; a
downstream client reads them through a relay; the relay is either

* ``python``: the least a Python relay can do, the way the gateway does it (no HTTP, no MIME,
  no asyncio): the upstream connection is TLS on the socket with OpenSSL's read-ahead
  (``NativeTls``, as the gateway's relay client), each readable event decrypting record after
  record into one reused 256 KiB buffer; the downstream connection is a memory-BIO
  ``SSLObject`` (as asyncio's TLS transport) whose records go out with one ``send`` per piece;
* ``nginx``: nginx's ``stream`` module (Debian ``libnginx-mod-stream``), TLS on both sides,
  one worker.

Both verify client certificates on both sides (the dev PKI). The legs alternate; each relay's
user + system CPU (psutil) per GB relayed is printed with the ratio python / nginx. The ratio is
the least the gateway's hop can reach while its loop is Python: what its HTTP, MIME, XML and
asyncio layers add comes on top.

    python benchmarks/relay_floor.py [--size 1G] [--repeat 5]
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import selectors
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
from imaging_bench import free_port, run_nginx

from xca_gateway.protocol.tls import NATIVE_TLS
from xca_gateway.security.dev_pki import DevPki, init_dev_pki

PIECE = 256 * 1024
STREAM_MODULE = Path("/usr/lib/nginx/modules/ngx_stream_module.so")


def _server_context(pki: DevPki, name: str) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki.communities[name].cert, pki.communities[name].key)
    context.load_verify_locations(pki.ca)
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def _client_context(pki: DevPki, cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_cert_chain(cert, key)
    context.load_verify_locations(pki.ca)
    return context


def _listener() -> socket.socket:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    return listener


def upstream(listener: socket.socket, pki: DevPki, size: int) -> None:
    """Child process: send ``size`` bytes on each accepted connection, then close it."""
    context = _server_context(pki, "beta")
    data = memoryview(os.urandom(PIECE))
    while True:
        raw, _ = listener.accept()
        try:
            with context.wrap_socket(raw, server_side=True) as conn:
                sent = 0
                while sent < size:
                    conn.sendall(data[: min(PIECE, size - sent)])
                    sent += min(PIECE, size - sent)
                with contextlib.suppress(OSError):
                    conn.unwrap()
        except OSError as exc:  # this connection only: say why, serve the next
            print(f"upstream: {exc!r}", file=sys.stderr, flush=True)
        finally:
            raw.close()


def python_relay(listener: socket.socket, pki: DevPki, upstream_port: int) -> None:
    """Child process: relay each accepted connection to the upstream, TLS both sides."""
    inbound = _server_context(pki, "alpha")
    alpha = pki.communities["alpha"]
    outbound = _client_context(pki, alpha.cert, alpha.key)
    buffer = bytearray(PIECE)
    view = memoryview(buffer)
    while True:
        raw, _ = listener.accept()
        try:
            _relay_one(raw, inbound, outbound, upstream_port, view)
        except OSError as exc:  # this connection only: say why, serve the next
            print(f"python relay: {exc!r}", file=sys.stderr, flush=True)
        raw.close()


def _relay_one(
    down: socket.socket,
    inbound: ssl.SSLContext,
    outbound: ssl.SSLContext,
    upstream_port: int,
    view: memoryview,
) -> None:
    down.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = inbound.wrap_bio(incoming, outgoing, server_side=True)
    while True:
        try:
            tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            if outgoing.pending:
                down.sendall(outgoing.read())
            data = down.recv(65536)
            if not data:
                return
            incoming.write(data)
    if outgoing.pending:
        down.sendall(outgoing.read())
    raw = socket.create_connection(("127.0.0.1", upstream_port))
    up = outbound.wrap_socket(raw, server_hostname="localhost", do_handshake_on_connect=False)
    try:
        _relay_tls(down, tls, outgoing, up, view)
    finally:
        up.close()


def _relay_tls(
    down: socket.socket,
    tls: ssl.SSLObject,
    outgoing: ssl.MemoryBIO,
    up: ssl.SSLSocket,
    view: memoryview,
) -> None:
    pointer = NATIVE_TLS.pointer(up)
    if pointer is not None:
        NATIVE_TLS.read_ahead(pointer, PIECE)
    up.do_handshake()
    up.setblocking(False)
    down.setblocking(False)
    read = up._sslobj.read  # type: ignore[attr-defined]  # the C SSL_read, as the gateway
    readable = selectors.DefaultSelector()
    readable.register(up, selectors.EVENT_READ)
    writable = selectors.DefaultSelector()
    writable.register(down, selectors.EVENT_WRITE)
    unsent: list[memoryview] = []
    unsent_bytes = 0

    def flush() -> None:
        nonlocal unsent_bytes
        while unsent:
            try:
                n = down.send(unsent[0])
            except BlockingIOError:
                return
            unsent_bytes -= n
            if n < len(unsent[0]):
                unsent[0] = unsent[0][n:]
                return
            unsent.pop(0)

    done = False
    while not done:
        readable.select(30)
        while True:
            filled = 0
            try:
                while filled < PIECE:
                    count = read(PIECE - filled, view[filled:])
                    if count == 0:
                        done = True
                        break
                    filled += count
            except ssl.SSLWantReadError:
                pass
            except (ssl.SSLEOFError, ssl.SSLZeroReturnError):
                done = True
            if filled:
                tls.write(view[:filled])
                ciphertext = outgoing.read()
                unsent.append(memoryview(ciphertext))
                unsent_bytes += len(ciphertext)
                flush()
                while unsent_bytes > 4 * PIECE:  # backpressure: the reader is slower
                    writable.select(30)
                    flush()
            if filled < PIECE or done:
                break
    with contextlib.suppress(ssl.SSLError):
        tls.unwrap()
    if outgoing.pending:
        unsent.append(memoryview(outgoing.read()))
    down.setblocking(True)
    for piece in unsent:
        down.sendall(piece)


NGINX_STREAM = """\
load_module {module};
daemon off;
master_process off;
worker_processes 1;
pid {work}/nginx-stream.pid;
error_log {work}/nginx-stream-error.log warn;
events {{ worker_connections 16; }}
stream {{
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_client_certificate {ca};
        ssl_verify_client on;
        proxy_pass 127.0.0.1:{upstream};
        proxy_buffer_size 64k;
        proxy_ssl on;
        proxy_ssl_certificate {cert};
        proxy_ssl_certificate_key {key};
        proxy_ssl_trusted_certificate {ca};
        proxy_ssl_verify on;
        proxy_ssl_name localhost;
    }}
}}
"""


def start_nginx(work: Path, pki: DevPki, upstream_port: int) -> tuple[subprocess.Popen[bytes], int]:
    if not STREAM_MODULE.exists():
        raise SystemExit(f"{STREAM_MODULE} missing: apt-get install libnginx-mod-stream")
    port = free_port()
    alpha = pki.communities["alpha"]
    conf = work / "nginx-stream.conf"
    conf.write_text(
        NGINX_STREAM.format(
            module=STREAM_MODULE,
            work=work,
            port=port,
            upstream=upstream_port,
            cert=alpha.cert,
            key=alpha.key,
            ca=pki.ca,
        )
    )
    return run_nginx(conf, work, port, work / "nginx-stream-error.log"), port


def download(pki: DevPki, port: int, size: int) -> None:
    context = _client_context(pki, pki.client.cert, pki.client.key)
    buffer = bytearray(1 << 20)
    got = 0
    with context.wrap_socket(
        socket.create_connection(("127.0.0.1", port), timeout=120), server_hostname="localhost"
    ) as conn:
        while got < size:
            count = conn.recv_into(buffer)
            if not count:
                break
            got += count
    if got != size:
        raise RuntimeError(f"relayed {got} of {size} bytes")


def cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def parse_size(text: str) -> int:
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    return int(float(text[:-1]) * units[text[-1].upper()]) if text[-1].isalpha() else int(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="1G", help="bytes relayed per leg, e.g. 512M, 1G")
    parser.add_argument("--repeat", type=int, default=5, help="legs of each relay, alternated")
    args = parser.parse_args()
    size = parse_size(args.size)
    context = multiprocessing.get_context("fork")
    with tempfile.TemporaryDirectory(prefix="relay-floor-") as tmp:
        work = Path(tmp)
        pki = init_dev_pki(work / "pki", ["alpha", "beta"])
        up_listener, relay_listener = _listener(), _listener()
        up_port = up_listener.getsockname()[1]
        children = [
            context.Process(target=upstream, args=(up_listener, pki, size), daemon=True),
            context.Process(target=python_relay, args=(relay_listener, pki, up_port), daemon=True),
        ]
        for child in children:
            child.start()
        nginx, nginx_port = start_nginx(work, pki, up_port)
        try:
            relays = {
                "python": (children[1].pid, relay_listener.getsockname()[1]),
                "nginx": (nginx.pid, nginx_port),
            }
            for pid, port in relays.values():  # warm-up: imports, first handshakes, caches
                assert pid is not None
                download(pki, port, size)
            cost: dict[str, list[float]] = {name: [] for name in relays}
            for round_ in range(args.repeat):
                order = list(relays) if round_ % 2 == 0 else list(reversed(relays))
                for name in order:
                    pid, port = relays[name]
                    assert pid is not None
                    before = cpu_seconds(pid)
                    download(pki, port, size)
                    cost[name].append((cpu_seconds(pid) - before) / (size / 1e9))
            load = os.getloadavg()[0]
            for name, values in cost.items():
                spread = ", ".join(f"{v:.2f}" for v in values)
                median = statistics.median(values)
                print(f"{name:7s} CPU-s/GB {median:.2f}  ({spread})")
            # CPU times tick in 10 ms: a leg too small to register says so instead of dividing.
            ratios = [p / n for p, n in zip(cost["python"], cost["nginx"], strict=True) if n > 0]
            if not ratios:
                raise SystemExit("legs too small to measure: use a larger --size")
            print(
                f"floor ratio python / nginx: {statistics.median(ratios):.2f} "
                f"({min(ratios):.2f}-{max(ratios):.2f}); load average {load:.1f}"
            )
        finally:
            nginx.terminate()
            nginx.wait(10)
            for child in children:
                child.terminate()
                child.join(10)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
