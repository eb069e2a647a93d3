"""Channels to prunelab services, readiness and health checks."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from prunelab.config import TransportSettings, settings
from prunelab.errors import Unavailable, error_class
from prunelab.rpc.security import channel_credentials, check_plaintext_allowed, tls_name_options, with_token
from prunelab.rpc.status import JOB_ID_METADATA_KEY, error_detail

# gRPC keeps one long-lived HTTP/2 connection per channel. Behind a Kubernetes
# ClusterIP that pins every call to one pod; with a headless service and a
# "dns:///name:port" target, round_robin spreads calls over every resolved address.
# UNAVAILABLE (no connection, server draining, store briefly unreachable) is retried;
# gRPC only retries a call before any response arrived, so a stream is never replayed.
_SERVICE_CONFIG = {
    "loadBalancingConfig": [{"round_robin": {}}],
    "methodConfig": [
        {
            "name": [{}],  # every method of every service
            "retryPolicy": {
                "maxAttempts": 4,
                "initialBackoff": "0.2s",
                "maxBackoff": "2s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }
    ],
}

_CHANNEL_OPTIONS = [
    ("grpc.service_config", json.dumps(_SERVICE_CONFIG)),
    ("grpc.enable_retries", 1),
    # A stream may be quiet for minutes between progress events; pings notice a dead
    # peer (pod killed, connection silently dropped) instead of waiting forever.
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
    # A worker that is not up yet is retried every few seconds rather than gRPC's
    # default backoff of up to 2 minutes, so a late worker is used as soon as it serves.
    ("grpc.max_reconnect_backoff_ms", 5_000),
]

HEALTH_CHECK_TIMEOUT_S = 5.0


def message_size_options() -> list[tuple[str, int]]:
    """gRPC's limits on one message, both ways, from PRUNELAB_GRPC_MAX_MESSAGE_BYTES: set
    explicitly on every server and channel, so both ends agree (results carry no bulk:
    checkpoints and reports travel through the store, uploads in chunks)."""
    limit = settings().grpc_max_message_bytes
    return [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)]


def make_channel(target: str, transport: TransportSettings | None = None) -> grpc.Channel:
    """A channel to "host:port" or "dns:///name:port" (every address of a headless
    service), with round-robin balancing, keepalive and UNAVAILABLE retries; TLS (and
    a client certificate, a bearer token) as the environment configures them. A
    plaintext channel off this machine is refused unless PRUNELAB_ALLOW_PLAINTEXT.
    `transport` replaces the environment's security settings (a tool dialing a
    cluster it started, with the cluster's certificates)."""
    transport = transport or settings().transport
    credentials = channel_credentials(transport)
    options = _CHANNEL_OPTIONS + message_size_options()
    if credentials is None:
        check_plaintext_allowed(target, transport)
        channel = grpc.insecure_channel(target, options=options)
    else:
        channel = grpc.secure_channel(target, credentials, options=options + tls_name_options(target))
    return with_token(channel, transport.token)


def wait_ready(channel: grpc.Channel, timeout: float) -> None:
    """Block until the channel connects; `Unavailable` if it does not within `timeout` seconds."""
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout)
    except grpc.FutureTimeoutError:
        raise Unavailable(f"no connection within {timeout:g} s") from None


def check_health(
    target: str, service: str = "", timeout: float = HEALTH_CHECK_TIMEOUT_S, transport: TransportSettings | None = None
) -> str:
    """The health status name ("SERVING", "NOT_SERVING", "SERVICE_UNKNOWN") the server
    at `target` reports for `service` ("" is the whole server); `Unavailable` if it
    cannot be asked. `transport`: as for `make_channel`."""
    with make_channel(target, transport) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.NOT_FOUND:  # the health service's "never heard of it"
                return "SERVICE_UNKNOWN"
            raise Unavailable(f"health check of {target} failed: {err.code().name}: {err.details()}") from None
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def job_metadata(job_id: str) -> list[tuple[str, str]]:
    """Request metadata that makes the server log the call under `job_id`."""
    return [(JOB_ID_METADATA_KEY, job_id)]


@contextlib.contextmanager
def domain_errors() -> Iterator[None]:
    """A call that fails inside the block raises the prunelab error of its status code
    (INVALID_ARGUMENT -> InvalidArgument, ...) with the server's reason and field,
    so a command reports a remote failure as it reports a local one."""
    try:
        yield
    except grpc.RpcError as error:
        detail = error_detail(error)
        raise error_class(error.code().name)(error.details() or error.code().name, field=detail.field if detail else "") from None
