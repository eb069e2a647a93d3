"""Deployment configuration from environment variables, parsed once.

Env vars wire a deployment (addresses, store, credentials, log level); experiment
parameters travel in request messages and study files, never here.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path

from prunelab.errors import InvalidArgument


def _bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise InvalidArgument(f"{name}={raw!r} is not a boolean (use true or false)", field=name)


def _int(name: str, default: int) -> int:
    return _number(name, default, int, "an integer")


def _float(name: str, default: float) -> float:
    return _number(name, default, float, "a number")


def _number(name: str, default, parse, what: str):
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return parse(raw)
    except ValueError:
        raise InvalidArgument(f"{name}={raw!r} is not {what}", field=name) from None


def _token() -> str:
    """PRUNELAB_AUTH_TOKEN, or the first line of the file PRUNELAB_AUTH_TOKEN_FILE (a mounted Secret)."""
    token = os.environ.get("PRUNELAB_AUTH_TOKEN", "")
    path = os.environ.get("PRUNELAB_AUTH_TOKEN_FILE", "")
    if token and path:
        raise InvalidArgument("set PRUNELAB_AUTH_TOKEN or PRUNELAB_AUTH_TOKEN_FILE, not both", field="PRUNELAB_AUTH_TOKEN_FILE")
    if path:
        try:
            token = Path(path).expanduser().read_text(encoding="utf-8").strip()
        except OSError as err:
            raise InvalidArgument(f"PRUNELAB_AUTH_TOKEN_FILE: cannot read {path}: {err.strerror}", field="PRUNELAB_AUTH_TOKEN_FILE") from None
        if not token:
            raise InvalidArgument(f"PRUNELAB_AUTH_TOKEN_FILE: {path} is empty", field="PRUNELAB_AUTH_TOKEN_FILE")
    return token


@dataclass(frozen=True)
class S3Settings:
    endpoint: str  # host:port, no scheme
    access_key: str
    secret_key: str = field(repr=False)  # never in a log line or an error message
    secure: bool  # TLS
    region: str | None
    retry_s: float  # how long a call keeps retrying while S3 is unreachable


# The most one request may ask for, by kind of field (prunelab.limits): generous for a
# large GPU host, small enough that no request allocates without bound. Each is an env var.
LIMIT_VARIABLES = {
    "samples": ("PRUNELAB_MAX_SAMPLES", 65_536),  # calibration / correction / validation examples
    "seq_len": ("PRUNELAB_MAX_SEQ_LEN", 131_072),  # tokens per window or example
    "windows": ("PRUNELAB_MAX_WINDOWS", 1_000_000),  # perplexity windows per text
    "batch_size": ("PRUNELAB_MAX_BATCH_SIZE", 4_096),
    "steps": ("PRUNELAB_MAX_STEPS", 10_000_000),  # training steps (and epochs)
    "rank": ("PRUNELAB_MAX_LORA_RANK", 4_096),
    "repeats": ("PRUNELAB_MAX_REPEATS", 10_000),  # timed and warm-up rounds
    "gen_tokens": ("PRUNELAB_MAX_GEN_TOKENS", 65_536),
    "task_docs": ("PRUNELAB_MAX_TASK_DOCS", 10_000_000),  # lm-eval `limit`
    "fewshot": ("PRUNELAB_MAX_FEWSHOT", 128),
    "study_jobs": ("PRUNELAB_MAX_STUDY_JOBS", 10_000),  # jobs one study file expands to
    "study_bytes": ("PRUNELAB_MAX_STUDY_BYTES", 1_048_576),  # size of a study file
}


@dataclass(frozen=True)
class TransportSettings:
    """How this process's gRPC servers and channels are secured (README, Security)."""

    # A folder in cert-manager's layout: tls.crt and tls.key (this process's certificate:
    # served, and shown to servers that ask for one) and ca.crt (the CA that signed the
    # other side). Set: servers serve TLS only and channels dial TLS only. None: plaintext.
    tls_dir: Path | None
    client_auth: bool  # mTLS: servers refuse clients without a certificate signed by ca.crt
    token: str = field(repr=False)  # bearer token servers require and channels send; "" = none
    reflection: bool  # servers list their services for grpcurl and friends
    allow_plaintext: bool  # channels may dial a non-loopback address without TLS


