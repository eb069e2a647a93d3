"""The Profiler gRPC servicer: profiler.proto in, `run_profile` underneath."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import grpc

from prunelab.errors import ReplicaBusy
from prunelab.profile.messages import progress_message, request_settings, result_message
from prunelab.profile.profiler import ProfileReport, run_profile
from prunelab.rpc.jobs import log_started
from prunelab.v1 import profiler_pb2, profiler_pb2_grpc

SERVICE_NAME = "prunelab.v1.Profiler"

# One profile at a time per process: two would share the CPU cores (or the GPU) and
# each would time the other; the embedded mode's servicers share it too.
_PROFILING = threading.Lock()


class ProfilerServicer(profiler_pb2_grpc.ProfilerServicer):
    def Profile(self, request: profiler_pb2.ProfileRequest, context: grpc.ServicerContext) -> Iterator[profiler_pb2.ProfileEvent]:
        model, baseline, options = request_settings(request)
        if not _PROFILING.acquire(blocking=False):
            raise ReplicaBusy("another profile is running in this process; retry when it has finished")
        log_started(f"profile-{request.job_id or '-'}")
        try:
            for event in run_profile([model], baseline=baseline, options=options):
                if isinstance(event, ProfileReport):
                    yield profiler_pb2.ProfileEvent(result=result_message(event, request.job_id))
                else:
                    yield profiler_pb2.ProfileEvent(progress=progress_message(event, request.job_id))
        finally:
            _PROFILING.release()


def registration(servicer: ProfilerServicer) -> Callable[[grpc.Server], None]:
    """What `prunelab.rpc.serve` takes to host `servicer`."""
    return lambda server: profiler_pb2_grpc.add_ProfilerServicer_to_server(servicer, server)
