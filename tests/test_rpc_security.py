"""Transport security on real sockets: TLS, mTLS and bearer tokens between a prunelab
server and its channels, the healthcheck command through them, the plaintext rule,
and `prunelab certs`. Certificates are made by `prunelab.rpc.certs` in tmp folders."""

from __future__ import annotations

import os
import subprocess
import sys

import grpc
import pytest
from fixtures.grpc import PROBE_SERVICE, ProbeClient, probe_registration
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from prunelab.cli import main as cli_main
from prunelab.config import settings
from prunelab.errors import FailedPrecondition, InvalidArgument, Unavailable
from prunelab.rpc import check_health, make_channel
from prunelab.rpc.certs import issue_certificates
from prunelab.rpc.security import is_loopback, target_hosts
from prunelab.v1.common_pb2 import ErrorDetail

OK = ErrorDetail()  # the Probe's "succeed"


@pytest.fixture
def certs(tmp_path):
    """Two CAs: `ours` signs the server and a client, `rogue` signs an impostor client."""
    ours = {i.name: i.folder for i in issue_certificates(tmp_path / "ours", ["server", "client"], [], days=2)}
    rogue = {i.name: i.folder for i in issue_certificates(tmp_path / "rogue", ["client"], [], days=2)}
    return {"server": ours["server"], "client": ours["client"], "impostor": rogue["client"], "ca_only": _ca_only(ours["client"], tmp_path)}


def _ca_only(folder, tmp_path):
    """A client folder with the CA and no certificate of its own (TLS without mTLS)."""
    only = tmp_path / "ca-only"
    only.mkdir()
    (only / "ca.crt").write_bytes((folder / "ca.crt").read_bytes())
    return only


@pytest.fixture
def configure(monkeypatch):
    """`configure(VAR=value, ...)`: the environment of the next server or channel made
    (PRUNELAB_ prefixed; None unsets), read afresh."""

    def apply(**env):
        for name, value in env.items():
            if value is None:
                monkeypatch.delenv(f"PRUNELAB_{name}", raising=False)
            else:
                monkeypatch.setenv(f"PRUNELAB_{name}", str(value))
        settings.cache_clear()

    return apply


@pytest.fixture
def serve_probe(grpc_server, probe_servicer, configure):
    """`serve_probe(**env)`: a Probe server started under `env` (`health_port` goes to
    `serve`); the environment is reset after."""

    def start(health_port=None, **env):
        configure(**env)
        running = grpc_server(probe_registration(probe_servicer), [PROBE_SERVICE], health_port=health_port)
        configure(**dict.fromkeys(env))
        return running

    return start


def call(target: str, **env) -> str:
    """A Probe call from a channel made under `env`: "OK" or the status code's name."""
    for name, value in env.items():
        os.environ.pop(f"PRUNELAB_{name}", None) if value is None else os.environ.__setitem__(f"PRUNELAB_{name}", str(value))
    settings.cache_clear()
    try:
        with make_channel(target) as channel:
            ProbeClient(channel).unary(OK, timeout=10)
        return "OK"
    except grpc.RpcError as err:
        return err.code().name
    finally:
        for name in env:
            os.environ.pop(f"PRUNELAB_{name}", None)
        settings.cache_clear()


# ---- TLS and mTLS


def test_tls_server_answers_a_client_that_trusts_its_ca_and_no_plaintext_client(serve_probe, certs):
    server = serve_probe(TLS_DIR=certs["server"])
    assert call(server.target, TLS_DIR=certs["ca_only"]) == "OK"
    assert call(server.target) == "UNAVAILABLE"  # plaintext to a TLS port: no handshake


def test_client_refuses_a_server_its_ca_did_not_sign(serve_probe, certs):
    server = serve_probe(TLS_DIR=certs["impostor"])  # a certificate from another CA
    assert call(server.target, TLS_DIR=certs["ca_only"]) == "UNAVAILABLE"


def test_mtls_server_answers_only_clients_with_a_certificate_of_its_ca(serve_probe, certs):
    server = serve_probe(TLS_DIR=certs["server"], TLS_CLIENT_AUTH="true")
    assert call(server.target, TLS_DIR=certs["client"]) == "OK"
    assert call(server.target, TLS_DIR=certs["ca_only"]) == "UNAVAILABLE"  # no client certificate
    impostor = certs["impostor"].parent / "impostor-trusting-ours"
    impostor.mkdir()
    for name in ("tls.crt", "tls.key"):
        (impostor / name).write_bytes((certs["impostor"] / name).read_bytes())
    (impostor / "ca.crt").write_bytes((certs["client"] / "ca.crt").read_bytes())
    assert call(server.target, TLS_DIR=impostor) == "UNAVAILABLE"  # a certificate our CA did not sign


