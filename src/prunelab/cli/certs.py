"""`prunelab certs`: a private CA and a certificate per name, for TLS and mTLS between
prunelab's services and from the CLI (README, Security). Each name gets a folder with
tls.crt, tls.key and ca.crt: point PRUNELAB_TLS_DIR at it, or make it a Kubernetes
Secret with `kubectl create secret generic prunelab-NAME-tls --from-file=OUT/NAME`.
Rerunning keeps the CA and every certificate that still fits, and adds new names."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("certs", help="make a private CA and TLS certificates for the services", description=__doc__)
    parser.add_argument("names", nargs="+", metavar="NAME", help="one certificate each, valid for NAME as a host name (e.g. pruner)")
    parser.add_argument("--out", type=Path, required=True, help="folder: OUT/ca holds the CA and its key, OUT/NAME each certificate")
    parser.add_argument("--host", action="append", default=[], metavar="HOST",
                        help="another DNS name or IP address every certificate is valid for (repeatable)")
    parser.add_argument("--days", type=int, default=365, help="validity of the certificates (default %(default)s)")
    parser.set_defaults(handler=_certs)


def _certs(args: argparse.Namespace) -> int:
    from prunelab.rpc.certs import issue_certificates

    for issued in issue_certificates(args.out, args.names, args.host, args.days):
        print(f"{issued.name}: {issued.folder} ({'new' if issued.created else 'kept'})")
    return 0
