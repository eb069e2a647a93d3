"""`load_model(spec)`: one entry point for every place a model can come from.

A spec is, in the order tried: an artifact URI (`artifact://<64 hex>`), a registered
name (`smollm2-135m`), an existing local path (a `.gguf` file or a checkpoint
directory), or a hub id (`org/name`). Every form is first resolved to a local
safetensors checkpoint directory, then loaded the same way. A GGUF is dequantized
once into our checkpoint format under `<cache>/models/<sha256 of the gguf>`, so later
loads read safetensors (SmolLM2-135M on 2 cores: ~50 s to convert, ~1.5 s per load
after).

Pickled weights (*.bin, *.pt, ...) are refused before transformers sees the directory:
unpickling runs arbitrary code.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    GgufConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from prunelab.access import check_hub_id, local_path, refuse_path
from prunelab.config import settings
from prunelab.data import hub
from prunelab.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from prunelab.models.checkpoint import read_provenance, save_checkpoint
from prunelab.models.modeling_prunelab import LEGACY_MODEL_TYPE_PREFIX, PER_LAYER_CLASSES
from prunelab.models.registry import RegisteredModel, registered_model, registered_names
from prunelab.store import open_store
from prunelab.store.manifest import SCHEME as ARTIFACT_SCHEME
from prunelab.store.manifest import parse_artifact_uri, sha256_file

log = logging.getLogger(__name__)

ModelKind = Literal["hub", "dir", "gguf", "artifact", "named"]

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"})
# What a hub snapshot fetches: configs, safetensors weights, tokenizer files. Never
# pickles or code.
HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja"]


@dataclass(frozen=True)
class ModelSource:
    """Where a loaded model came from."""

    spec: str  # as given
    kind: ModelKind
    path: Path  # the local checkpoint directory read (for a GGUF: its converted copy)
    base_id: str  # the unpruned model it descends from (hub id where known)
    # GGUF: the file's sha256; artifact: its digest; dir/hub: sha256 of the
    # `sha256sum *.safetensors` listing (reproducible from a shell)
    sha256: str


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    source: ModelSource


def load_model(spec: str, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> LoadedModel:
    """Load the causal LM `spec` names, in eval mode, on `device`, in `dtype`."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise InvalidArgument(f"dtype must be a floating torch.dtype, got {dtype!r}", field="dtype")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise InvalidArgument(f"device {device!r} is not a torch device", field="device") from None
    source = resolve_model(spec)
    model, tokenizer = _load_checkpoint(source.path, dtype, device)
    return LoadedModel(model=model, tokenizer=tokenizer, source=source)


def resolve_model(spec: str) -> ModelSource:
    """Resolve `spec` to a local checkpoint directory (converting, fetching or
    downloading on the way) without loading the weights."""
    if not isinstance(spec, str) or not spec.strip():
        raise InvalidArgument("model spec is empty", field="model")
    if spec.startswith(ARTIFACT_SCHEME):
        return _artifact_source(spec)
    if "://" in spec:
        raise InvalidArgument(
            f"{spec!r}: the only URI scheme accepted is {ARTIFACT_SCHEME}<64 hex digits>", field="model"
        )
    entry = registered_model(spec)
    if entry is not None:
        return _named_source(spec, entry)
    path = local_path(spec, field="model")
    if path is not None:
        return _local_source(spec, path.resolve())
    if HUB_ID.fullmatch(spec):
        check_hub_id(spec, field="model")
        return _hub_source(spec)
    if "/" in spec or spec.startswith((".", "~")) or spec.endswith(".gguf"):
        refuse_path(spec, field="model")
        raise NotFound(f"{spec}: no such file or directory", field="model")
    raise InvalidArgument(
        f"unknown model name {spec!r}: registered names are {', '.join(registered_names())} "
        f"(or give a checkpoint directory, a .gguf file, an {ARTIFACT_SCHEME} URI or a hub id org/name)",
        field="model",
    )


# ---- sources ----


def _artifact_source(spec: str) -> ModelSource:
    digest = parse_artifact_uri(spec)
    directory = open_store().get_dir(spec)
    return ModelSource(spec, "artifact", directory, _base_id(directory, default=spec), digest)


def _named_source(spec: str, entry: RegisteredModel) -> ModelSource:
    path = entry.locate()
    if path.suffix == ".gguf":
        digest = sha256_file(path)
        return ModelSource(spec, "named", _converted_gguf(path, digest, entry.base_id), entry.base_id, digest)
    return ModelSource(spec, "named", path, entry.base_id, _weights_digest(path))


def _local_source(spec: str, path: Path) -> ModelSource:
    if path.is_dir():
        return ModelSource(spec, "dir", path, _base_id(path, default=path.name), _weights_digest(path))
    if path.suffix != ".gguf":
        raise InvalidArgument(
            f"{path} is a file but not a .gguf; give a checkpoint directory or a .gguf file", field="model"
        )
    digest = sha256_file(path)
    return ModelSource(spec, "gguf", _converted_gguf(path, digest, path.stem), path.stem, digest)


