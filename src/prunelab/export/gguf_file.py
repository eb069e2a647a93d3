"""A prunelab checkpoint as one GGUF file that llama.cpp (and what embeds it: Ollama,
LM Studio, llama-cpp-python) serves.

The `gguf` package writes the file, names the tensors and quantizes. Done here, as
llama.cpp's own converter does for Hugging Face models (not shipped in that package):
- the architecture: uniform Llama/Mistral layers are `llama`; per-layer widths are
  `deci`, llama.cpp's DeciLM/Nemotron-NAS architecture, whose loader sizes every
  layer from per-layer head counts and feed-forward widths (`llama` reads such arrays
  too but sizes all tensors from layer 0). Depth-pruned models simply have fewer
  blocks; sparse models keep their zeros, stored dense;
- Q and K rows reordered for llama.cpp's rotary layout (pairs of adjacent channels,
  where transformers rotates the two halves of each head);
- feed-forward widths padded with zero channels to whole blocks of FFN_BLOCK, so a
  pruned width (1188, 997) still quantizes and takes llama.cpp's fast matrix kernels;
- the vocabulary, the pre-tokenizer's name, special tokens and chat template, from the
  checkpoint's own tokenizer files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from prunelab.errors import FailedPrecondition, InvalidArgument
from prunelab.models import read_weights
from prunelab.models.modeling_prunelab import LEGACY_MODEL_TYPE_PREFIX, WIDTH_FIELDS

# outtype -> (file type recorded in the header, type of the 2-D weights)
OUTTYPES = {
    "f16": (gguf.LlamaFileType.MOSTLY_F16, gguf.GGMLQuantizationType.F16),
    "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, gguf.GGMLQuantizationType.Q8_0),
}
# The transformers families written as llama.cpp's `llama` (Mistral is Llama with
# sliding-window attention, which llama.cpp's llama ignores, as its converter does).
LLAMA_FAMILIES = ("llama", "mistral")
# llama.cpp quantizes rows in blocks of 32 values, and its CPU matrix kernels want
# inner dimensions in whole blocks. A pruned feed-forward width is padded up to one:
# gate and up rows of zeros and down columns of zeros add silu(0) * 0 = 0, so the
# model computes exactly what it did (README, Serving: the speed this buys).
FFN_BLOCK = 32
# Bumped whenever the same checkpoint starts to give a different file, so a study's
# state directory never reuses an older export (its export jobs hash it). 2: padding.
EXPORTER_VERSION = 2

# Byte-level BPE pre-tokenizers (tokenizer.json `pre_tokenizer`) -> llama.cpp's name
# for the same splitting (llama-vocab.cpp). Unknown ones are refused: a wrong name
# tokenizes silently differently.
_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class GgufFile:
    path: Path
    architecture: str  # "llama" or "deci"
    outtype: str
    tensors: int
    size_bytes: int
    padded_channels: int = 0  # zero feed-forward channels added, over all layers (FFN_BLOCK)


def write_gguf(checkpoint: Path, out_path: Path, outtype: str = "f16", name: str = "") -> GgufFile:
    """Write the checkpoint directory `checkpoint` as the GGUF file `out_path`."""
    check_outtype(outtype)
    config = json.loads((checkpoint / "config.json").read_text())
    family = config.get("model_type", "").removeprefix(LEGACY_MODEL_TYPE_PREFIX)
    if family not in LLAMA_FAMILIES:
        raise FailedPrecondition(
            f"GGUF export writes Llama and Mistral checkpoints; this one is {config.get('model_type')!r}", field="model"
        )
    if _rope(config).get("rope_type", "default") != "default" or config.get("attention_bias") or config.get("mlp_bias"):
        raise FailedPrecondition("GGUF export does not yet write rope scaling or biases: "
                                 f"rope {_rope(config)}, attention_bias {config.get('attention_bias')}", field="model")
    pruned_widths = _layer_widths(config)
    widths = [{**w, "intermediate_size": _padded(w["intermediate_size"])} for w in pruned_widths]
    padding = sum(w["intermediate_size"] for w in widths) - sum(w["intermediate_size"] for w in pruned_widths)
    architecture = "deci" if len({tuple(w.values()) for w in widths}) > 1 else "llama"
    file_type, weight_type = OUTTYPES[outtype]
    vocabulary = _vocabulary(checkpoint, config["vocab_size"])  # refused tokenizers fail before any file exists
    partial = out_path.with_name(f".{out_path.name}.partial")
    try:
        writer = gguf.GGUFWriter(partial, architecture)
        _write_hparams(writer, config, widths, name or checkpoint.name, file_type)
        _write_tokenizer(writer, checkpoint, vocabulary)
        count = _write_tensors(writer, read_weights(checkpoint), config, widths, architecture, weight_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        partial.rename(out_path)
    finally:
        partial.unlink(missing_ok=True)
    return GgufFile(out_path, architecture, outtype, count, out_path.stat().st_size, padding)


def check_outtype(outtype: str) -> None:
    if outtype not in OUTTYPES:
        raise InvalidArgument(f"outtype {outtype!r} is not one of {', '.join(OUTTYPES)}", field="outtype")


def _layer_widths(config: dict[str, Any]) -> list[dict[str, int]]:
    if config.get("layer_widths"):
        return config["layer_widths"]
    uniform = {field: config[field] for field in WIDTH_FIELDS}
    return [uniform] * config["num_hidden_layers"]


def _padded(width: int) -> int:
    return -(-width // FFN_BLOCK) * FFN_BLOCK


def _rope(config: dict[str, Any]) -> dict[str, Any]:
    """transformers 5 writes `rope_parameters`; hub configs may still carry rope_theta and rope_scaling."""
    return config.get("rope_parameters") or {"rope_theta": config.get("rope_theta", 10000.0), **(config.get("rope_scaling") or {})}


def _head_dim(config: dict[str, Any]) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def _write_hparams(writer: gguf.GGUFWriter, config: dict[str, Any], widths: list[dict[str, int]], name: str, file_type: int) -> None:
    def per_layer(field: str) -> int | list[int]:
        values = [w[field] for w in widths]
        return values[0] if len(set(values)) == 1 else values

    head_dim = _head_dim(config)
    writer.add_name(name)
    writer.add_file_type(file_type)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(per_layer("intermediate_size"))
    writer.add_head_count(per_layer("num_attention_heads"))
    writer.add_head_count_kv(per_layer("num_key_value_heads"))
    # llama.cpp would infer head_dim as hidden / heads, which pruning heads breaks
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(_rope(config).get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])


# ---- tokenizer


@dataclass(frozen=True)
class _Vocabulary:
    pre: str  # llama.cpp's name of the pre-tokenizer
    tokens: list[str]
    types: list[int]


def _vocabulary(checkpoint: Path, vocab_size: int) -> _Vocabulary:
    spec_path = checkpoint / "tokenizer.json"
    if not spec_path.is_file():
        raise FailedPrecondition(f"{checkpoint} has no tokenizer.json to export a vocabulary from", field="model")
    spec = json.loads(spec_path.read_text())
    if spec["model"]["type"] != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise FailedPrecondition("GGUF export writes byte-level BPE tokenizers (GPT-2, Llama 3, SmolLM style); "
                                 f"this one is {spec['model']['type']} with decoder {spec.get('decoder')}", field="model")
    return _Vocabulary(_pre_tokenizer_name(spec.get("pre_tokenizer")), *_tokens(spec, vocab_size))


def _write_tokenizer(writer: gguf.GGUFWriter, checkpoint: Path, vocabulary: _Vocabulary) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocabulary.pre)
    writer.add_token_list(vocabulary.tokens)
    writer.add_token_types(vocabulary.types)
    special = gguf.SpecialVocab(checkpoint, load_merges=True, n_vocab=len(vocabulary.tokens))
    special.add_to_gguf(writer, quiet=True)
    template = checkpoint / "chat_template.jinja"  # transformers 5 keeps it beside tokenizer_config.json
    if special.chat_template is None and template.is_file():
        writer.add_chat_template(template.read_text())


def _pre_tokenizer_name(pre: dict[str, Any] | None) -> str:
    def byte_level(step: dict[str, Any]) -> bool:
        return all(step.get(k) == v for k, v in _BYTE_LEVEL.items())

    steps = (pre or {}).get("pretokenizers", [pre]) if (pre or {}).get("type") == "Sequence" else [pre]
    kinds = [step.get("type") if step else None for step in steps]
    if len(steps) == 1 and byte_level(steps[0]):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and byte_level(steps[1]):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and steps[0].get("pattern", {}).get("Regex") == _LLAMA3_SPLIT:
        return "llama-bpe"
    raise FailedPrecondition(f"GGUF export does not know llama.cpp's name for the pre-tokenizer {json.dumps(pre)}", field="model")


def _tokens(spec: dict[str, Any], vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens by id, padded to the embedding's rows as llama.cpp expects, with types:
    special added tokens are CONTROL, other added ones USER_DEFINED."""
    by_id = {index: token for token, index in spec["model"]["vocab"].items()}
    types = dict.fromkeys(by_id, gguf.TokenType.NORMAL)
    for added in spec.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        types[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    if max(by_id) >= vocab_size:
        raise FailedPrecondition(f"the tokenizer has token id {max(by_id)} but the model only {vocab_size} embeddings", field="model")
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    return tokens, [types.get(i, gguf.TokenType.UNUSED) for i in range(vocab_size)]


# ---- tensors


def _write_tensors(writer: gguf.GGUFWriter, weights: dict[str, torch.Tensor], config: dict[str, Any],
                   widths: list[dict[str, int]], architecture: str, weight_type: gguf.GGMLQuantizationType) -> int:
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[architecture.upper()], config["num_hidden_layers"])
    head_dim = _head_dim(config)
    tied = config.get("tie_word_embeddings", False)
    count = 0
    for hf_name, tensor in weights.items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reuses token_embd when output.weight is absent
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise FailedPrecondition(f"GGUF export has no llama.cpp name for the tensor {hf_name}", field="model")
        data = tensor.float().numpy()
        layer = _layer_index(hf_name)
        if hf_name.endswith("q_proj.weight"):
            data = rotary_rows_for_llama_cpp(data, widths[layer]["num_attention_heads"], head_dim)
        elif hf_name.endswith("k_proj.weight"):
            data = rotary_rows_for_llama_cpp(data, widths[layer]["num_key_value_heads"], head_dim)
        elif hf_name.endswith(("gate_proj.weight", "up_proj.weight")):
            data = _zero_padded(data, 0, widths[layer]["intermediate_size"])
        elif hf_name.endswith("down_proj.weight"):
            data = _zero_padded(data, 1, widths[layer]["intermediate_size"])
        _add_tensor(writer, name, data, weight_type)
        count += 1
    return count