@dataclass(frozen=True)
class Settings:
    home: Path  # embedded store and caches live below it
    store: str  # "file:///abs/path", a plain path, or "s3://bucket[/prefix]"
    store_write_area: str  # "" (the store's root) or a folder of it the process's key may write (store/base.py)
    s3: S3Settings
    cache_dir: Path  # verified local copies of artifacts and converted models
    offline: bool  # never reach a model or dataset hub
    hub_timeout_s: float  # the hub reachability probe's connect timeout
    log_level: str
    log_format: str  # "text" or "json"
    grpc_port: int
    health_port: int | None  # a plaintext health-only port for TLS-less probes; None: none
    grpc_max_workers: int
    grpc_max_message_bytes: int  # the largest message a server or channel sends or receives
    # Calls a server holds at once (beyond: RESOURCE_EXHAUSTED, not an unbounded queue),
    # and the orchestrator's live WatchStudy streams, each holding a thread: capped below
    # the thread count so unary calls and health checks always find one.
    grpc_max_concurrent_rpcs: int
    max_watch_streams: int
    max_concurrent_jobs: int
    # Processes one tuning job trains on, data-parallel under torchrun (one GPU each
    # with a CUDA device: the node's GPU count uses them all); 1 = in the service's process.
    tuner_processes: int
    grpc_host: str  # bind address: 127.0.0.1 locally, [::] in containers
    device: str  # "auto" (CUDA when present), "cpu", "cuda", "cuda:1"
    data_dir: Path | None  # folder of <name>/<split files> the dataset registry also reads
    # Folders under which a remote request may name local files (prunelab.access);
    # PRUNELAB_DATA_DIR is one too. Hub orgs a remote request may name ids of (empty: any).
    read_roots: tuple[Path, ...]
    hub_orgs: tuple[str, ...]
    # The orchestrator: gRPC targets of the workers ("host:port", "dns:///evaluator:50051",
    # "ipv4:127.0.0.1:p1,127.0.0.1:p2"); None runs that kind of job in-process.
    pruner_addr: str | None
    tuner_addr: str | None
    evaluator_addr: str | None
    profiler_addr: str | None
    orchestrator_db: Path  # SQLite file holding studies and jobs
    orchestrator_max_parallel: int  # jobs the orchestrator runs at once, all studies together
    # How long a job waits for its worker to accept connections (a worker still pulling
    # its image or loading torch is late, not failed) before the job fails.
    worker_ready_timeout_s: int
    # The orchestrator's watchdog (0: off): a job whose worker sends nothing for this
    # long is re-dispatched; one running longer than the deadline fails.
    job_stall_timeout_s: float
    job_deadline_s: float
    metrics_port: int  # the orchestrator's Prometheus /metrics; 0 turns it off
    max_upload_bytes: int  # largest dataset the orchestrator accepts over gRPC
    transport: TransportSettings
    limits: dict[str, int]  # LIMIT_VARIABLES' kinds -> their maxima

    def torch_device(self) -> str:
        """The device jobs run on; "auto" picks CUDA when this host has it."""
        if self.device != "auto":
            return self.device
        import torch  # here, not at module level: the CLI must start fast

        return "cuda" if torch.cuda.is_available() else "cpu"

    @classmethod
    def from_env(cls) -> Settings:
        home = Path(os.environ.get("PRUNELAB_HOME", "~/.prunelab")).expanduser().resolve()
        log_format = os.environ.get("PRUNELAB_LOG_FORMAT", "text")
        if log_format not in ("text", "json"):
            raise InvalidArgument(f"PRUNELAB_LOG_FORMAT={log_format!r}: use text or json", field="PRUNELAB_LOG_FORMAT")
        return cls(
            home=home,
            store=os.environ.get("PRUNELAB_STORE", str(home / "store")),
            store_write_area=os.environ.get("PRUNELAB_STORE_WRITE_AREA", "").strip("/"),
            s3=S3Settings(
                endpoint=os.environ.get("PRUNELAB_S3_ENDPOINT", "localhost:9000"),
                access_key=os.environ.get("PRUNELAB_S3_ACCESS_KEY", ""),
                secret_key=os.environ.get("PRUNELAB_S3_SECRET_KEY", ""),
                secure=_bool("PRUNELAB_S3_SECURE", False),
                region=os.environ.get("PRUNELAB_S3_REGION") or None,
                retry_s=_float("PRUNELAB_S3_RETRY_S", 300.0),
            ),
            cache_dir=Path(os.environ.get("PRUNELAB_CACHE", str(home / "cache"))).expanduser().resolve(),
            offline=_bool("PRUNELAB_OFFLINE", _bool("HF_HUB_OFFLINE", False)),
            hub_timeout_s=_float("PRUNELAB_HUB_TIMEOUT_S", 3.0),
            log_level=os.environ.get("PRUNELAB_LOG_LEVEL", "INFO").upper(),
            log_format=log_format,
            grpc_port=_int("PRUNELAB_GRPC_PORT", 50051),
            health_port=_int("PRUNELAB_HEALTH_PORT", 0) if os.environ.get("PRUNELAB_HEALTH_PORT") else None,
            grpc_max_workers=_int("PRUNELAB_GRPC_MAX_WORKERS", 8),
            grpc_max_message_bytes=_int("PRUNELAB_GRPC_MAX_MESSAGE_BYTES", 64 * 2**20),
            grpc_max_concurrent_rpcs=_int("PRUNELAB_GRPC_MAX_CONCURRENT_RPCS", 64),
            max_watch_streams=_int("PRUNELAB_MAX_WATCH_STREAMS", max(1, _int("PRUNELAB_GRPC_MAX_WORKERS", 8) - 2)),
            max_concurrent_jobs=_int("PRUNELAB_MAX_CONCURRENT_JOBS", 1),
            tuner_processes=_int("PRUNELAB_TUNER_PROCESSES", 1),
            grpc_host=os.environ.get("PRUNELAB_GRPC_HOST", "127.0.0.1"),
            device=os.environ.get("PRUNELAB_DEVICE", "auto"),
            data_dir=Path(os.environ["PRUNELAB_DATA_DIR"]).expanduser() if os.environ.get("PRUNELAB_DATA_DIR") else None,
            read_roots=tuple(Path(p).expanduser() for p in os.environ.get("PRUNELAB_READ_ROOTS", "").split(os.pathsep) if p),
            hub_orgs=tuple(org.strip() for org in os.environ.get("PRUNELAB_HUB_ORGS", "").split(",") if org.strip()),
            pruner_addr=os.environ.get("PRUNELAB_PRUNER_ADDR") or None,
            tuner_addr=os.environ.get("PRUNELAB_TUNER_ADDR") or None,
            evaluator_addr=os.environ.get("PRUNELAB_EVALUATOR_ADDR") or None,
            profiler_addr=os.environ.get("PRUNELAB_PROFILER_ADDR") or None,
            orchestrator_db=Path(os.environ.get("PRUNELAB_ORCHESTRATOR_DB", str(home / "orchestrator.db"))).expanduser().resolve(),
            orchestrator_max_parallel=_int("PRUNELAB_ORCHESTRATOR_MAX_PARALLEL", 8),
            worker_ready_timeout_s=_int("PRUNELAB_WORKER_READY_TIMEOUT_S", 900),
            job_stall_timeout_s=_float("PRUNELAB_JOB_STALL_TIMEOUT_S", 1800.0),
            job_deadline_s=_float("PRUNELAB_JOB_DEADLINE_S", 172_800.0),
            metrics_port=_int("PRUNELAB_METRICS_PORT", 9100),
            max_upload_bytes=_int("PRUNELAB_MAX_UPLOAD_BYTES", 4 * 2**30),
            limits={kind: _int(variable, default) for kind, (variable, default) in LIMIT_VARIABLES.items()},
            transport=TransportSettings(
                tls_dir=Path(os.environ["PRUNELAB_TLS_DIR"]).expanduser() if os.environ.get("PRUNELAB_TLS_DIR") else None,
                client_auth=_bool("PRUNELAB_TLS_CLIENT_AUTH", False),
                token=_token(),
                reflection=_bool("PRUNELAB_GRPC_REFLECTION", True),
                allow_plaintext=_bool("PRUNELAB_ALLOW_PLAINTEXT", False),
            ),
        )


@functools.cache
def settings() -> Settings:
    """The process's settings; tests that change the environment call `settings.cache_clear()`."""
    return Settings.from_env()
