"""The checkpoint format: uniform checkpoints are plain family configs, per-layer ones
load through the shipped modeling file; both reproduce the in-memory model exactly,
in-process via load_model and in a fresh process with only plain transformers."""

from __future__ import annotations

import json
import site
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
import torch
from fixtures.models import tiny_causal_lm
from transformers import GPT2Config, GPT2LMHeadModel

import prunelab
from prunelab.errors import InvalidArgument
from prunelab.models import LlamaFamilyAdapter, load_model, save_checkpoint
from prunelab.models import checkpoint as checkpoint_module

pytestmark = pytest.mark.usefixtures("torch_single_thread")

PROMPT = torch.tensor([[5, 17, 42, 99, 7, 250, 31]])


def _shrink_uniformly(model) -> None:
    adapter = LlamaFamilyAdapter(model)
    for layer in range(adapter.num_layers):
        adapter.keep_kv_groups(layer, [1])
        adapter.keep_mlp_channels(layer, range(0, 96, 2))


def _shrink_per_layer(model) -> None:
    """Every layer ends up different: heads, MLP channels, and the residual width."""
    adapter = LlamaFamilyAdapter(model)
    adapter.keep_kv_groups(0, [0])
    adapter.keep_mlp_channels(1, range(0, 96, 3))
    adapter.keep_kv_groups(2, [1])
    adapter.keep_mlp_channels(2, range(40))
    adapter.keep_hidden_channels([c for c in range(64) if c % 5])


def _greedy(model, max_new_tokens: int = 8) -> torch.Tensor:
    return model.generate(PROMPT, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True)


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(PROMPT).logits


def _config(directory: Path) -> dict:
    return json.loads((directory / "config.json").read_text())


def test_checkpoints_are_reproduced_by_plain_transformers_in_a_fresh_process(
    tiny_tokenizer, plain_transformers_run, tmp_path
):
    uniform = tiny_causal_lm("llama")
    _shrink_uniformly(uniform)
    per_layer = {family: tiny_causal_lm(family) for family in ("llama", "qwen2", "qwen3")}
    for model in per_layer.values():
        _shrink_per_layer(model)
    models = {"uniform-llama": uniform, **{f"per-layer-{family}": model for family, model in per_layer.items()}}
    dirs = [save_checkpoint(model, tiny_tokenizer, tmp_path / name, {"method": "t"}) for name, model in models.items()]

    runs = dict(zip(models, plain_transformers_run(dirs, PROMPT), strict=False))

    for name, model in models.items():
        run = runs[name]
        assert not run.prunelab_importable
        assert torch.equal(run.logits, _logits(model)), name
        assert torch.equal(run.generated, _greedy(model)), name
    assert runs["uniform-llama"].model_class == "transformers.models.llama.modeling_llama.LlamaForCausalLM"
    for family in per_layer:
        # the modeling file shipped in the checkpoint, not a prunelab import
        assert runs[f"per-layer-{family}"].model_class.startswith("transformers_modules."), family


_TOKENIZER_CHILD = r"""
import json, sys
sys.path[:0] = json.loads(sys.argv[1])
from transformers import AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained(sys.argv[2])
print(json.dumps(tokenizer("the quick fox")["input_ids"]))
"""


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_a_per_layer_checkpoints_tokenizer_loads_in_plain_transformers_with_no_prompt_or_warning(family, tiny_tokenizer, tmp_path):
    model = tiny_causal_lm(family)
    _shrink_per_layer(model)
    out = save_checkpoint(model, tiny_tokenizer, tmp_path / "ckpt", {"method": "test"})

    # a fresh interpreter without prunelab (see plain_transformers_run), no terminal, stdin closed
    done = subprocess.run([sys.executable, "-I", "-S", "-c", _TOKENIZER_CHILD, json.dumps(site.getsitepackages()), str(out)],
                          cwd=tmp_path, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"},
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)

    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.splitlines()[-1]) == tiny_tokenizer("the quick fox")["input_ids"]
    assert "custom code" not in done.stdout + done.stderr and "model of type" not in done.stderr, done.stdout + done.stderr


def test_a_per_layer_checkpoint_of_the_older_prunelab_model_type_still_loads(tiny_tokenizer, tmp_path):
    model = tiny_causal_lm("llama")
    _shrink_per_layer(model)
    out = save_checkpoint(model, tiny_tokenizer, tmp_path / "ckpt", {"method": "test"})
    config = _config(out)
    (out / "config.json").write_text(json.dumps({**config, "model_type": "prunelab_llama"}))  # as written before 2026-11-30

    loaded = load_model(str(out))

    assert LlamaFamilyAdapter(loaded.model).layer_widths() == LlamaFamilyAdapter(model).layer_widths()
    assert torch.equal(_logits(loaded.model), _logits(model))


