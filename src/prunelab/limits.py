"""Upper bounds on what one request may ask for (samples, sequence length, windows,
steps, ...), so no request allocates without bound: a field over its kind's limit is
INVALID_ARGUMENT naming the field, the value and the limit. The limits are env vars
(`config.LIMIT_VARIABLES`); every settings object checks its fields here."""

from __future__ import annotations

from prunelab.config import LIMIT_VARIABLES, settings
from prunelab.errors import InvalidArgument


def check_limit(kind: str, value: int | float, field: str) -> None:
    """InvalidArgument if `value` of `field` is above the limit of its `kind`."""
    limit = settings().limits[kind]
    if value > limit:
        raise InvalidArgument(f"{field}={value} is above this deployment's limit of {limit} ({LIMIT_VARIABLES[kind][0]})", field=field)
