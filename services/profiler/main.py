"""The profiler service: `python services/profiler/main.py` (port from PRUNELAB_GRPC_PORT)."""

from prunelab.profile.service import SERVICE_NAME, ProfilerServicer, registration
from prunelab.rpc import run_forever

if __name__ == "__main__":
    run_forever(registration(ProfilerServicer()), service_names=[SERVICE_NAME])
