"""`prunelab artifact list`, `prunelab artifact get artifact://... --out DIR` and
`prunelab artifact verify`: checkpoints, adapters, datasets and reports out of any
store, verified; and the whole store checked after an incident.

The store is the configured one (PRUNELAB_STORE), another one named by `--store`
(`s3://bucket/prefix` with the PRUNELAB_S3_* keys from the environment, or a
path), or a deployment's, through its orchestrator (`--orchestrator HOST:PORT`)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("artifact", help="list stored artifacts and fetch one, verified", description=__doc__)
    commands = parser.add_subparsers(dest="artifact_command", required=True, metavar="ACTION")

    lister = commands.add_parser("list", help="list the store's artifacts")
    lister.add_argument("--kind", help="only this kind: model, adapter, gguf, dataset, report, ...")
    lister.add_argument("--json", action="store_true", help="one JSON document instead of a table")
    _where(lister)
    lister.set_defaults(handler=_list)

    getter = commands.add_parser("get", help="copy an artifact's files into a folder, each checked against its manifest")
    getter.add_argument("uri", metavar="artifact://DIGEST")
    getter.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder to write the files to (created if needed)")
    _where(getter)
    getter.set_defaults(handler=_get)

    verifier = commands.add_parser("verify", help="read every artifact back from the store and check it against its manifest",
                                   description="Exit status 1 if any artifact is damaged. Orphans (files of an interrupted "
                                               "upload, without a manifest) are listed: readers never see them.")
    verifier.add_argument("--store", metavar="URL", help="s3://bucket[/prefix] (keys from PRUNELAB_S3_*), file:///path or a path; "
                                                        "default: PRUNELAB_STORE")
    verifier.set_defaults(handler=_verify)


def _where(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--store", metavar="URL", help="s3://bucket[/prefix] (keys from PRUNELAB_S3_*), file:///path or a path; "
                                                     "default: PRUNELAB_STORE")
    where.add_argument("--orchestrator", metavar="HOST:PORT", help="a deployment's orchestrator: its store, over gRPC")


def _list(args: argparse.Namespace) -> int:
    if args.orchestrator:
        from prunelab.rpc import domain_errors, make_channel
        from prunelab.v1.orchestrator_pb2 import ListArtifactsRequest
        from prunelab.v1.orchestrator_pb2_grpc import OrchestratorStub

        with make_channel(args.orchestrator) as channel, domain_errors():
            listed = OrchestratorStub(channel).ListArtifacts(ListArtifactsRequest(kind=args.kind or "")).artifacts
        artifacts = [{"uri": a.uri, "kind": a.kind, "size": a.size_bytes} for a in listed]
    else:
        artifacts = [{"uri": a.uri, "kind": a.kind, "size": a.size, "files": a.files, "meta": a.meta}
                     for a in chosen_store(args.store).list(args.kind)]
    if args.json:
        print(json.dumps(artifacts, indent=2))
    else:
        from prunelab.cli.data import _human_size, _table

        print(_table(["URI", "KIND", "SIZE"], [[a["uri"], a["kind"], _human_size(a["size"])] for a in artifacts]))
    return 0


def _get(args: argparse.Namespace) -> int:
    if args.orchestrator:
        from prunelab.orchestrate.transfer import download_artifact
        from prunelab.rpc import domain_errors, make_channel
        from prunelab.v1.orchestrator_pb2_grpc import OrchestratorStub

        with make_channel(args.orchestrator) as channel, domain_errors():
            written = download_artifact(OrchestratorStub(channel), args.uri, args.out)
    else:
        folder = chosen_store(args.store).get_dir(args.uri)  # every file checked against the manifest
        shutil.copytree(folder, args.out, dirs_exist_ok=True)
        written = [args.out / path.relative_to(folder) for path in folder.rglob("*") if path.is_file()]
    print(f"{args.uri}: {len(written)} files verified -> {args.out}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    audit = chosen_store(args.store).audit()
    for digest, reason in audit.damaged.items():
        print(f"DAMAGED artifact://{digest}: {reason}")
    for digest in audit.orphans:
        print(f"orphan  artifact://{digest} (an interrupted upload; readers never see it)")
    print(f"{len(audit.verified)} verified, {len(audit.damaged)} damaged, {len(audit.orphans)} orphans")
    return 1 if audit.damaged else 0


def chosen_store(url: str | None) -> Any:
    """The store `--store URL` names (S3 keys from PRUNELAB_S3_*), else the configured one."""
    from prunelab.config import settings
    from prunelab.store import open_store

    cfg = settings()
    return open_store(dataclasses.replace(cfg, store=url) if url else cfg)
