"""Is the Hugging Face hub reachable, and reading dataset rows from it.

"Online when reachable": a run with no network must not hang on the hub's
client, which retries for minutes, nor mistake a bug for a missing network. So
the hub is first probed with one TCP connect to its endpoint (`HF_ENDPOINT`,
default huggingface.co:443) under a short timeout (`PRUNELAB_HUB_TIMEOUT_S`);
only when that answers does any hub client run. Connection failures after that
still mean "not from the hub" (`Unavailable`); every other error propagates.
`HF_TOKEN` is read by the hub libraries themselves (gated datasets and models).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any
from urllib.parse import urlsplit

from prunelab.config import settings
from prunelab.errors import FailedPrecondition, Unavailable

log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "https://huggingface.co"
PROBE_TTL_S = 60.0  # a long-running worker re-probes at most this often
_probes: dict[str, tuple[float, str | None]] = {}  # endpoint -> (when, why unreachable or None)


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT


def unreachable_reason() -> str | None:
    """Why the hub cannot be used now ("offline mode", "connection refused ..."), or
    None when it answers. Probes are cached for PROBE_TTL_S per endpoint."""
    if settings().offline:
        return "offline mode (PRUNELAB_OFFLINE / HF_HUB_OFFLINE)"
    endpoint = hub_endpoint()
    cached = _probes.get(endpoint)
    if cached is not None and time.monotonic() - cached[0] < PROBE_TTL_S:
        return cached[1]
    reason = _probe(endpoint, settings().hub_timeout_s)
    _probes[endpoint] = (time.monotonic(), reason)
    if reason:
        log.info("hub %s not reachable (%s): using local data only", endpoint, reason)
    return reason


def _probe(endpoint: str, timeout_s: float) -> str | None:
    parts = urlsplit(endpoint)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return None
    except OSError as err:  # DNS failure, refused, unreachable network, timeout
        return f"{host}:{port}: {err.strerror or type(err).__name__}"


def dataset_rows(path: str, config: str | None, split: str) -> list[dict[str, Any]]:
    """Rows of `split` of hub dataset `path` (`config` its subset). Unavailable when
    the hub cannot be reached; FailedPrecondition for a dataset that is missing or
    gated; any other error is a bug and propagates."""
    reason = unreachable_reason()
    if reason:
        raise Unavailable(f"hub not reachable: {reason}")
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    try:
        return [dict(row) for row in datasets.load_dataset(path, config, split=split)]
    except DatasetNotFoundError as err:
        raise FailedPrecondition(
            f"hub dataset {path!r} does not exist or is gated ({err}); for a gated dataset accept its terms "
            "on the hub and set HF_TOKEN",
            field="name",
        ) from None
    except (OSError, TimeoutError) as err:  # ConnectionError and requests' errors are OSErrors
        raise Unavailable(f"hub dataset {path!r} split {split!r} could not be fetched: {err}") from None
