"""GGUF export: the file's header, tensors and tokenizer, read back by the `gguf`
package and by transformers' own GGUF loader (which undoes llama.cpp's rotary row
order, so equal logits prove the order written is llama.cpp's); the export job's
artifact; the CLI's errors. Serving by llama.cpp itself: tests/test_llama_cpp.py."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from fixtures.models import half_zeroed, tiny_causal_lm
from transformers import AutoModelForCausalLM, AutoTokenizer

from prunelab.cli import main as cli_main
from prunelab.errors import FailedPrecondition
from prunelab.export import GGUF_NAME, run_export, write_gguf
from prunelab.export.gguf_file import rotary_rows_for_llama_cpp
from prunelab.models import LlamaFamilyAdapter, save_checkpoint
from prunelab.store import open_store

PROMPT = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 64]])


def _f16_rounded(model):
    """The model with every matrix rounded through float16, as an f16 export stores it
    (norm vectors stay float32)."""
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim > 1:
                param.copy_(param.half().float())
    return model


def _fields(path) -> dict:
    reader = gguf.GGUFReader(path)
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def _tensors(path) -> dict[str, tuple[str, list[int]]]:
    return {t.name: (t.tensor_type.name, [int(n) for n in t.shape]) for t in gguf.GGUFReader(path).tensors}


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_uniform_export_is_read_back_by_transformers_with_the_same_logits_and_tokens(family, tiny_tokenizer, tmp_path):
    model = tiny_causal_lm(family)
    checkpoint = save_checkpoint(model, tiny_tokenizer, tmp_path / "ckpt", {"method": "test"})
    written = write_gguf(checkpoint, tmp_path / "model.gguf", "f16")

    assert written.architecture == "llama"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf", dtype=torch.float32)
    with torch.no_grad():
        expected = _f16_rounded(model)(PROMPT).logits
        got = loaded(PROMPT).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path, gguf_file="model.gguf")
    assert tokenizer("the quick brown fox")["input_ids"] == tiny_tokenizer("the quick brown fox")["input_ids"]


def test_rotary_reorder_pairs_each_heads_halves():
    head_dim, heads = 4, 2
    rows = np.arange(heads * head_dim, dtype=np.float32)[:, None]  # row i holds i
    reordered = rotary_rows_for_llama_cpp(rows, heads, head_dim)[:, 0]
    # transformers rotates row j with row j + head_dim/2; llama.cpp wants them adjacent
    assert reordered.tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_per_layer_widths_become_deci_with_arrays_and_every_layer_sized_by_its_own(tiny_tokenizer, tmp_path):
    model = tiny_causal_lm("llama")
    adapter = LlamaFamilyAdapter(model)
    adapter.keep_kv_groups(0, [0])
    adapter.keep_mlp_channels(1, range(0, 96, 3))
    adapter.keep_kv_groups(2, [1])
    checkpoint = save_checkpoint(model, tiny_tokenizer, tmp_path / "ckpt", {"method": "test"})

    written = write_gguf(checkpoint, tmp_path / "model.gguf", "q8_0")

    fields, tensors = _fields(written.path), _tensors(written.path)
    widths = adapter.layer_widths()
    assert written.architecture == fields["general.architecture"] == "deci"
    assert fields["deci.attention.head_count"] == [w.num_attention_heads for w in widths] == [4, 8, 4, 8]
    assert fields["deci.attention.head_count_kv"] == [w.num_key_value_heads for w in widths]
    assert fields["deci.feed_forward_length"] == [w.intermediate_size for w in widths] == [96, 32, 96, 96]
    assert fields["deci.attention.key_length"] == 16
    assert tensors["blk.0.attn_q.weight"][1] == [64, 4 * 16]
    assert tensors["blk.1.ffn_down.weight"] == ("Q8_0", [32, 64])  # rows of 32: whole q8_0 blocks
    assert tensors["blk.0.attn_norm.weight"][0] == "F32"
    assert "output.weight" not in tensors  # tied: llama.cpp reuses token_embd


def test_a_pruned_width_is_padded_with_zero_channels_that_change_nothing(tiny_tokenizer, tmp_path):
    model = tiny_causal_lm("llama")
    adapter = LlamaFamilyAdapter(model)
    for layer in range(adapter.num_layers):
        adapter.keep_mlp_channels(layer, range(40))  # 40: not whole blocks of 32
    checkpoint = save_checkpoint(model, tiny_tokenizer, tmp_path / "ckpt", {"method": "test"})

    q8 = write_gguf(checkpoint, tmp_path / "q8.gguf", "q8_0")
    f16 = write_gguf(checkpoint, tmp_path / "model.gguf", "f16")

    assert q8.padded_channels == f16.padded_channels == 4 * (64 - 40)
    assert _fields(q8.path)["llama.feed_forward_length"] == 64
    assert _tensors(q8.path)["blk.1.ffn_down.weight"] == ("Q8_0", [64, 64])  # padded: whole q8_0 blocks
    down = next(t for t in gguf.GGUFReader(f16.path).tensors if t.name == "blk.1.ffn_down.weight")
    assert (np.asarray(down.data)[:, 40:] == 0).all()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf", dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(PROMPT).logits, _f16_rounded(model)(PROMPT).logits, rtol=1e-4, atol=1e-4)


def test_a_hidden_size_that_does_not_split_into_blocks_stays_f16(tiny_tokenizer, tmp_path):
    model = tiny_causal_lm("llama", hidden_size=48)  # channel mode prunes the hidden size
    checkpoint = save_checkpoint(model, tiny_tokenizer, tmp_path / "ckpt", {"method": "test"})

    tensors = _tensors(write_gguf(checkpoint, tmp_path / "model.gguf", "q8_0").path)

    assert tensors["blk.1.ffn_up.weight"] == ("F16", [48, 96])
    assert tensors["blk.1.ffn_down.weight"][0] == "Q8_0"  # its rows are the 96 MLP channels


def test_depth_pruned_checkpoint_exports_its_remaining_blocks(tiny_tokenizer, tmp_path):
    model = tiny_causal_lm("llama", num_hidden_layers=3)
    checkpoint = save_checkpoint(model, tiny_tokenizer, tmp_path / "ckpt", {"method": "test"})
    fields = _fields(write_gguf(checkpoint, tmp_path / "model.gguf").path)
    assert fields["llama.block_count"] == 3


def test_a_sparse_model_keeps_its_zeros_dense_in_the_export(tiny_tokenizer, tmp_path):
    model = half_zeroed(tiny_causal_lm("llama"))
    checkpoint = save_checkpoint(model, tiny_tokenizer, tmp_path / "ckpt", {"method": "test"})

    reader = gguf.GGUFReader(write_gguf(checkpoint, tmp_path / "model.gguf", "f16").path)

    for tensor in (t for t in reader.tensors if t.name.startswith("blk.") and len(t.shape) == 2):
        assert (np.asarray(tensor.data) == 0).mean() == 0.5, tensor.name  # 2:4 zeros, kept exactly, stored dense


def test_the_real_model_keeps_its_vocabulary_special_tokens_and_chat_template(smollm2, tmp_path):
    checkpoint = smollm2.source.path
    fields = _fields(write_gguf(checkpoint, tmp_path / "model.gguf", "q8_0").path)

    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert len(fields["tokenizer.ggml.tokens"]) == 49152 and len(fields["tokenizer.ggml.merges"]) == 48900
    assert fields["tokenizer.ggml.tokens"][1] == "<|im_start|>"
    assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert fields["tokenizer.chat_template"].startswith("{% for message in messages %}")


def test_export_job_publishes_a_gguf_artifact_with_provenance(tiny_dir, tmp_path):
    outcome = run_export(str(tiny_dir), "f16", out_file=tmp_path / "copy.gguf")

    folder = open_store().get_dir(outcome.artifact.uri)
    record = json.loads((folder / "prunelab.json").read_text())
    assert (folder / GGUF_NAME).read_bytes() == (tmp_path / "copy.gguf").read_bytes()
    assert record["source_spec"] == str(tiny_dir) and record["architecture"] == "llama" and record["outtype"] == "f16"
    assert record["size_bytes"] == (folder / GGUF_NAME).stat().st_size
    assert outcome.artifact.kind == "gguf"


def test_cli_exports_and_artifact_get_fetches_the_file(tiny_dir, tmp_path, capsys):
    assert cli_main(["export", "--model", str(tiny_dir), "--json"]) == 0
    uri = json.loads(capsys.readouterr().out)["artifact"]
    assert cli_main(["artifact", "get", uri, "--out", str(tmp_path / "fetched")]) == 0
    assert gguf.GGUFReader(tmp_path / "fetched" / GGUF_NAME).fields["general.architecture"].contents() == "llama"


def test_cli_refuses_an_existing_out_file_and_an_unsupported_family(tiny_dir, tiny_tokenizer, tmp_path, capsys):
    taken = tmp_path / "taken.gguf"
    taken.write_bytes(b"keep me")
    assert cli_main(["export", "--model", str(tiny_dir), "--out", str(taken)]) == 2
    assert "already exists" in capsys.readouterr().err and taken.read_bytes() == b"keep me"

    qwen = save_checkpoint(tiny_causal_lm("qwen2"), tiny_tokenizer, tmp_path / "qwen", {"method": "test"})
    assert cli_main(["export", "--model", str(qwen)]) == 1
    assert "Llama and Mistral" in capsys.readouterr().err


def test_an_unknown_pre_tokenizer_is_refused_rather_than_guessed(tiny_dir, tmp_path):
    spec = json.loads((tiny_dir / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Whitespace"}
    (tiny_dir / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(FailedPrecondition, match="pre-tokenizer"):
        write_gguf(tiny_dir, tmp_path / "model.gguf")
    assert not (tmp_path / "model.gguf").exists()
