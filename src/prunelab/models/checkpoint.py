"""The checkpoint format: a Hugging Face model directory plus `prunelab.json`.

Layout: model.safetensors (sharded above MAX_SHARD_SIZE), config.json,
generation_config.json, tokenizer files, prunelab.json (provenance). When every
decoder layer has the same widths and the stock config accepts them, config.json is
the plain family config (LlamaConfig etc. with explicit head_dim), loadable anywhere
without custom code. Otherwise it carries `layer_widths` and an `auto_map` into
`modeling_prunelab.py`, copied into the directory, so `trust_remote_code=True` loads
it with no prunelab installed. Its model_type stays the family's ("llama"), so
AutoTokenizer, which reads config.json first, finds a stock type and asks no
remote-code question (checkpoints before 2026-11-30 say "prunelab_llama"; both load).

Why not DeciLM/Nemotron-NAS `block_configs` (vLLM loads them natively): a block sets
only `n_heads_in_group`; the query-head count stays the global num_attention_heads
(vLLM nemotron_nas.py: kv_heads = num_attention_heads // n_heads_in_group), so dropping
whole KV groups, which drops query heads, cannot be written; `ffn_mult` rounds MLP
widths up to a multiple of 256; no Qwen2 biases or Qwen3 q/k norms. transformers
5.23's `per_layer_config` is config-only (Llama modeling ignores it). Hence our classes.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import transformers
from huggingface_hub.errors import StrictDataclassClassValidationError
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

import prunelab
from prunelab.errors import FailedPrecondition, InvalidArgument
from prunelab.models import modeling_prunelab
from prunelab.models.adapter import LlamaFamilyAdapter
from prunelab.models.modeling_prunelab import FAMILIES, PER_LAYER_CLASSES, WIDTH_FIELDS

PROVENANCE_FILE = "prunelab.json"
MODELING_FILE = "modeling_prunelab.py"
MAX_SHARD_SIZE = "5GB"
FORMAT_VERSION = 1
# Keys save_checkpoint writes itself; a caller's provenance may not set them.
_RECORDED_KEYS = (
    "format_version",
    "params_after",
    "library_versions",
    "created",
    "hidden_size",
    "head_dim",
    "layer_widths",
)
# Config keys about where and how a config was stored, not about the model: rebuilt
# on save (`_model_name_or_path` is a GGUF's general.name).
_STORAGE_KEYS = (
    "model_type",
    "architectures",
    "auto_map",
    "layer_widths",
    "transformers_version",
    "quantization_config",
    "_name_or_path",
    "_model_name_or_path",
)


def save_checkpoint(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: str | Path, provenance: dict[str, Any]
) -> Path:
    """Write `model` and `tokenizer` as a new checkpoint directory `out_dir`, atomically
    (written beside it, then renamed), and return its path.

    `provenance` is the caller's record, stored in prunelab.json as given: by convention
    base_model_id, base_model_sha256, method, settings, ratio_requested,
    ratio_achieved, seed, and params_before. Added here: params_after, library
    versions, creation time, hidden_size, head_dim and per-layer widths.
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise InvalidArgument(f"{out_dir} already exists; checkpoints are never overwritten", field="out_dir")
    adapter = LlamaFamilyAdapter(model)
    record = _provenance_record(adapter, provenance)
    config = checkpoint_config(adapter)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # a hidden sibling, so the final rename is atomic; mkdir (unlike mkdtemp's 0700)
    # honours the umask, so shared caches stay readable
    staging = out_dir.parent / f".{out_dir.name}.{secrets.token_hex(6)}.tmp"
    staging.mkdir()
    try:
        _write_checkpoint(model, tokenizer, config, record, staging)
        _publish(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def checkpoint_config(adapter: LlamaFamilyAdapter) -> PretrainedConfig:
    """The config describing the adapter's model as it is now: the plain family config
    when the layers are uniform and the stock class accepts it, else ours."""
    widths = adapter.layer_widths()
    shared = {k: v for k, v in adapter.model.config.to_dict().items() if k not in _STORAGE_KEYS}
    shared.update(hidden_size=adapter.hidden_size, head_dim=adapter.head_dim, num_hidden_layers=adapter.num_layers)
    if len(set(widths)) == 1:
        config_class, model_class = FAMILIES[adapter.family]
        try:
            config = config_class.from_dict({**shared, **widths[0].as_dict()})
        except StrictDataclassClassValidationError:
            pass  # e.g. LlamaConfig wants hidden_size divisible by the head count
        else:
            config.architectures = [model_class.__name__]
            return config
    config_class, model_class = PER_LAYER_CLASSES[adapter.family]
    maxima = {field: max(getattr(w, field) for w in widths) for field in WIDTH_FIELDS}
    maxima["num_attention_heads"] = _heads_dividing(adapter.hidden_size, maxima["num_attention_heads"])
    config = config_class.from_dict(
        {
            **shared,
            **maxima,
            "layer_widths": [w.as_dict() for w in widths],
            "auto_map": {
                "AutoConfig": f"{Path(MODELING_FILE).stem}.{config_class.__name__}",
                "AutoModelForCausalLM": f"{Path(MODELING_FILE).stem}.{model_class.__name__}",
            },
        }
    )
    config.architectures = [model_class.__name__]
    return config


def _heads_dividing(hidden_size: int, heads: int) -> int:
    """The most heads, up to `heads`, that divide `hidden_size`. AutoTokenizer and
    AutoConfig without remote code read a per-layer config as the stock family config,
    and LlamaConfig refuses a hidden size that is no multiple of the head count (channel
    pruning leaves such sizes); the model itself takes its heads from `layer_widths`."""
    return next(count for count in range(heads, 0, -1) if hidden_size % count == 0)


def read_provenance(checkpoint_dir: Path) -> dict[str, Any]:
    """The prunelab.json of a checkpoint directory; {} for a directory we did not write."""
    path = Path(checkpoint_dir) / PROVENANCE_FILE
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise FailedPrecondition(f"{path} is not valid JSON: {error}", field="model") from None
    if not isinstance(record, dict):
        raise FailedPrecondition(f"{path} must hold a JSON object", field="model")
    return record


def _provenance_record(adapter: LlamaFamilyAdapter, provenance: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(provenance, dict) or not all(isinstance(key, str) for key in provenance):
        raise InvalidArgument("provenance must be a dict with string keys", field="provenance")
    clashes = sorted(set(provenance) & set(_RECORDED_KEYS))
    if clashes:
        raise InvalidArgument(f"provenance may not set {clashes}: save_checkpoint records them", field="provenance")
    record = {
        **provenance,
        "format_version": FORMAT_VERSION,
        "params_after": adapter.num_parameters(),
        "library_versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "prunelab": prunelab.__version__,
        },
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "hidden_size": adapter.hidden_size,
        "head_dim": adapter.head_dim,
        "layer_widths": [w.as_dict() for w in adapter.layer_widths()],
    }
    try:
        json.dumps(record, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise InvalidArgument(f"provenance is not JSON-serializable: {error}", field="provenance") from None
    return record


def _write_checkpoint(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    config: PretrainedConfig,
    record: dict[str, Any],
    directory: Path,
) -> None:
    architectures = config.architectures
    with _config_swapped(model, config):
        model.save_pretrained(directory, max_shard_size=MAX_SHARD_SIZE)
    # save_pretrained names the in-memory class as the architecture; write the one to load.
    config.architectures = architectures
    config.save_pretrained(directory)
    if getattr(config, "layer_widths", None) is not None:
        shutil.copyfile(modeling_prunelab.__file__, directory / MODELING_FILE)
    tokenizer.save_pretrained(directory)
    (directory / PROVENANCE_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


@contextmanager
def _config_swapped(model: PreTrainedModel, config: PretrainedConfig) -> Iterator[None]:
    """Let save_pretrained write `config`, and leave the caller's config untouched
    (save_pretrained stamps dtype and architectures onto the config it saves)."""
    original = model.config
    model.config = config
    try:
        yield
    finally:
        model.config = original


def _publish(staging: Path, out_dir: Path) -> None:
    try:
        os.rename(staging, out_dir)
    except OSError:
        if out_dir.exists():
            raise InvalidArgument(f"{out_dir} was created while this checkpoint was written", field="out_dir") from None
        raise