def test_healthcheck_command_passes_through_mtls(serve_probe, certs):
    server = serve_probe(TLS_DIR=certs["server"], TLS_CLIENT_AUTH="true")
    command = [sys.executable, "-m", "prunelab.rpc.healthcheck", server.target, PROBE_SERVICE]
    environment = {k: v for k, v in os.environ.items() if not k.startswith("PRUNELAB_TLS")}
    assert subprocess.run(command, env=environment | {"PRUNELAB_TLS_DIR": str(certs["client"])}, capture_output=True).returncode == 0
    refused = subprocess.run(command, env=environment, capture_output=True, text=True)
    assert refused.returncode == 1 and "health check" in refused.stderr


def test_health_port_answers_probes_in_plaintext_and_nothing_else(serve_probe, certs):
    server = serve_probe(TLS_DIR=certs["server"], TLS_CLIENT_AUTH="true", AUTH_TOKEN="s3cret-token", health_port=0)
    health_target = f"127.0.0.1:{server.health_port}"
    assert check_health(health_target, PROBE_SERVICE) == "SERVING"
    assert call(health_target, AUTH_TOKEN="s3cret-token") == "UNIMPLEMENTED"  # the Probe is not served there
    server.stop(None)  # stopping the server stops its health port too
    with pytest.raises(Unavailable):
        check_health(health_target, PROBE_SERVICE, timeout=2)


def test_server_start_fails_clearly_on_a_missing_certificate(configure, grpc_server, probe_servicer, tmp_path):
    configure(TLS_DIR=tmp_path / "nothing-here")
    with pytest.raises(InvalidArgument, match="cannot read .*tls.crt"):
        grpc_server(probe_registration(probe_servicer), [PROBE_SERVICE])
    configure(TLS_DIR=None, TLS_CLIENT_AUTH="true")
    with pytest.raises(InvalidArgument, match="PRUNELAB_TLS_CLIENT_AUTH needs PRUNELAB_TLS_DIR"):
        grpc_server(probe_registration(probe_servicer), [PROBE_SERVICE])


# ---- bearer tokens


def test_token_server_refuses_calls_without_the_token_and_answers_health(serve_probe, tmp_path):
    server = serve_probe(AUTH_TOKEN="s3cret-token")
    assert call(server.target) == "UNAUTHENTICATED"
    assert call(server.target, AUTH_TOKEN="wrong-token") == "UNAUTHENTICATED"
    assert call(server.target, AUTH_TOKEN="s3cret-token") == "OK"
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token\n")
    assert call(server.target, AUTH_TOKEN_FILE=token_file) == "OK"
    assert check_health(server.target, PROBE_SERVICE) == "SERVING"  # probes carry no token


def test_token_is_checked_on_streams_and_reflection(serve_probe, configure):
    server = serve_probe(AUTH_TOKEN="s3cret-token")
    with make_channel(server.target) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            list(ProbeClient(channel).stream(OK, timeout=10))
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "missing bearer token" in caught.value.details()
        with pytest.raises(grpc.RpcError) as caught:
            list(reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10))
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    configure(AUTH_TOKEN="s3cret-token")
    with make_channel(server.target) as channel:
        assert [event.done for event in ProbeClient(channel).stream(OK, timeout=10)] == [1, 2, 3]


def test_token_from_both_variables_or_an_empty_file_is_refused(configure, tmp_path):
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(InvalidArgument, match="is empty"):
        configure(AUTH_TOKEN_FILE=empty) or settings()
    with pytest.raises(InvalidArgument, match="not both"):
        configure(AUTH_TOKEN="a", AUTH_TOKEN_FILE=empty) or settings()


def test_secrets_never_appear_in_the_settings_repr(configure):
    configure(AUTH_TOKEN="token-value-123", S3_SECRET_KEY="secret-value-456")
    shown = repr(settings())
    assert "token-value-123" not in shown and "secret-value-456" not in shown
    assert "tls_dir=None" in shown  # the rest is still there to read


def test_reflection_can_be_turned_off(serve_probe):
    server = serve_probe(GRPC_REFLECTION="false")
    with make_channel(server.target) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            list(reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10))
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


