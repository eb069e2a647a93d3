"""`python -m prunelab.rpc.healthcheck HOST:PORT [SERVICE]`: exit 0 iff the server
reports SERVING. Containers use it as their healthcheck command."""

from __future__ import annotations

import argparse
import sys

from prunelab.errors import Unavailable
from prunelab.rpc.client import HEALTH_CHECK_TIMEOUT_S, check_health

EXIT_SERVING = 0
EXIT_UNHEALTHY = 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m prunelab.rpc.healthcheck", description=__doc__.splitlines()[0])
    parser.add_argument("target", metavar="HOST:PORT")
    parser.add_argument("service", metavar="SERVICE", nargs="?", default="", help='full service name; default "" (the whole server)')
    parser.add_argument("--timeout", type=float, default=HEALTH_CHECK_TIMEOUT_S, help="seconds (default %(default)s)")
    args = parser.parse_args(argv)
    try:
        status = check_health(args.target, args.service, timeout=args.timeout)
    except Unavailable as err:
        print(err.reason, file=sys.stderr)
        return EXIT_UNHEALTHY
    print(status)
    return EXIT_SERVING if status == "SERVING" else EXIT_UNHEALTHY


if __name__ == "__main__":
    sys.exit(main())
