"""prunelab.rpc over real sockets: error mapping, streams, job ids, health,
reflection, channels, and the same servicer called in-process."""

from __future__ import annotations

import logging
import re
import threading
import time

import grpc
import pytest
from fixtures.grpc import PROBE_SERVICE, PROBE_STREAM_EVENTS, Probe, ProbeClient, probe_registration
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from prunelab.errors import Unavailable
from prunelab.logs import current_job_id
from prunelab.rpc import (
    InProcessContext,
    InProcessRpcError,
    call_in_process,
    check_health,
    error_detail,
    job_metadata,
    jobs,
    wait_ready,
)
from prunelab.rpc.jobs import stream_job
from prunelab.v1.common_pb2 import ErrorDetail, Progress

DOMAIN_ERRORS = [
    ("InvalidArgument", "INVALID_ARGUMENT"),
    ("NotFound", "NOT_FOUND"),
    ("FailedPrecondition", "FAILED_PRECONDITION"),
    ("IntegrityError", "FAILED_PRECONDITION"),
    ("ResourceExhausted", "RESOURCE_EXHAUSTED"),
    ("Unavailable", "UNAVAILABLE"),
]


def failure(error_type: str, reason: str = "model 'x' is bad", field: str = "model") -> ErrorDetail:
    return ErrorDetail(error_type=error_type, reason=reason, field=field)


def outcome(err: grpc.RpcError) -> tuple[str, str, ErrorDetail | None]:
    return err.code().name, err.details(), error_detail(err)


# --- error mapping over a socket


@pytest.mark.parametrize(("error_type", "code"), DOMAIN_ERRORS)
def test_domain_error_maps_to_its_status_with_reason_and_detail(probe_client, error_type, code):
    with pytest.raises(grpc.RpcError) as caught:
        probe_client.unary(failure(error_type))
    assert outcome(caught.value) == (
        code,
        "model 'x' is bad",
        ErrorDetail(code=code, reason="model 'x' is bad", field="model", error_type=error_type),
    )


def test_unavailable_is_retried_by_the_channel_and_others_are_not(probe_client, probe_servicer):
    for error_type in ("Unavailable", "NotFound"):
        with pytest.raises(grpc.RpcError):
            probe_client.unary(failure(error_type))
    assert probe_servicer.calls["Unary"] == 4 + 1  # maxAttempts for UNAVAILABLE, once for NOT_FOUND


def test_unexpected_error_is_internal_with_traceback_logged_not_sent(probe_client, caplog):
    with pytest.raises(grpc.RpcError) as caught:
        probe_client.unary(failure("RuntimeError", reason="secret /srv/path"), metadata=job_metadata("job-7"))
    code, details, detail = outcome(caught.value)
    assert (code, details) == ("INTERNAL", "internal error; see server log, job id job-7")
    assert "secret" not in details and "Traceback" not in details
    assert detail.code == "INTERNAL" and detail.reason == details
    [record] = [r for r in caplog.records if r.exc_info]
    assert "job id job-7" in record.getMessage()
    assert "secret /srv/path" in caplog.text and "Traceback" in caplog.text


def test_unexpected_error_without_job_id_gets_an_error_id_found_in_the_log(probe_client, caplog):
    with pytest.raises(grpc.RpcError) as caught:
        probe_client.unary(failure("KeyError"))
    error_id = re.fullmatch(r"internal error; see server log, error id ([0-9a-f]{12})", caught.value.details())[1]
    assert error_id in caplog.text


@pytest.mark.parametrize("writer", ["python", "safetensors"])
def test_a_write_on_a_full_disk_is_resource_exhausted_disk_full_whoever_wrote_it(probe_client, writer, small_filesystem):
    # /dev/full for Python; safetensors writes beside its target and renames, so it gets a full file system
    target = "/dev/full" if writer == "python" else str(small_filesystem(64 * 1024) / "model.safetensors")
    with pytest.raises(grpc.RpcError) as caught:
        probe_client.unary(ErrorDetail(error_type="write", reason=target))
    code, details, detail = outcome(caught.value)
    assert (code, detail.error_type) == ("RESOURCE_EXHAUSTED", "DiskFull")
    assert details.startswith("no space left on the worker's disk")


