"""The evaluator service: `python services/evaluator/main.py` (port from PRUNELAB_GRPC_PORT)."""

from prunelab.evaluate.service import SERVICE_NAME, EvaluatorServicer, registration
from prunelab.rpc import run_forever

if __name__ == "__main__":
    run_forever(registration(EvaluatorServicer()), service_names=[SERVICE_NAME])
