"""Pruner service: `python services/pruner/main.py` (port from PRUNELAB_GRPC_PORT)."""

import os

from prunelab.prune.service import SERVICE_NAME, PrunerServicer, registration
from prunelab.rpc import run_forever

if __name__ == "__main__":
    # PRUNELAB_DEVICE picks the accelerator on GPU hosts ("cuda"); CPU otherwise.
    servicer = PrunerServicer(device=os.environ.get("PRUNELAB_DEVICE", "cpu"))
    run_forever(registration(servicer), service_names=[SERVICE_NAME])