# ---- the plaintext rule


@pytest.mark.parametrize(("target", "hosts"), [
    ("localhost:50051", ["localhost"]),
    ("10.1.2.3:50051", ["10.1.2.3"]),
    ("[::1]:50051", ["::1"]),
    ("dns:///pruner:50051", ["pruner"]),
    ("dns://8.8.8.8/pruner.ns.svc:50051", ["pruner.ns.svc"]),
    ("ipv4:127.0.0.1:1,127.0.0.2:2", ["127.0.0.1", "127.0.0.2"]),
    ("ipv6:[::1]:1", ["::1"]),
    ("unix:/run/prunelab.sock", []),
])
def test_target_hosts(target, hosts):
    assert target_hosts(target) == hosts


@pytest.mark.parametrize(("host", "loopback"), [("localhost", True), ("127.0.0.9", True), ("::1", True), ("10.0.0.1", False), ("pruner", False)])
def test_is_loopback(host, loopback):
    assert is_loopback(host) is loopback


@pytest.mark.parametrize("target", ["10.0.0.7:50051", "dns:///evaluator:50051", "ipv4:10.0.0.2:1,10.0.0.2:2"])
def test_plaintext_off_this_machine_is_refused_unless_allowed(configure, certs, target):
    with pytest.raises(FailedPrecondition, match="refusing a plaintext gRPC channel"):
        make_channel(target)
    configure(ALLOW_PLAINTEXT="true")
    make_channel(target).close()
    configure(ALLOW_PLAINTEXT=None, TLS_DIR=certs["ca_only"])
    make_channel(target).close()


def test_cli_refuses_plaintext_to_a_remote_orchestrator(capsys):
    assert cli_main(["status", "--orchestrator", "10.0.0.7:50051"]) == 1
    assert "refusing a plaintext gRPC channel to 10.0.0.7" in capsys.readouterr().err


# ---- prunelab certs


def test_certs_cli_keeps_what_fits_and_reissues_what_does_not(tmp_path, capsys):
    out = tmp_path / "certs"
    assert cli_main(["certs", "--out", str(out), "pruner", "cli"]) == 0
    first = (out / "pruner" / "tls.crt").read_bytes()
    assert cli_main(["certs", "--out", str(out), "pruner", "evaluator"]) == 0
    assert (out / "pruner" / "tls.crt").read_bytes() == first
    assert cli_main(["certs", "--out", str(out), "pruner", "--host", "pruner.example.org"]) == 0
    assert (out / "pruner" / "tls.crt").read_bytes() != first
    assert capsys.readouterr().out.splitlines()[-3:] == [
        f"pruner: {out / 'pruner'} (kept)", f"evaluator: {out / 'evaluator'} (new)", f"pruner: {out / 'pruner'} (new)"]
    assert oct((out / "pruner" / "tls.key").stat().st_mode & 0o777) == "0o600"
    assert oct((out / "ca" / "ca.key").stat().st_mode & 0o777) == "0o600"
    assert sorted(p.name for p in (out / "cli").iterdir()) == ["ca.crt", "tls.crt", "tls.key"]


@pytest.mark.parametrize("name", ["ca", "Pruner", "../x", ""])
def test_certs_cli_refuses_bad_names(tmp_path, capsys, name):
    assert cli_main(["certs", "--out", str(tmp_path), name]) == 2
    assert "certificate name" in capsys.readouterr().err


def test_tls_target_listing_several_addresses_checks_their_shared_host(grpc_server, probe_servicer, configure, certs):
    """The local cluster's evaluators: one target, two servers, certificates for 127.0.0.1."""
    configure(TLS_DIR=certs["server"], TLS_CLIENT_AUTH="true")
    first, second = (grpc_server(probe_registration(probe_servicer), [PROBE_SERVICE]) for _ in range(2))
    configure(TLS_DIR=None, TLS_CLIENT_AUTH=None)
    target = f"ipv4:127.0.0.1:{first.port},127.0.0.1:{second.port}"
    for _ in range(4):  # round robin: both servers answer
        assert call(target, TLS_DIR=certs["client"]) == "OK"
    assert probe_servicer.calls["Unary"] == 4
    configure(TLS_DIR=certs["client"])
    with pytest.raises(InvalidArgument, match="must share a host"):
        make_channel(f"ipv4:127.0.0.1:{first.port},127.0.0.2:{second.port}")
