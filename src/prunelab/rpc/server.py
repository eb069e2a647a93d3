"""Start a gRPC server the way every prunelab service runs: TLS / mTLS and token
checks when configured, error interceptor, standard health and (optional) reflection
services, graceful shutdown."""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from prunelab.access import confine_process
from prunelab.config import settings
from prunelab.logs import setup_logging
from prunelab.rpc.client import message_size_options
from prunelab.rpc.interceptor import ErrorInterceptor
from prunelab.rpc.security import TokenInterceptor, server_credentials

log = logging.getLogger(__name__)

# Leaves a margin inside Kubernetes' default 30 s termination grace period.
DEFAULT_GRACE_S = 25.0

_SERVER_OPTIONS = [
    # A busy port must fail the bind, not be shared silently with another server.
    ("grpc.so_reuseport", 0),
    # Accept the keepalive pings `make_channel` sends during long, quiet streams.
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    # Make clients reconnect (and re-resolve DNS) now and then, so round-robin spreads
    # load over pods that started after the connection was made. In-flight calls finish.
    ("grpc.max_connection_age_ms", 5 * 60_000),
]

Registration = Callable[[grpc.Server], None]


class HealthServicer(health.HealthServicer):
    """grpc_health's servicer, but sending statuses to watchers outside its lock.

    Its own `set` sends while holding the lock. A watcher whose call closes at that
    moment runs its close callback (which takes the lock) on the server's event
    thread, and the send waits for that thread: stopping a server with a closing
    watcher hung CI once (grpcio-health-checking 1.85.1). Here the lock only guards
    the bookkeeping; a send to a call that has closed meanwhile is a no-op in grpc."""

    def set(self, service: str, status: int) -> None:
        with self._lock:
            if self._gracefully_shutting_down:
                return
            self._server_status[service] = status
            watchers = list(self._send_response_callbacks.get(service, ()))
        self._send(watchers, status)

    def enter_graceful_shutdown(self) -> None:
        """Every service NOT_SERVING for good, then the watchers told."""
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        with self._lock:
            if self._gracefully_shutting_down:
                return
            self._gracefully_shutting_down = True
            for service in self._server_status:
                self._server_status[service] = not_serving
            watchers = [send for service in self._server_status for send in self._send_response_callbacks.get(service, ())]
        self._send(watchers, not_serving)

    @staticmethod
    def _send(watchers: list[Callable], status: int) -> None:
        for send in watchers:
            send(health_pb2.HealthCheckResponse(status=status))


@dataclass
class RunningServer:
    server: grpc.Server
    health: HealthServicer
    host: str
    port: int
    # the plaintext, health-only server for probes that cannot speak TLS (None: none)
    health_server: grpc.Server | None = None
    health_port: int | None = None

    @property
    def target(self) -> str:
        """An address a client on this machine can connect to."""
        host = "localhost" if self.host in ("0.0.0.0", "[::]") else self.host
        return f"{host}:{self.port}"

    def stop(self, grace: float | None = None) -> None:
        """Report NOT_SERVING, refuse new calls, let in-flight ones finish for up to
        `grace` seconds (None: cancel them now), then return."""
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        if self.health_server is not None:
            self.health_server.stop(None).wait()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server stops; False if `timeout` passed first."""
        return self.server.wait_for_termination(timeout)


def serve(
    register: Registration | list[Registration],
    *,
    service_names: list[str],
    port: int | None = None,
    host: str | None = None,
    max_workers: int | None = None,
    health_port: int | None = None,
) -> RunningServer:
    """Start a server with the given servicers and return at once.

    `register` adds servicers, e.g. `lambda s: pruner_pb2_grpc.add_PrunerServicer_to_server(p, s)`;
    `service_names` are their full names ("prunelab.v1.Pruner"), reported SERVING by the
    health service and listed by reflection. `port` 0 picks a free port; None and
    `host`/`max_workers` None come from the environment (PRUNELAB_GRPC_PORT,
    PRUNELAB_GRPC_HOST, PRUNELAB_GRPC_MAX_WORKERS); TLS, client certificates, the
    token and reflection too (`config.TransportSettings`). `health_port` (None: from
    PRUNELAB_HEALTH_PORT, unset there: none) adds a plaintext server with the health
    service alone, for probes that cannot present a certificate (Kubernetes' gRPC probes).
    """
    cfg = settings()
    transport = cfg.transport
    credentials = server_credentials(transport)  # a bad certificate folder fails before binding
    # containers set PRUNELAB_GRPC_HOST=[::]; loopback by default so a developer's
    # server is never reachable from the network by accident
    host = host or cfg.grpc_host
    server = grpc.server(
        ThreadPoolExecutor(max_workers=max_workers or cfg.grpc_max_workers, thread_name_prefix="grpc"),
        interceptors=[*([TokenInterceptor(transport.token)] if transport.token else []), ErrorInterceptor()],
        options=_SERVER_OPTIONS + message_size_options(),
        maximum_concurrent_rpcs=cfg.grpc_max_concurrent_rpcs,
    )
    for add_servicer in register if isinstance(register, list) else [register]:
        add_servicer(server)
    health_servicer = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ["", *service_names]:  # "" is the server as a whole
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    if transport.reflection:
        reflection.enable_server_reflection([*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    address = f"{host}:{cfg.grpc_port if port is None else port}"
    bound_port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    server.start()
    log.info(
        "serving %s on %s:%d (%s%s)", ", ".join(service_names), host, bound_port,
        ("mTLS" if transport.client_auth else "TLS") if credentials else "plaintext", ", token required" if transport.token else "",
    )
    running = RunningServer(server, health_servicer, host, bound_port)
    health_port = cfg.health_port if health_port is None else health_port
    if health_port is not None:
        running.health_server, running.health_port = _health_only(health_servicer, f"{host}:{health_port}")
    return running


def _health_only(health_servicer: HealthServicer, address: str) -> tuple[grpc.Server, int]:
    """A plaintext server on `address` answering health checks alone, from threads of
    its own: it tells only SERVING or not, and a busy main server cannot starve it."""
    server = grpc.server(ThreadPoolExecutor(max_workers=2, thread_name_prefix="grpc-health"), options=_SERVER_OPTIONS)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port(address)
    server.start()
    log.info("health checks, plaintext, on %s", address.rpartition(":")[0] + f":{port}")
    return server, port


def run_forever(
    register: Registration | list[Registration],
    *,
    service_names: list[str],
    grace: float = DEFAULT_GRACE_S,
    port: int | None = None,
    host: str | None = None,
    max_workers: int | None = None,
) -> None:
    """Run a service as the main program until SIGTERM or SIGINT, then stop gracefully
    (health NOT_SERVING, in-flight calls get `grace` seconds) and return, so the
    process exits 0.

    The signals are blocked and then awaited with `sigwait` rather than handled: a
    Python handler could fire while the main thread holds a lock the handler needs.
    Blocking them before the server starts makes every thread inherit the mask, so
    the main thread is the only one that receives them.
    """
    cfg = settings()
    setup_logging(cfg.log_level, cfg.log_format)
    confine_process()  # a service reads only what requests may name (prunelab.access)
    stop_signals = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    running = serve(register, service_names=service_names, port=port, host=host, max_workers=max_workers)
    received = signal.sigwait(stop_signals)
    log.info("%s: NOT_SERVING, letting in-flight calls finish for up to %.0f s", signal.Signals(received).name, grace)
    running.stop(grace)
    log.info("stopped")
