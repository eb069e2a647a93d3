"""Transport security of every prunelab server and channel: TLS, mTLS, bearer tokens,
and the rule that a channel never carries plaintext off this machine by accident.

Configured by the environment (`config.TransportSettings`, README "Security"); with
nothing set, servers and channels are plaintext and channels dial loopback only.
grpc's own TLS (BoringSSL) does the cryptography; what is here is which credentials
to build from which files, the token check, and the plaintext rule.
"""

from __future__ import annotations

import hmac
import ipaddress
from pathlib import Path

import grpc

from prunelab.config import TransportSettings
from prunelab.errors import FailedPrecondition, InvalidArgument
from prunelab.rpc.interceptor import HandlerInterceptor, rebuilt

# cert-manager's key names, so a Kubernetes TLS Secret mounts as a PRUNELAB_TLS_DIR as it is
CERT_FILE, KEY_FILE, CA_FILE = "tls.crt", "tls.key", "ca.crt"
AUTHORIZATION_KEY = "authorization"  # metadata keys are lower case in HTTP/2
BEARER = "Bearer "
# Probes must reach health without a token (a kubelet's exec probe has one, a load
# balancer's does not); the health service says nothing but SERVING or not.
UNAUTHENTICATED_PREFIXES = ("/grpc.health.v1.Health/",)


def server_credentials(transport: TransportSettings) -> grpc.ServerCredentials | None:
    """TLS credentials for a server (None: serve plaintext); with `client_auth`, clients
    must present a certificate signed by the folder's ca.crt."""
    if transport.tls_dir is None:
        if transport.client_auth:
            raise InvalidArgument("PRUNELAB_TLS_CLIENT_AUTH needs PRUNELAB_TLS_DIR (the CA that signs clients)", field="PRUNELAB_TLS_CLIENT_AUTH")
        return None
    chain, key = _read(transport.tls_dir, CERT_FILE), _read(transport.tls_dir, KEY_FILE)
    client_ca = _read(transport.tls_dir, CA_FILE) if transport.client_auth else None
    return grpc.ssl_server_credentials([(key, chain)], root_certificates=client_ca, require_client_auth=transport.client_auth)


def channel_credentials(transport: TransportSettings) -> grpc.ChannelCredentials | None:
    """TLS credentials for a channel (None: plaintext): servers verified against the
    folder's ca.crt, and its tls.crt / tls.key shown to servers that ask (mTLS) when present."""
    folder = transport.tls_dir
    if folder is None:
        return None
    has_identity = (folder / CERT_FILE).is_file()
    return grpc.ssl_channel_credentials(
        root_certificates=_read(folder, CA_FILE),
        private_key=_read(folder, KEY_FILE) if has_identity else None,
        certificate_chain=_read(folder, CERT_FILE) if has_identity else None,
    )


def check_plaintext_allowed(target: str, transport: TransportSettings) -> None:
    """Refuse a plaintext channel to an address off this machine unless PRUNELAB_ALLOW_PLAINTEXT."""
    if transport.tls_dir is not None or transport.allow_plaintext:
        return
    remote = [host for host in target_hosts(target) if not is_loopback(host)]
    if remote:
        raise FailedPrecondition(
            f"refusing a plaintext gRPC channel to {remote[0]} (not this machine): set PRUNELAB_TLS_DIR to a "
            "folder with the server's CA (ca.crt) to dial TLS, or PRUNELAB_ALLOW_PLAINTEXT=true to send "
            "requests and tokens unencrypted",
            field="PRUNELAB_TLS_DIR",
        )


def tls_name_options(target: str) -> list[tuple[str, str]]:
    """Channel options that make TLS check the servers' certificates against the host
    of a target that lists addresses ("ipv4:127.0.0.1:p1,127.0.0.1:p2"), whose own
    authority names no host. gRPC checks one name per channel, so the addresses must
    share their host."""
    if not target.startswith(("ipv4:", "ipv6:")):
        return []  # "host:port" and "dns:///host:port": gRPC checks the host itself
    hosts = set(target_hosts(target))
    if len(hosts) > 1:
        raise InvalidArgument(
            f"{target}: with TLS, the addresses of one target must share a host (one name to check "
            "certificates against); use a DNS name that resolves to all of them (dns:///name:port)",
            field="target",
        )
    return [("grpc.ssl_target_name_override", hosts.pop())]


def target_hosts(target: str) -> list[str]:
    """The hosts a gRPC target names: "h:p", "[::1]:p", "dns:///h:p", "dns://resolver/h:p",
    "ipv4:a:p,b:p", "ipv6:[a]:p"; none for "unix:" sockets."""
    if target.startswith(("unix:", "unix-abstract:")):
        return []
    scheme, _, rest = target.partition(":")
    if scheme in ("ipv4", "ipv6"):
        return [_host_of(address) for address in rest.split(",")]
    if scheme == "dns" and rest.startswith("//"):
        return [_host_of(rest[2:].partition("/")[2])]
    return [_host_of(target)]


def _host_of(address: str) -> str:
    if address.startswith("["):
        return address[1:].partition("]")[0]
    return address.rpartition(":")[0] if address.count(":") == 1 else address


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _read(folder: Path, name: str) -> bytes:
    try:
        return (folder / name).read_bytes()
    except OSError as err:
        raise InvalidArgument(f"PRUNELAB_TLS_DIR: cannot read {folder / name}: {err.strerror}", field="PRUNELAB_TLS_DIR") from None


# ---- bearer tokens ----


class TokenInterceptor(HandlerInterceptor):
    """Refuses every call but health checks that lacks `authorization: Bearer <token>`
    with UNAUTHENTICATED. Constant-time comparison: timing tells nothing about the token."""

    def __init__(self, token: str):
        self._expected = (BEARER + token).encode()

    def replace(self, handler: grpc.RpcMethodHandler, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        if details.method.startswith(UNAUTHENTICATED_PREFIXES):
            return handler
        presented = dict(details.invocation_metadata or ()).get(AUTHORIZATION_KEY, "")
        if hmac.compare_digest(presented.encode(), self._expected):
            return handler
        reason = f"{'wrong' if presented else 'missing'} bearer token: send 'authorization: Bearer <token>' (PRUNELAB_AUTH_TOKEN)"

        def refuse(_request, context: grpc.ServicerContext):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)

        return rebuilt(handler, lambda _kind, _behavior: refuse)


class _TokenSender(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds the bearer token to every call a channel makes."""

    def __init__(self, token: str):
        self._header = (AUTHORIZATION_KEY, BEARER + token)

    def _with_token(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return details._replace(metadata=[*(details.metadata or ()), self._header])

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._with_token(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._with_token(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return continuation(self._with_token(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(self._with_token(client_call_details), request_iterator)


def with_token(channel: grpc.Channel, token: str) -> grpc.Channel:
    """`channel`, sending `token` with every call ("" : unchanged)."""
    return grpc.intercept_channel(channel, _TokenSender(token)) if token else channel
