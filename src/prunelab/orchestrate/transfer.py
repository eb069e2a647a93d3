"""Files in and out of a deployment over the orchestrator's gRPC API: a dataset
uploaded in chunks and imported into the deployment's store (ImportDataset), an
artifact streamed out with its manifest and verified by the client (GetArtifact).

Both sides live here: the servicer's (`receive_upload`, `artifact_stream`) and the
CLI's (`upload_dataset`, `download_artifact`)."""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from prunelab.data.formats import split_files
from prunelab.errors import IntegrityError, InvalidArgument
from prunelab.store import ArtifactStore, parse_artifact_uri
from prunelab.store.manifest import FileEntry, Manifest, check_file, collect_files, safe_relative_path
from prunelab.v1 import common_pb2
from prunelab.v1.orchestrator_pb2 import (
    ArtifactManifest,
    FileChunk,
    GetArtifactRequest,
    GetArtifactResponse,
    ImportDatasetHeader,
    ImportDatasetRequest,
    ImportDatasetResponse,
)
from prunelab.v1.orchestrator_pb2_grpc import OrchestratorStub

CHUNK_BYTES = 1 << 20  # well under gRPC's 4 MiB message limit


# ---- the orchestrator's side


def receive_upload(requests: Iterator[ImportDatasetRequest], staging: Path, max_bytes: int) -> tuple[ImportDatasetHeader, Path]:
    """Write an ImportDataset stream's files below `staging`; returns its header and
    what to import: the one file, or `staging` itself for a folder upload."""
    first = next(requests, None)
    if first is None or first.WhichOneof("part") != "header":
        raise InvalidArgument("an upload starts with its header (name, split, format)", field="header")
    header, received, total = first.header, [], 0
    for request in requests:
        if request.WhichOneof("part") != "chunk":
            raise InvalidArgument("only the first message of an upload is a header", field="header")
        total += len(request.chunk.data)
        if total > max_bytes:
            raise InvalidArgument(f"the upload is larger than {max_bytes} bytes (PRUNELAB_MAX_UPLOAD_BYTES)", field="chunk")
        if not received or received[-1] != request.chunk.path:
            received.append(_start_file(request.chunk.path, received, staging))
        with (staging / request.chunk.path).open("ab") as handle:
            handle.write(request.chunk.data)
    if not received:
        raise InvalidArgument("the upload holds no file", field="chunk")
    if header.folder:
        return header, staging
    if len(received) != 1:
        raise InvalidArgument(f"a one-file upload holds {len(received)} files; mark it as a folder", field="folder")
    return header, staging / received[0]


def _start_file(path: str, received: list[str], staging: Path) -> str:
    try:
        safe_relative_path(path)
    except IntegrityError:
        raise InvalidArgument(f"unsafe file path {path!r} in the upload (absolute, empty or with '..')", field="chunk.path") from None
    if path in received:
        raise InvalidArgument(f"the chunks of {path!r} are not together: send each file's chunks in one run", field="chunk.path")
    (staging / path).parent.mkdir(parents=True, exist_ok=True)
    return path


def artifact_stream(store: ArtifactStore, uri: str) -> Iterator[GetArtifactResponse]:
    """The manifest, then every file of the artifact in chunks, from a verified local copy."""
    ref = store.stat(uri)
    folder = store.get_dir(ref.uri)  # verified against the stored manifest on the way
    sources = collect_files(folder)
    manifest = Manifest.build(ref.kind, ref.meta, sources)
    yield GetArtifactResponse(manifest=ArtifactManifest(
        artifact=common_pb2.ArtifactRef(uri=ref.uri, digest=ref.digest, kind=ref.kind, size_bytes=ref.size),
        manifest=manifest.canonical_bytes(),
    ))
    for entry in manifest.files:
        with sources[entry.path].open("rb") as handle:
            while data := handle.read(CHUNK_BYTES):
                yield GetArtifactResponse(chunk=FileChunk(path=entry.path, data=data))


# ---- the client's side


def upload_dataset(stub: OrchestratorStub, name: str, path: Path, split: str | None, data_format: str | None) -> ImportDatasetResponse:
    """Send file or folder `path` to the orchestrator's ImportDataset; a folder sends
    its split files (the ones `prunelab data import` would read)."""
    if path.is_dir():
        files = {source.name: source for source in split_files(path).values()}
    elif path.is_file():
        files = {path.name: path}
    else:
        raise InvalidArgument(f"{path} does not exist", field="path")
    header = ImportDatasetHeader(name=name, split=split or "", format=data_format or "", folder=path.is_dir())

    def requests() -> Iterator[ImportDatasetRequest]:
        yield ImportDatasetRequest(header=header)
        for relative, source in files.items():
            with source.open("rb") as handle:
                while data := handle.read(CHUNK_BYTES):
                    yield ImportDatasetRequest(chunk=FileChunk(path=relative, data=data))

    return stub.ImportDataset(requests())


def download_artifact(stub: OrchestratorStub, uri: str, out_dir: Path) -> list[Path]:
    """Fetch an artifact into `out_dir`, every file checked against the manifest,
    and the manifest against the artifact's digest; nothing is left in `out_dir`
    unless all of it verifies."""
    digest = parse_artifact_uri(uri)
    responses = stub.GetArtifact(GetArtifactRequest(uri=uri))
    first = next(responses, None)
    if first is None or first.WhichOneof("part") != "manifest":
        raise IntegrityError(f"the orchestrator sent no manifest for {uri}", field="uri")
    manifest = Manifest.parse(first.manifest.manifest, digest)  # IntegrityError unless it hashes to the digest
    entries = {entry.path: entry for entry in manifest.files}
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".prunelab-get-", dir=out_dir) as staging_dir:
        staging = Path(staging_dir)
        hashes = _receive_files(responses, entries, staging)
        for path, entry in entries.items():
            if path not in hashes:  # an empty file has no chunks
                (staging / path).parent.mkdir(parents=True, exist_ok=True)
                (staging / path).touch()
            check_file(digest, entry, *hashes.get(path, (hashlib.sha256().hexdigest(), 0)))
        written = []
        for path in entries:
            target = out_dir / path
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(staging / path, target)
            written.append(target)
    return written


def _receive_files(responses: Iterator[GetArtifactResponse], entries: dict[str, FileEntry], staging: Path) -> dict[str, tuple[str, int]]:
    """Write the chunks below `staging`; each file's (sha256, size) as received."""
    digests: dict[str, hashlib._Hash] = {}
    sizes: dict[str, int] = {}
    for response in responses:
        chunk = response.chunk
        if chunk.path not in entries:
            raise IntegrityError(f"the orchestrator sent {chunk.path!r}, which the manifest does not list", field="path")
        target = staging / safe_relative_path(chunk.path)
        target.parent.mkdir(parents=True, exist_ok=True)
        with target.open("ab") as handle:
            handle.write(chunk.data)
        digests.setdefault(chunk.path, hashlib.sha256()).update(chunk.data)
        sizes[chunk.path] = sizes.get(chunk.path, 0) + len(chunk.data)
    return {path: (digests[path].hexdigest(), sizes[path]) for path in digests}
