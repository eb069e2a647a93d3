"""gRPC basics every prunelab service stands on.

Servers: `serve` / `run_forever` (health, reflection, error interceptor, graceful
shutdown). Errors: servicers raise `prunelab.errors` exceptions; callers read
`.code()`, `.details()` and `error_detail(err)`. Embedded mode: `call_in_process`
runs the same servicer without a socket and fails the same way. Clients:
`make_channel`, `wait_ready`, `check_health`, `job_metadata`, and `domain_errors`
(a failed call as the prunelab error of its status code).
"""

from prunelab.rpc.client import check_health, domain_errors, job_metadata, make_channel, wait_ready
from prunelab.rpc.inprocess import InProcessContext, InProcessRpcError, call_in_process
from prunelab.rpc.interceptor import ErrorInterceptor
from prunelab.rpc.server import RunningServer, run_forever, serve
from prunelab.rpc.status import ERROR_DETAIL_METADATA_KEY, JOB_ID_METADATA_KEY, RpcStatus, error_detail

__all__ = [
    "ERROR_DETAIL_METADATA_KEY",
    "JOB_ID_METADATA_KEY",
    "ErrorInterceptor",
    "InProcessContext",
    "InProcessRpcError",
    "RpcStatus",
    "RunningServer",
    "call_in_process",
    "check_health",
    "domain_errors",
    "error_detail",
    "job_metadata",
    "make_channel",
    "run_forever",
    "serve",
    "wait_ready",
]