def _hub_source(repo_id: str) -> ModelSource:
    """A hub model's snapshot: downloaded when the hub answers, else from the local
    Hugging Face cache only (no minutes of client retries without a network)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    unreachable = hub.unreachable_reason()
    token = "is set but has no access to it" if os.environ.get("HF_TOKEN") else "is not set"
    try:
        directory = Path(snapshot_download(repo_id, allow_patterns=HUB_FILES, local_files_only=unreachable is not None))
    except LocalEntryNotFoundError:
        if unreachable:
            raise FailedPrecondition(
                f"hub model {repo_id} is not in the local Hugging Face cache and the hub cannot be used ({unreachable}): "
                "download it once online, or give a local directory",
                field="model",
            ) from None
        raise Unavailable(f"hub model {repo_id} could not be downloaded", field="model") from None
    except GatedRepoError:
        raise FailedPrecondition(
            f"hub model {repo_id} is gated: accept its licence on the hub and give the workers a read token in "
            f"HF_TOKEN (HF_TOKEN {token})",
            field="model",
        ) from None
    except RepositoryNotFoundError:
        raise NotFound(f"hub model {repo_id} does not exist, or is private and HF_TOKEN {token}", field="model") from None
    except (HfHubHTTPError, OSError) as error:
        raise Unavailable(f"hub model {repo_id} could not be downloaded: {error}", field="model") from None
    return ModelSource(repo_id, "hub", directory, repo_id, _weights_digest(directory))


def _base_id(directory: Path, *, default: str) -> str:
    return read_provenance(directory).get("base_model_id") or default


# ---- GGUF ----


def _converted_gguf(gguf: Path, digest: str, base_id: str) -> Path:
    """The checkpoint directory converted from `gguf`, converting it on first use."""
    target = settings().cache_dir / "models" / digest
    if target.is_dir():
        return target
    log.info("converting %s to a safetensors checkpoint in %s (once)", gguf, target)
    model, tokenizer = _read_gguf(gguf)
    provenance = {
        "method": "gguf-dequantize",
        "base_model_id": base_id,
        "source_file": gguf.name,
        "source_sha256": digest,
    }
    try:
        save_checkpoint(model, tokenizer, target, provenance)
    except InvalidArgument:
        if not target.is_dir():
            raise
        # another process published the same conversion first: use it
    return target


def _read_gguf(gguf: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Dequantize a GGUF into a dense float32 model (dequantize=True also keeps
    transformers from attaching a non-serializable GGUF quantizer)."""
    try:
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except (OSError, ValueError) as error:
        raise FailedPrecondition(f"{gguf} could not be read as a GGUF model: {error}", field="model") from None
    return model, tokenizer


# ---- checkpoint directories ----


def _load_checkpoint(
    directory: Path, dtype: torch.dtype, device: torch.device
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if not (directory / "config.json").is_file():
        raise InvalidArgument(f"{directory} is not a model directory: it has no config.json", field="model")
    _refuse_pickled_weights(directory)
    try:
        config, model_class = _config_and_class(directory)
        model = model_class.from_pretrained(None, config=config, state_dict=read_weights(directory), dtype=dtype,
                                            device_map=device)
        tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as error:
        raise FailedPrecondition(f"{directory} could not be loaded: {error}", field="model") from None
    model.config.name_or_path = str(directory)
    if (directory / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(directory)
    return model, tokenizer


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the directory's safetensors files, read (pread) into this
    process's own memory. from_pretrained would map the files instead, and a
    mapped file's pages stay resident, counted in RSS, until every tensor read from
    it is gone: each weight a pruner replaces would cost its new copy on top of the
    old pages, up to the original model's size again. Read here, a replaced
    weight's memory goes back at once; the model's tensors are these (no copy)."""
    weights: dict[str, torch.Tensor] = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(path, framework="pt", backend="pread") as file:
            weights.update({name: file.get_tensor(name) for name in file.keys()})
    return weights


def _refuse_pickled_weights(directory: Path) -> None:
    if any(directory.glob("*.safetensors")):
        return
    pickled = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickled:
        raise FailedPrecondition(
            f"{directory} holds only pickled weights ({', '.join(pickled)}): unpickling can run arbitrary code, "
            "so prunelab never loads them; convert them to safetensors first",
            field="model",
        )
    raise FailedPrecondition(f"{directory} holds no *.safetensors weights", field="model")


def _weights_digest(directory: Path) -> str:
    """sha256 of what `sha256sum *.safetensors` prints in `directory`."""
    listing = "".join(f"{sha256_file(f)}  {f.name}\n" for f in sorted(directory.glob("*.safetensors")))
    return hashlib.sha256(listing.encode()).hexdigest()


def _config_and_class(directory: Path) -> tuple[PretrainedConfig, type[PreTrainedModel]]:
    """The checkpoint's config and the class to build it with. Per-layer checkpoints
    (`layer_widths` in config.json) get our classes from the family, whatever their
    model_type says (the family's own, or `prunelab_<family>` before it was); code
    shipped inside a checkpoint is never run: trust_remote_code stays off."""
    raw = json.loads((directory / "config.json").read_text())
    if raw.get("layer_widths") is None:
        config = AutoConfig.from_pretrained(directory, trust_remote_code=False)
        return config, AutoModelForCausalLM._model_mapping[type(config)]
    family = str(raw.get("model_type", "")).removeprefix(LEGACY_MODEL_TYPE_PREFIX)
    if family not in PER_LAYER_CLASSES:
        raise FailedPrecondition(f"{directory}: per-layer widths of an unknown family {raw.get('model_type')!r}", field="model")
    config_class, model_class = PER_LAYER_CLASSES[family]
    return config_class.from_dict({key: value for key, value in raw.items() if key != "model_type"}), model_class


def _register_per_layer_models() -> None:
    """Let AutoModelForCausalLM.from_config build our per-layer configs in this process."""
    for config_class, model_class in PER_LAYER_CLASSES.values():
        AutoModelForCausalLM.register(config_class, model_class, exist_ok=True)


_register_per_layer_models()