def test_uniform_checkpoint_is_a_plain_family_config(tiny_tokenizer, tmp_path):
    model = tiny_causal_lm("llama")
    _shrink_uniformly(model)
    out = save_checkpoint(model, tiny_tokenizer, tmp_path / "ckpt", {"method": "test"})

    config = _config(out)
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["intermediate_size"]) == (4, 1, 48)
    assert config["head_dim"] == 16
    assert "auto_map" not in config and "layer_widths" not in config
    assert not (out / "modeling_prunelab.py").exists()


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_per_layer_checkpoint_config_names_the_shipped_classes(family, tiny_tokenizer, tmp_path):
    model = tiny_causal_lm(family)
    _shrink_per_layer(model)
    widths = [w.as_dict() for w in LlamaFamilyAdapter(model).layer_widths()]
    out = save_checkpoint(model, tiny_tokenizer, tmp_path / "ckpt", {"method": "test"})

    config = _config(out)
    prefix = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3"}[family]
    assert config["model_type"] == family  # the stock type: tokenizer loaders ask no remote-code question
    assert config["architectures"] == [f"Prunelab{prefix}ForCausalLM"]
    assert config["auto_map"] == {
        "AutoConfig": f"modeling_prunelab.Prunelab{prefix}Config",
        "AutoModelForCausalLM": f"modeling_prunelab.Prunelab{prefix}ForCausalLM",
    }
    assert config["layer_widths"] == widths
    assert config["hidden_size"] == 51
    shipped = Path(checkpoint_module.modeling_prunelab.__file__).read_bytes()
    assert (out / "modeling_prunelab.py").read_bytes() == shipped


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_load_model_reproduces_a_per_layer_checkpoint_in_process(family, tiny_tokenizer, tmp_path):
    model = tiny_causal_lm(family)
    _shrink_per_layer(model)
    out = save_checkpoint(model, tiny_tokenizer, tmp_path / "ckpt", {"method": "test"})

    loaded = load_model(str(out))

    assert LlamaFamilyAdapter(loaded.model).layer_widths() == LlamaFamilyAdapter(model).layer_widths()
    assert torch.equal(_logits(loaded.model), _logits(model))
    assert torch.equal(_greedy(loaded.model), _greedy(model))
    assert loaded.tokenizer("the quick fox")["input_ids"] == tiny_tokenizer("the quick fox")["input_ids"]


def test_attention_implementation_switches_reach_every_rebuilt_layer(tiny_tokenizer, tmp_path):
    model = tiny_causal_lm("qwen2")
    _shrink_per_layer(model)
    loaded = load_model(str(save_checkpoint(model, tiny_tokenizer, tmp_path / "ckpt", {"method": "test"}))).model
    sdpa = _logits(loaded)

    loaded.set_attn_implementation("eager")

    assert {layer.self_attn.config._attn_implementation for layer in loaded.model.layers} == {"eager"}
    torch.testing.assert_close(_logits(loaded), sdpa, rtol=1e-4, atol=1e-5)


def test_a_loaded_per_layer_model_can_be_shrunk_again_and_saved_uniform(tiny_tokenizer, tmp_path):
    model = tiny_causal_lm("llama")
    LlamaFamilyAdapter(model).keep_kv_groups(0, [0])
    first = load_model(str(save_checkpoint(model, tiny_tokenizer, tmp_path / "first", {"method": "test"}))).model
    adapter = LlamaFamilyAdapter(first)
    for layer in range(1, adapter.num_layers):
        adapter.keep_kv_groups(layer, [0])

    second = save_checkpoint(first, tiny_tokenizer, tmp_path / "second", {"method": "test"})

    config = _config(second)
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert torch.equal(_logits(load_model(str(second)).model), _logits(first))


