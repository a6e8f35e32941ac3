"""No plaintext PHI on disk: spooled attachments are encrypted, unnamed, and gone after SIGKILL."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidTag

from tests.conftest import policy_toml
from tests.test_reliability_sigkill import _free_port, _start
from xca_gateway.protocol.encrypted_spool import BLOCK, EncryptedSpool
from xca_gateway.protocol.namespaces import Action
from xca_gateway.protocol.tls import client_context
from xca_gateway.security.dev_pki import DevPki


def _disk_bytes(directory: Path) -> bytes:
    return b"".join(p.read_bytes() for p in directory.rglob("*") if p.is_file())


def test_small_content_stays_in_memory(tmp_path: Path) -> None:
    with EncryptedSpool(1024, dir=str(tmp_path)) as spool:
        spool.write(b"patient data")
        assert not spool._rolled
        spool.seek(0)
        assert spool.read() == b"patient data"
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("size", [BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 17])
def test_spilled_content_reads_back_exactly_and_is_sealed_on_disk(
    tmp_path: Path, size: int
) -> None:
    marker = f"PHI-{uuid.uuid4()}".encode()
    data = (marker * (size // len(marker) + 1))[:size]
    with EncryptedSpool(100, dir=str(tmp_path)) as spool:
        for i in range(0, size, 7000):  # arbitrary write sizes across block boundaries
            spool.write(data[i : i + 7000])
        assert spool._rolled and spool.tell() == size
        # The file has no name: nothing to find in the spool directory.
        assert not list(tmp_path.iterdir())
        fd = spool._fd
        assert fd is not None
        on_disk = os.pread(fd, 10 * BLOCK, 0)
        assert marker not in on_disk
        spool.seek(0)
        assert spool.read() == data
        # Random access across blocks.
        spool.seek(size // 2)
        assert spool.read(BLOCK + 5) == data[size // 2 : size // 2 + BLOCK + 5]
        spool.seek(0)
        assert b"".join(iter(lambda: spool.read(4096), b"")) == data


def test_a_tampered_block_is_detected(tmp_path: Path) -> None:
    with EncryptedSpool(10, dir=str(tmp_path)) as spool:
        spool.write(b"x" * (2 * BLOCK))
        assert spool._fd is not None
        os.pwrite(spool._fd, b"\x00", 5)
        spool.seek(0)
        with pytest.raises(InvalidTag):
            spool.read(10)


def test_append_only(tmp_path: Path) -> None:
    with EncryptedSpool(10, dir=str(tmp_path)) as spool:
        spool.write(b"abc")
        spool.seek(0)
        with pytest.raises(OSError):
            spool.write(b"d")


def test_sigkill_mid_spool_leaves_no_readable_phi(pki: DevPki, tmp_path: Path) -> None:
    """A large MTOM request trickles in; the gateway spools its attachment (encrypted, on an
    unnamed file). Read through /proc while it is in flight: no marker. SIGKILL: nothing left in
    the spool directory; the restarted gateway starts clean."""
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    https, admin = _free_port(), _free_port()
    config = tmp_path / "gateway.toml"
    pair = pki.communities["alpha"]
    config.write_text(
        f"""
[community]
name = "alpha"
home_community_id = "urn:oid:1.3.6.1.4.1.21367.13.70.1"
patient_id_assigning_authority = "1.3.6.1.4.1.21367.13.20.1000"

[server]
host = "127.0.0.1"
port = {https}

[admin]
host = "127.0.0.1"
port = {admin}

[tls]
certificate = "{pair.cert}"
private_key = "{pair.key}"
trust_store = "{pki.ca}"

[storage]
data_dir = "{tmp_path / "data"}"

[limits]
spool_dir = "{spool_dir}"
spool_threshold = 65536

{policy_toml()}
"""
    )
    marker = f"PATIENT-SECRET-{uuid.uuid4()}".encode()
    boundary = "bnd" + uuid.uuid4().hex
    root = (
        f'<s:Envelope xmlns:s="http://www.w3.org/2003/05/soap-envelope" '
        f'xmlns:a="http://www.w3.org/2005/08/addressing"><s:Header>'
        f"<a:Action>{Action.ITI43}</a:Action></s:Header><s:Body/></s:Envelope>"
    ).encode()
    head = (
        f"--{boundary}\r\nContent-Type: application/xop+xml; charset=UTF-8; "
        f'type="application/soap+xml"\r\nContent-ID: <root@x>\r\n\r\n'
    ).encode() + root
    head += f"\r\n--{boundary}\r\nContent-Type: application/octet-stream\r\n".encode()
    head += b"Content-ID: <doc@x>\r\n\r\n"
    attachment = marker * (2_000_000 // len(marker))
    process = _start(config, admin)
    ctx = client_context(pki.ca, pki.client.cert, pki.client.key)
    try:
        with (
            socket.create_connection(("127.0.0.1", https), timeout=10) as raw,
            ctx.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            content_type = (
                f'multipart/related; boundary="{boundary}"; type="application/xop+xml"; '
                f'start="<root@x>"; start-info="application/soap+xml"'
            )
            # A retrieve endpoint: query endpoints take bodies of at most 1 MiB (max_query_bytes).
            tls.sendall(
                b"POST /ig/iti43 HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n"
                + f"Content-Type: {content_type}\r\n\r\n".encode()
            )
            body = head + attachment
            for i in range(0, len(body), 256 * 1024):
                piece = body[i : i + 256 * 1024]
                tls.sendall(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            # The request is still open (no last chunk): the attachment sits in the spool.
            deadline = time.monotonic() + 20
            spooled: list[bytes] = []
            while time.monotonic() < deadline and not spooled:
                time.sleep(0.2)
                spooled = _open_spool_files(process.pid, spool_dir)
            assert spooled, "the gateway did not spool the attachment to disk"
            for content in spooled:
                assert len(content) > 1_000_000
                assert marker not in content
            assert marker not in _disk_bytes(spool_dir)
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
            with pytest.raises((ssl.SSLError, OSError)):
                tls.sendall(b"0\r\n\r\n")
                if not tls.recv(1024):
                    raise ConnectionError("closed by the killed gateway")
        assert not list(spool_dir.iterdir())
        process = _start(config, admin)
        assert not list(spool_dir.iterdir())
        assert marker not in _disk_bytes(tmp_path)
    finally:
        if process.poll() is None:
            # SIGTERM drains (up to drain_timeout); on a loaded machine that can pass 10 s.
            process.terminate()
            try:
                process.wait(timeout=45)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


def _open_spool_files(pid: int, spool_dir: Path) -> list[bytes]:
    """The contents of the process's open files that live (unnamed) in ``spool_dir``."""
    found = []
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith(str(spool_dir)):
            try:
                found.append(fd.read_bytes())
            except OSError:
                continue
    return found