def _layer_index(hf_name: str) -> int:
    parts = hf_name.split(".")
    return int(parts[2]) if len(parts) > 3 and parts[1] == "layers" else -1


def rotary_rows_for_llama_cpp(weight: np.ndarray, heads: int, head_dim: int) -> np.ndarray:
    """Reorder each head's output rows from transformers' rotary layout (the first half
    of a head rotates with the second) to llama.cpp's (row 2i with row 2i+1)."""
    rows = weight.reshape(heads, 2, head_dim // 2, -1)
    return rows.swapaxes(1, 2).reshape(weight.shape)


def _zero_padded(data: np.ndarray, axis: int, size: int) -> np.ndarray:
    """`data` with zeros appended along `axis` up to `size`."""
    widths = [(0, 0)] * data.ndim
    widths[axis] = (0, size - data.shape[axis])
    return np.pad(data, widths)


def _add_tensor(writer: gguf.GGUFWriter, name: str, data: np.ndarray, weight_type: gguf.GGMLQuantizationType) -> None:
    """Vectors (norms) stay f32, as llama.cpp's converter keeps them; a matrix whose rows
    do not split into whole quantization blocks (a hidden size that channel mode
    pruned) falls back to f16."""
    if data.ndim == 1:
        writer.add_tensor(name, data.astype(np.float32))
        return
    block = gguf.GGML_QUANT_SIZES[weight_type][0]
    chosen = weight_type if data.shape[-1] % block == 0 else gguf.GGMLQuantizationType.F16
    if chosen == gguf.GGMLQuantizationType.F16:
        writer.add_tensor(name, data.astype(np.float16))
    else:
        writer.add_tensor(name, gguf.quants.quantize(data, chosen), raw_dtype=chosen)