def test_servicer_abort_keeps_its_own_status(probe_client):
    with pytest.raises(grpc.RpcError) as caught:
        probe_client.unary(ErrorDetail(error_type="abort", code="PERMISSION_DENIED", reason="no"))
    assert outcome(caught.value) == ("PERMISSION_DENIED", "no", None)


def test_job_id_metadata_sets_the_log_context(probe_client):
    assert probe_client.unary(ErrorDetail(), metadata=job_metadata("job-42")).job_id == "job-42"
    assert probe_client.unary(ErrorDetail()).job_id == "-"


def test_stream_failing_midway_delivers_earlier_events_then_the_status(probe_client):
    events = []
    with pytest.raises(grpc.RpcError) as caught:
        for event in probe_client.stream(failure("NotFound"), metadata=job_metadata("job-s")):
            events.append(event)
    assert [(e.job_id, e.done) for e in events] == [("job-s", n) for n in range(1, PROBE_STREAM_EVENTS + 1)]
    assert outcome(caught.value)[:2] == ("NOT_FOUND", "model 'x' is bad")


def test_stream_failing_unexpectedly_midway_ends_internal(probe_client):
    responses = probe_client.stream(failure("ZeroDivisionError"))
    assert len([next(responses) for _ in range(PROBE_STREAM_EVENTS)]) == PROBE_STREAM_EVENTS
    with pytest.raises(grpc.RpcError) as caught:
        next(responses)
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert "ZeroDivisionError" not in caught.value.details()


# --- in-process calls fail exactly like remote ones


@pytest.mark.parametrize(
    "request_",
    [failure(error_type) for error_type, _ in DOMAIN_ERRORS]
    + [ErrorDetail(error_type="abort", code="PERMISSION_DENIED", reason="no")],
    ids=[error_type for error_type, _ in DOMAIN_ERRORS] + ["abort"],
)
def test_in_process_call_fails_like_the_remote_call(probe_client, request_):
    with pytest.raises(grpc.RpcError) as remote:
        probe_client.unary(request_)
    with pytest.raises(InProcessRpcError) as local:
        call_in_process(Probe().Unary, request_)
    assert isinstance(local.value, grpc.RpcError)
    assert outcome(local.value) == outcome(remote.value)


def test_in_process_unexpected_error_is_internal(caplog):
    with pytest.raises(InProcessRpcError) as caught:
        call_in_process(Probe().Unary, failure("RuntimeError", reason="secret"), metadata=job_metadata("job-9"))
    assert outcome(caught.value)[:2] == ("INTERNAL", "internal error; see server log, job id job-9")
    assert "secret" in caplog.text


def test_in_process_unary_returns_the_response_under_the_job_id():
    assert call_in_process(Probe().Unary, ErrorDetail(), metadata=job_metadata("job-u")) == Progress(
        job_id="job-u", phase="done"
    )


def test_in_process_stream_delivers_events_then_fails():
    responses = call_in_process(Probe().Stream, failure("IntegrityError"), metadata=job_metadata("job-i"))
    events = [next(responses) for _ in range(PROBE_STREAM_EVENTS)]
    assert {e.job_id for e in events} == {"job-i"}
    with pytest.raises(InProcessRpcError) as caught:
        next(responses)
    assert error_detail(caught.value).error_type == "IntegrityError"


def test_in_process_job_id_does_not_leak_between_events():
    for _ in call_in_process(Probe().Stream, ErrorDetail(), metadata=job_metadata("job-l")):
        assert current_job_id() == "-"


def test_in_process_set_code_and_return_fails_the_call():
    def check(request, context):
        context.set_code(grpc.StatusCode.NOT_FOUND)
        context.set_details("unknown service")

    with pytest.raises(InProcessRpcError) as caught:
        call_in_process(check, ErrorDetail())
    assert outcome(caught.value) == ("NOT_FOUND", "unknown service", None)


