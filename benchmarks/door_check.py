"""What the caller model adds to every request: one door admission, timed in-process.

The identity a listener verified (here from real dev PKI certificates, as a TLS listener sees
them) goes through ``DoorGuard.admit`` against a benchmark policy (bench_policy): the consumer
at the /ig door, a peer gateway at the /xca door, then the peer's /xca policy decision (the
AuthorizationGate's). Compare with a request's CPU cost (``fanout.py`` prints it per query).

    python benchmarks/door_check.py [--number 100000]
"""

from __future__ import annotations

import argparse
import tempfile
import timeit
from pathlib import Path

from bench_policy import consumer, peer, policy

from xca_gateway.protocol.http_server import PeerCertificate, PeerInfo
from xca_gateway.protocol.tls import certificate_info
from xca_gateway.security.callers import Door
from xca_gateway.security.dev_pki import init_dev_pki
from xca_gateway.security.guard import DoorGuard, identity_from_peer
from xca_gateway.security.policy import PeerIdentity, parse_access_policy

HOME = "urn:oid:1.3.6.1.4.1.21367.13.70.1"


def peer_info(cert: Path) -> PeerInfo:
    """What a TLS listener learns from a client presenting ``cert``."""
    info = certificate_info(cert.read_bytes())
    return PeerInfo(
        "127.0.0.1",
        50000,
        PeerCertificate(
            subject=info.subject,
            issuer=info.issuer,
            serial_number=info.serial_number,
            fingerprint_sha256=info.fingerprint_sha256,
            san_dns=info.san_dns,
            san_ip=info.san_ip,
            san_uri=info.san_uri,
        ),
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--number", type=int, default=100_000, help="admissions per case")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        pki = init_dev_pki(Path(tmp), ["ig"])
        access = parse_access_policy(policy(callers=[consumer()], peers=[peer("ig", HOME)]))
        guard = DoorGuard(access.caller_directory)
        client, gateway = peer_info(pki.client.cert), peer_info(pki.communities["ig"].cert)
    cases = {
        "consumer at the /ig door": (client, Door.INITIATING),
        "peer gateway at the /xca door": (gateway, Door.XCA),
    }
    for name, (info, door) in cases.items():
        assert guard.admit(identity_from_peer(info), door, resource="/bench").allowed
        seconds = timeit.timeit(
            lambda info=info, door=door: guard.admit(
                identity_from_peer(info), door, resource="/bench"
            ),
            number=args.number,
        )
        print(f"{name}: {seconds / args.number * 1e6:.1f} µs per admission")
    identity = PeerIdentity.from_peer(gateway)
    assert access.decide(identity, "ITI-38", None).allowed
    seconds = timeit.timeit(lambda: access.decide(identity, "ITI-38", None), number=args.number)
    print(f"peer's /xca policy decision (ITI-38): {seconds / args.number * 1e6:.1f} µs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
