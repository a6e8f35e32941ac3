"""``python -m xca_gateway.arr serve|add-officer``: the repository's commands on their own
(the same as ``xca-gateway arr ...`` once the main CLI includes them)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from xca_gateway.arr.app import add_arr_command


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xca_gateway.arr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_arr_command(sub)
    args = parser.parse_args(["arr", *(sys.argv[1:] if argv is None else argv)])
    level = os.environ.get("XCA_GATEWAY_LOG_LEVEL", "info").upper()
    logging.basicConfig(
        level=getattr(logging, level, logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
