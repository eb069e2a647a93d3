"""Pruner service: `python services/pruner/main.py` (port from PRUNELAB_GRPC_PORT)."""

from prunelab.config import settings
from prunelab.prune.service import SERVICE_NAME, PrunerServicer, registration
from prunelab.rpc import run_forever

if __name__ == "__main__":
    # PRUNELAB_DEVICE: "auto" (default) takes CUDA where the host has it
    servicer = PrunerServicer(device=settings().torch_device())
    run_forever(registration(servicer), service_names=[SERVICE_NAME])