def test_closing_an_in_process_stream_cancels_the_call():
    contexts: list[InProcessContext] = []
    cancelled = threading.Event()
    cleaned_up = threading.Event()

    def endless(request, context):
        contexts.append(context)
        context.add_callback(cancelled.set)
        try:
            while True:
                yield Progress()
        finally:
            cleaned_up.set()

    responses = call_in_process(endless, ErrorDetail())
    next(responses)
    assert contexts[0].is_active()
    responses.close()
    assert not contexts[0].is_active() and cancelled.is_set() and cleaned_up.is_set()


# --- health, reflection, channels


def test_health_reports_serving_for_server_and_services(probe_server):
    assert check_health(probe_server.target) == "SERVING"
    assert check_health(probe_server.target, PROBE_SERVICE) == "SERVING"
    assert check_health(probe_server.target, "prunelab.v1.Nope") == "SERVICE_UNKNOWN"


def test_health_turns_not_serving_when_stop_begins(probe_server, grpc_channel):
    watch = health_pb2_grpc.HealthStub(grpc_channel(probe_server.target)).Watch(
        health_pb2.HealthCheckRequest(service=PROBE_SERVICE), timeout=10
    )
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    stopping = threading.Thread(target=probe_server.stop, args=(5,))
    stopping.start()
    assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
    watch.cancel()  # the watch is an in-flight call; stop waits for it
    stopping.join(timeout=5)
    assert not stopping.is_alive()


def test_reflection_lists_the_services(probe_server, grpc_channel):
    stub = reflection_pb2_grpc.ServerReflectionStub(grpc_channel(probe_server.target))
    [response] = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
    assert {s.name for s in response.list_services_response.service} == {
        PROBE_SERVICE,
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    }


def test_dns_target_with_round_robin_reaches_the_server(probe_server, grpc_channel):
    client = ProbeClient(grpc_channel(f"dns:///localhost:{probe_server.port}"))
    assert all(client.unary(ErrorDetail(), timeout=5).phase == "done" for _ in range(5))


def test_wait_ready(probe_server, grpc_channel):
    wait_ready(grpc_channel(probe_server.target), timeout=5)
    probe_server.stop(None)
    with pytest.raises(Unavailable):
        wait_ready(grpc_channel(probe_server.target), timeout=0.5)


def test_domain_errors_are_logged_as_warnings_without_traceback(probe_client, caplog):
    with caplog.at_level(logging.WARNING, logger="prunelab.rpc"):
        with pytest.raises(grpc.RpcError):
            probe_client.unary(failure("NotFound"), metadata=job_metadata("job-w"))
    [record] = [r for r in caplog.records if r.name.startswith("prunelab.rpc")]
    assert record.levelno == logging.WARNING and record.exc_info is None
    assert "NOT_FOUND" in record.getMessage()


def test_health_watchers_do_not_hold_worker_threads(grpc_server, grpc_channel, probe_servicer):
    server = grpc_server(probe_registration(probe_servicer), [PROBE_SERVICE], max_workers=2)
    channel = grpc_channel(server.target)
    health = health_pb2_grpc.HealthStub(channel)
    watches = [health.Watch(health_pb2.HealthCheckRequest(), timeout=10) for _ in range(2)]  # as many as workers
    assert all(next(watch).status == health_pb2.HealthCheckResponse.SERVING for watch in watches)
    assert ProbeClient(channel).unary(ErrorDetail(), timeout=3).phase == "done"
    for watch in watches:
        watch.cancel()


def test_a_quiet_job_sends_its_latest_update_again_so_the_watchdog_hears_a_live_worker(monkeypatch):
    monkeypatch.setattr(jobs, "HEARTBEAT_S", 0.05)

    class Context:
        def add_callback(self, _callback) -> None:
            pass

    def waits_out_an_outage(report, _should_stop) -> str:
        report("uploading")
        time.sleep(0.6)  # silent, as a job retrying an unreachable store is
        return "stored"

    events = list(stream_job(waits_out_an_outage, Context(), "quiet"))
    assert events[0] == "uploading" and events[-1] == "stored"
    assert set(events[1:-1]) == {"uploading"} and len(events) >= 6  # about one every HEARTBEAT_S
