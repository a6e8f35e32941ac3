"""Command line: ``xca-gateway serve | certs init | demo | config ...`` and the others."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from xca_gateway.app import config_reference
from xca_gateway.app.config import load_config
from xca_gateway.app.serve import serve
from xca_gateway.arr.app import add_arr_command
from xca_gateway.consumer.commands import add_consumer_commands
from xca_gateway.consumer.imaging import add_retrieve_study_command
from xca_gateway.doors.import_priors import add_import_priors_command
from xca_gateway.protocol.credentials import CredentialError
from xca_gateway.protocol.http_server import ListenError
from xca_gateway.security.consent.admin import add_consent_command
from xca_gateway.security.dev_pki import init_dev_pki
from xca_gateway.settings import ConfigError
from xca_gateway.tools.demo import run_demo
from xca_gateway.tools.import_manifests import add_import_command, registry_from_config
from xca_gateway.version import __version__


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # One INFO line per HTTP request of our own clients is noise for an operator.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger().level))


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(serve(Path(args.config)))
    except ConfigError as exc:
        _config_error(exc)
        return 2
    except (CredentialError, ListenError) as exc:
        # One line: the configuration file, the key and file or port, and what is wrong.
        print(f"xca-gateway: {Path(args.config).resolve()}: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"xca-gateway: {exc}", file=sys.stderr)
        return 1


def _config_error(exc: ConfigError) -> None:
    # One line per problem, each naming the file, the section and the key.
    for line in str(exc).splitlines():
        print(f"xca-gateway: configuration error: {line}", file=sys.stderr)


def cmd_config_check(args: argparse.Namespace) -> int:
    for name in args.config:
        try:
            load_config(Path(name))
        except ConfigError as exc:
            _config_error(exc)
            return 2
        print(f"{Path(name).resolve()}: ok")
    return 0


def cmd_certs_init(args: argparse.Namespace) -> int:
    names = [n.strip() for n in args.communities.split(",") if n.strip()]
    try:
        pki = init_dev_pki(Path(args.dir), names, force=args.force)
    except (ValueError, FileNotFoundError) as exc:
        print(f"xca-gateway: {exc}", file=sys.stderr)
        return 2
    print(f"development PKI in {pki.dir}")
    print(f"  CA (trust anchor): {pki.ca}")
    for name, pair in pki.communities.items():
        print(f"  {name}: {pair.cert} (server and client), key {pair.key}")
    print(f"  consumer client: {pki.client.cert}")
    print(f"  untrusted client: {pki.untrusted_client.cert} (issued by another CA)")
    print(f"  expired client: {pki.expired_client.cert}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    if args.replicas < 1:
        print("xca-gateway demo: --replicas must be at least 1", file=sys.stderr)
        return 2
    return run_demo(
        Path(args.workdir),
        communities=args.communities,
        base_port=args.base_port,
        replicas=args.replicas,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xca-gateway",
        description="IHE XCA / XCA-I federation gateway (ITI-38/39, RAD-75 responding; "
        "ITI-18/43, RAD-69 initiating) with mutual TLS.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--log-level",
        default="info",
        type=str.lower,
        choices=("debug", "info", "warning", "error"),
        help="debug, info, warning or error (default: info)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser(
        "serve",
        help="run one community's gateway",
        description="Run one community's gateway from a TOML configuration file "
        "(see conf/gateway.toml for every option). Stops cleanly on SIGINT/SIGTERM.",
    )
    serve.add_argument("--config", required=True, metavar="FILE", help="TOML configuration file")
    serve.set_defaults(func=cmd_serve)

    certs = sub.add_parser("certs", help="development PKI", description="Development PKI.")
    certs_sub = certs.add_subparsers(dest="certs_command", required=True, metavar="ACTION")
    init = certs_sub.add_parser(
        "init",
        help="create a development CA and certificates",
        description="Create a development CA, one server+client certificate per community, a "
        "consumer client certificate, and an expired and an untrusted client certificate for "
        "negative tests. Never use these on a live network.",
    )
    init.add_argument("--dir", required=True, help="output directory")
    init.add_argument(
        "--communities", required=True, help="comma-separated community names, e.g. north,south"
    )
    init.add_argument("--force", action="store_true", help="regenerate everything, new CA included")
    init.set_defaults(func=cmd_certs_init)

    demo = sub.add_parser(
        "demo",
        help="start N peered communities on loopback",
        description="Start N communities on 127.0.0.1, each with its own gateway, development "
        "certificates and sample imaging studies, peered with each other. Writes "
        "WORKDIR/endpoints.json once every endpoint accepts connections, then runs until "
        "SIGINT/SIGTERM and stops every process it started.",
    )
    demo.add_argument("--workdir", required=True, help="directory for certificates, data, configs")
    demo.add_argument(
        "--communities", type=int, default=3, help="number of communities (default 3)"
    )
    demo.add_argument(
        "--base-port",
        type=int,
        default=0,
        help="first port to use (community i uses base+10*i and base+10*i+1); "
        "0 (default) lets the OS choose free ports",
    )
    demo.add_argument(
        "--replicas",
        type=int,
        default=1,
        help="gateways per community (default 1); N > 1 runs them behind one HAProxy on the "
        "community's port, sharing a private PostgreSQL the demo starts (initdb in WORKDIR)",
    )
    demo.set_defaults(func=cmd_demo)

    config = sub.add_parser(
        "config",
        help="check configuration files; generate the reference",
        description="The configuration schema: check files against it, or regenerate what it "
        "generates (conf/gateway.toml, the README's configuration table, "
        "docs/gateway.schema.json).",
    )
    config_sub = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    check = config_sub.add_parser(
        "check",
        help="check configuration files without starting anything",
        description="Load each file as `serve` would (schema, paths, cross-checks) and report "
        "every problem, one line each.",
    )
    check.add_argument("config", nargs="+", metavar="FILE", help="TOML configuration file")
    check.set_defaults(func=cmd_config_check)
    reference = config_sub.add_parser(
        "reference",
        help="regenerate the reference configuration, README table and JSON Schema",
        description="Write conf/gateway.toml, the README's configuration table and "
        "docs/gateway.schema.json from the schema (run in the repository).",
    )
    config_reference.add_arguments(reference)
    reference.set_defaults(func=config_reference.run)

    add_import_command(sub, open_registry=registry_from_config)
    add_arr_command(sub)
    add_consent_command(sub)
    add_consumer_commands(sub)
    add_retrieve_study_command(sub)
    add_import_priors_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.log_level)
    result: int = args.func(args)
    return result