def test_uniform_llama_whose_hidden_size_no_longer_divides_by_heads_uses_the_per_layer_config(tiny_tokenizer, tmp_path):
    # LlamaConfig rejects hidden_size % num_attention_heads != 0 although head_dim is
    # explicit; 60 channels with 8 heads must still save and load.
    model = tiny_causal_lm("llama")
    LlamaFamilyAdapter(model).keep_hidden_channels(range(60))

    out = save_checkpoint(model, tiny_tokenizer, tmp_path / "ckpt", {"method": "test"})

    config = _config(out)
    assert config["architectures"] == ["PrunelabLlamaForCausalLM"] and config["layer_widths"][0]["num_attention_heads"] == 8
    assert config["num_attention_heads"] == 6  # the most heads dividing 60: the stock LlamaConfig accepts the file
    assert torch.equal(_logits(load_model(str(out)).model), _logits(model))


def test_prunelab_json_records_provenance_params_versions_and_widths(tiny_tokenizer, tmp_path):
    model = tiny_causal_lm("llama")
    params_before = sum(p.numel() for p in model.parameters())
    _shrink_per_layer(model)
    provenance = {
        "base_model_id": "tiny/llama",
        "base_model_sha256": "0" * 64,
        "method": "manual",
        "settings": {"importance": "none"},
        "ratio_requested": 0.2,
        "ratio_achieved": 0.18,
        "seed": 7,
        "params_before": params_before,
    }
    out = save_checkpoint(model, tiny_tokenizer, tmp_path / "ckpt", provenance)

    record = json.loads((out / "prunelab.json").read_text())
    assert {k: record[k] for k in provenance} == provenance
    reloaded = load_model(str(out)).model
    assert record["params_after"] == sum(p.numel() for p in reloaded.parameters()) < params_before
    assert record["layer_widths"] == _config(out)["layer_widths"]
    assert (record["hidden_size"], record["head_dim"]) == (51, 16)
    assert record["library_versions"] == {
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "prunelab": prunelab.__version__,
    }
    assert datetime.fromisoformat(record["created"]).tzinfo is not None
    assert load_model(str(out)).source.base_id == "tiny/llama"


def test_large_checkpoints_are_sharded_and_load_back(tiny_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint_module, "MAX_SHARD_SIZE", "40KB")
    model = tiny_causal_lm("qwen2")
    _shrink_per_layer(model)

    out = save_checkpoint(model, tiny_tokenizer, tmp_path / "ckpt", {"method": "test"})

    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file()
    assert torch.equal(_logits(load_model(str(out)).model), _logits(model))


def test_directory_digest_is_the_sha256sum_listing_of_the_weights(tiny_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint_module, "MAX_SHARD_SIZE", "40KB")
    out = save_checkpoint(tiny_causal_lm("llama"), tiny_tokenizer, tmp_path / "ckpt", {"method": "test"})

    shell = subprocess.run(
        "sha256sum *.safetensors | sha256sum", shell=True, cwd=out, capture_output=True, text=True, check=True
    )
    assert load_model(str(out)).source.sha256 == shell.stdout.split()[0]


def test_saving_leaves_the_in_memory_config_alone(tiny_tokenizer, tmp_path):
    model = tiny_causal_lm("llama")
    _shrink_per_layer(model)
    config = model.config
    before = config.to_dict()

    save_checkpoint(model, tiny_tokenizer, tmp_path / "ckpt", {"method": "test"})

    assert model.config is config and config.to_dict() == before


def test_existing_output_directory_is_never_overwritten(tiny_model, tiny_tokenizer, tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    with pytest.raises(InvalidArgument, match="already exists") as error:
        save_checkpoint(tiny_model, tiny_tokenizer, out, {"method": "test"})
    assert error.value.field == "out_dir"
    assert list(tmp_path.iterdir()) == [out]  # no staging directory left behind


@pytest.mark.parametrize(
    ("provenance", "reason"),
    [
        ({"layer_widths": []}, "may not set"),
        ({"seed": object()}, "not JSON-serializable"),
        ({"ratio_requested": float("nan")}, "not JSON-serializable"),
        ({1: "x"}, "string keys"),
    ],
)
def test_bad_provenance_is_refused_before_anything_is_written(tiny_model, tiny_tokenizer, tmp_path, provenance, reason):
    with pytest.raises(InvalidArgument, match=reason) as error:
        save_checkpoint(tiny_model, tiny_tokenizer, tmp_path / "ckpt", provenance)
    assert error.value.field == "provenance"
    assert list(tmp_path.iterdir()) == []


def test_unsupported_architecture_is_refused_naming_the_supported_ones(tiny_tokenizer, tmp_path):
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=320))
    with pytest.raises(InvalidArgument, match="gpt2.*llama, mistral, qwen2, qwen3"):
        save_checkpoint(gpt2, tiny_tokenizer, tmp_path / "ckpt", {"method": "test"})
