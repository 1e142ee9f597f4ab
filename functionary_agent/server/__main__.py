"""`python -m functionary_agent.server serve ...`: the `serve` command without the rest of the CLI."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from functionary_agent.errors import FunctionaryAgentError
from functionary_agent.server.cli import add_serve_parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m functionary_agent.server")
    add_serve_parser(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args))
    except FunctionaryAgentError as error:
        print(f"functionary-agent: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
