"""The PROXY protocol, version 2 (HAProxy's ``send-proxy-v2``): sans-IO parsing of its header.

A balancer in TCP mode keeps mutual TLS end to end, but then the gateway sees the balancer's
address, not the caller's. With PROXY v2 the balancer sends, before any byte of the client,
one binary header naming the client's address; the gateway reads it before the TLS handshake
(:mod:`xca_gateway.protocol.http_server`), only on a listener configured for it and only from
the configured balancers' addresses, and uses that address for audit records, per-source limits
and the access policy.

Header (proxy-protocol.txt §2.2): a 12-byte signature, one byte version (high nibble, 2) and
command (``LOCAL`` 0: the balancer's own connection, e.g. a health check; ``PROXY`` 1), one
byte address family and transport, a 16-bit big-endian length, then the addresses and
optional TLVs (ignored here). Version 1 (text, ``PROXY TCP4 ...``) is not accepted: a
balancer configured for it would be a configuration mistake, refused like garbage.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from typing import Literal

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
FIXED_LENGTH = 16
# The address block of each family (INET, INET6, UNIX), in bytes.
_ADDRESS_LENGTHS = {0x1: 12, 0x2: 36, 0x3: 216}
# No legitimate header needs more (addresses plus the TLVs HAProxy adds: ALPN, SNI, unique id,
# SSL details): a length beyond this is refused, never waited for.
MAX_HEADER_LENGTH = FIXED_LENGTH + 2048


class ProxyProtocolError(ValueError):
    """The connection did not start with a usable PROXY v2 header."""


@dataclass(frozen=True)
class ProxyHeader:
    """A parsed header. ``source`` is the client's (address, port); None for ``LOCAL`` or
    an address family this header does not carry (UNSPEC, UNIX): then the connection's own
    peer stands."""

    command: Literal["local", "proxy"]
    source: tuple[str, int] | None
    destination: tuple[str, int] | None
    length: int  # bytes the header took, TLVs included


def header_length(data: bytes) -> int | None:
    """How many bytes the whole header takes, once its fixed part (16 bytes) is known; None
    while fewer are known. Raises :class:`ProxyProtocolError` on anything but a v2 header."""
    prefix = data[: len(SIGNATURE)]
    if not SIGNATURE.startswith(prefix):
        if data.startswith(b"PROXY "):
            raise ProxyProtocolError("PROXY protocol v1 (text) header; only v2 is accepted")
        raise ProxyProtocolError("no PROXY protocol v2 signature")
    if len(data) < FIXED_LENGTH:
        return None
    version, command = data[12] >> 4, data[12] & 0x0F
    if version != 2:
        raise ProxyProtocolError(f"PROXY protocol version {version}, expected 2")
    if command not in (0, 1):
        raise ProxyProtocolError(f"unknown PROXY protocol command {command}")
    (length,) = struct.unpack("!H", data[14:16])
    total: int = FIXED_LENGTH + int(length)
    if total > MAX_HEADER_LENGTH:
        raise ProxyProtocolError(f"PROXY protocol header of {total} bytes is too long")
    return total


def parse_header(data: bytes) -> ProxyHeader | None:
    """The header at the start of ``data``; None while incomplete (read more). Bytes after it
    (the client's own) are not looked at."""
    total = header_length(data)
    if total is None or len(data) < total:
        return None
    command = "proxy" if data[12] & 0x0F == 1 else "local"
    family, transport = data[13] >> 4, data[13] & 0x0F
    body = data[FIXED_LENGTH:total]
    if command == "local":
        return ProxyHeader("local", None, None, total)
    if family == 0x0:  # UNSPEC: the balancer does not know (the addresses are ignored)
        return ProxyHeader("proxy", None, None, total)
    if family not in _ADDRESS_LENGTHS:
        raise ProxyProtocolError(f"unknown PROXY protocol address family {family}")
    if transport not in (0x1, 0x2):
        raise ProxyProtocolError(f"unknown PROXY protocol transport {transport}")
    if len(body) < _ADDRESS_LENGTHS[family]:
        raise ProxyProtocolError("PROXY protocol address block shorter than its family needs")
    if family == 0x3:  # UNIX sockets carry no address the gateway can use
        return ProxyHeader("proxy", None, None, total)
    size = 4 if family == 0x1 else 16
    source_ip = ipaddress.ip_address(body[:size])
    destination_ip = ipaddress.ip_address(body[size : 2 * size])
    source_port, destination_port = struct.unpack("!HH", body[2 * size : 2 * size + 4])
    return ProxyHeader(
        "proxy",
        (str(source_ip), source_port),
        (str(destination_ip), destination_port),
        total,
    )


def build_header(
    source: tuple[str, int] | None,
    destination: tuple[str, int] | None = None,
    *,
    tlvs: bytes = b"",
) -> bytes:
    """A v2 header (``PROXY`` over TCP, or ``LOCAL`` when ``source`` is None): for tests and
    tools that stand in for a balancer."""
    if source is None:
        return SIGNATURE + bytes([0x20, 0x00]) + struct.pack("!H", len(tlvs)) + tlvs
    src = ipaddress.ip_address(source[0])
    dst = ipaddress.ip_address(
        destination[0] if destination else ("0.0.0.0" if src.version == 4 else "::")
    )
    if src.version != dst.version:
        raise ValueError("source and destination must be of one address family")
    family = 0x11 if src.version == 4 else 0x21
    block = (
        src.packed
        + dst.packed
        + struct.pack("!HH", source[1], destination[1] if destination else 0)
    )
    return (
        SIGNATURE + bytes([0x21, family]) + struct.pack("!H", len(block) + len(tlvs)) + block + tlvs
    )


@dataclass(frozen=True)
class ProxySources:
    """The balancers a PROXY listener accepts connections from (addresses or networks)."""

    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]

    @classmethod
    def parse(cls, items: tuple[str, ...] | list[str]) -> ProxySources:
        return cls(tuple(ipaddress.ip_network(item, strict=False) for item in items))

    def allows(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip.version == net.version and ip in net for net in self.networks)
