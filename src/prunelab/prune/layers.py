"""Layer ranges as people write them: Python slices over decoder layers."""

from __future__ import annotations

from prunelab.errors import InvalidArgument

# LLM-Pruner's recipe spares the first layers and the last ones; on SmolLM2 (30
# layers) "4:-2" is its block_*_layer_start=4 / end=28.
DEFAULT_LAYERS = "4:-2"


def parse_layer_range(text: str, num_layers: int, field: str) -> range:
    """`"4:18"` -> layers 4..17 (end exclusive, as LLM-Pruner's start/end and Python
    slices); negative ends count from the last layer; `""` or `"none"` -> no layers."""
    text = text.strip()
    if text in ("", "none"):
        return range(0)
    parts = text.split(":")
    if len(parts) != 2:
        raise InvalidArgument(f"{field} {text!r} must be START:END (e.g. 4:18, 4:-2)", field=field)
    try:
        start, stop = (int(p) if p.strip() else None for p in parts)
    except ValueError:
        raise InvalidArgument(f"{field} {text!r}: START and END must be integers", field=field) from None
    for bound in (start, stop):
        if bound is not None and not -num_layers <= bound <= num_layers:
            raise InvalidArgument(f"{field} {text!r} is outside the model's {num_layers} layers", field=field)
    layers = range(num_layers)[slice(start, stop)]
    if not layers:
        raise InvalidArgument(f"{field} {text!r} selects no layer of {num_layers}", field=field)
    return layers
