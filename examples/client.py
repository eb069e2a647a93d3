"""A Python client of a prunelab deployment, on nothing but grpcio and grpcio-tools
(no torch, no prunelab package): submit a study, follow it, download its report.

    pip install grpcio==1.85.1 grpcio-tools==1.85.1
    python examples/client.py examples/smollm2.yaml --orchestrator localhost:50051 --out report/
    # compose and Kubernetes speak mutual TLS: add --tls-dir with the CLI's certificate folder

The gRPC stubs are generated at start from the .proto files (protos/ next to this
folder, or --protos DIR) into a temporary folder: the protos are the whole contract.
The report comes out through the orchestrator's GetArtifact stream; every file is
checked against the artifact's manifest, and the manifest against the artifact's
digest, before the folder is written.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import sys
import tempfile
from pathlib import Path

import grpc
from grpc_tools import protoc

PROTOS = Path(__file__).resolve().parent.parent / "protos"
CONNECT_TIMEOUT_S = 30
FINAL_STATES = ("done", "failed", "cancelled")


def generate_stubs(protos: Path, out: Path) -> None:
    """protoc the .proto files into `out` and make `out` the first place imports look."""
    files = sorted(str(path) for path in protos.glob("prunelab/v1/*.proto"))
    if not files:
        raise SystemExit(f"no .proto files in {protos}/prunelab/v1")
    include = str(Path(protoc.__file__).parent / "_proto")  # google/protobuf/*.proto
    if protoc.main(["protoc", f"-I{protos}", f"-I{include}", f"--python_out={out}", f"--grpc_python_out={out}", *files]) != 0:
        raise SystemExit("protoc failed")
    # regular packages, found before any installed prunelab: these stubs are the ones used
    for package in (out / "prunelab", out / "prunelab" / "v1"):
        (package / "__init__.py").touch()
    sys.path.insert(0, str(out))


def follow(stub, pb2, study_id: str) -> str:
    """Print each job's state and progress as the study's snapshots stream in; the final state."""
    seen: dict[str, tuple] = {}
    state = ""
    for study in stub.WatchStudy(pb2.WatchStudyRequest(study_id=study_id)):
        state = study.state
        for job in study.jobs:
            line = (job.state, round(job.fraction, 2), job.message)
            if seen.get(job.id) != line:
                seen[job.id] = line
                print(f"  {job.key:<48} {job.state:<9} {job.fraction:4.0%}  {job.error or job.message}")
        counts = study.counts
        print(f"{study.id}: {study.state} ({counts.done} done, {counts.running} running, {counts.pending} pending, {counts.failed} failed)")
    return state


def download(stub, pb2, uri: str, out: Path) -> list[Path]:
    """The artifact's files into `out`, each verified; nothing is written unless all are."""
    digest = uri.removeprefix("artifact://")
    responses = stub.GetArtifact(pb2.GetArtifactRequest(uri=uri))
    first = next(responses)
    if hashlib.sha256(first.manifest.manifest).hexdigest() != digest:
        raise SystemExit(f"the manifest of {uri} does not hash to its digest")
    expected = {entry["path"]: entry for entry in json.loads(first.manifest.manifest)["files"]}
    received: dict[str, bytearray] = {path: bytearray() for path in expected}
    for response in responses:
        if response.chunk.path not in received:
            raise SystemExit(f"{response.chunk.path!r} is not in the manifest of {uri}")
        received[response.chunk.path] += response.chunk.data
    for path, data in received.items():
        if len(data) != expected[path]["size"] or hashlib.sha256(data).hexdigest() != expected[path]["sha256"]:
            raise SystemExit(f"{path} of {uri} does not match its manifest")
    written = []
    for path, data in received.items():
        target = out / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        written.append(target)
    return written


def open_channel(target: str, tls_dir: Path | None, token: str) -> grpc.Channel:
    """Plaintext without `tls_dir`; else TLS verified against its ca.crt, showing its
    certificate when it has one; `token` sent with every call as a bearer token."""
    if tls_dir is None:
        if token:
            raise SystemExit("--token needs --tls-dir: a token must not travel in plaintext")
        return grpc.insecure_channel(target)
    identity = (tls_dir / "tls.crt").is_file()
    credentials = grpc.ssl_channel_credentials(
        root_certificates=(tls_dir / "ca.crt").read_bytes(),
        private_key=(tls_dir / "tls.key").read_bytes() if identity else None,
        certificate_chain=(tls_dir / "tls.crt").read_bytes() if identity else None,
    )
    if token:
        credentials = grpc.composite_channel_credentials(credentials, grpc.access_token_call_credentials(token))
    return grpc.secure_channel(target, credentials)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", type=Path, help="a study file, e.g. examples/smollm2.yaml")
    parser.add_argument("--orchestrator", default="localhost:50051", metavar="HOST:PORT")
    parser.add_argument("--out", type=Path, default=Path("report"), help="folder for the report (default %(default)s)")
    parser.add_argument("--protos", type=Path, default=PROTOS, help="folder holding prunelab/v1/*.proto (default %(default)s)")
    parser.add_argument("--tls-dir", type=Path, default=None,
                        help="dial TLS: a folder with ca.crt, and tls.crt / tls.key for mTLS (`prunelab certs` writes them)")
    parser.add_argument("--token", default="", help="a bearer token, if the deployment requires one")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="prunelab-stubs-") as stubs:
        generate_stubs(args.protos, Path(stubs))
        pb2 = importlib.import_module("prunelab.v1.orchestrator_pb2")
        pb2_grpc = importlib.import_module("prunelab.v1.orchestrator_pb2_grpc")
        with open_channel(args.orchestrator, args.tls_dir, args.token) as channel:
            grpc.channel_ready_future(channel).result(timeout=CONNECT_TIMEOUT_S)
            stub = pb2_grpc.OrchestratorStub(channel)
            submitted = stub.SubmitStudy(pb2.SubmitStudyRequest(study_yaml=args.study.read_text(), source=str(args.study)))
            study_id = submitted.study.id
            print(f"{'resumed' if submitted.resumed else 'submitted'} {study_id}: {submitted.study.counts.total} jobs")
            if follow(stub, pb2, study_id) != "done":
                print(f"{study_id} did not finish: {stub.GetStudy(pb2.GetStudyRequest(study_id=study_id)).error}", file=sys.stderr)
                return 1
            report = stub.GetStudy(pb2.GetStudyRequest(study_id=study_id)).report
            files = download(stub, pb2, report.uri, args.out)
    print(f"report {report.uri}: {len(files)} files verified -> {args.out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
