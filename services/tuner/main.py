"""The tuner service: `python services/tuner/main.py` (port from PRUNELAB_GRPC_PORT).
Jobs run on PRUNELAB_DEVICE (default: CUDA when present, else CPU); interrupted
jobs resume from PRUNELAB_HOME/jobs, so give it a persistent volume."""

from prunelab.rpc import run_forever
from prunelab.tune.service import SERVICE_NAME, TunerServicer, registration

if __name__ == "__main__":
    run_forever(registration(TunerServicer()), service_names=[SERVICE_NAME])
