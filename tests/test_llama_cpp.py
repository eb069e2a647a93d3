"""GGUF exports served by a real engine: llama.cpp (llama-cpp-python, built by
`make test-slow`) loads the f16 export of the real SmolLM2-135M as it comes and pruned
by 20 % three ways (the same widths in every layer, per-layer widths, whole layers);
its greedy continuations equal transformers' (on the same f16-rounded weights) for 16
tokens, and its perplexity on raw held-out text is within 1 % of transformers'. Then
`prunelab profile --engine llama.cpp`."""

from __future__ import annotations

import csv
import json
import math
import os

import pytest
import torch

from prunelab.cli import main as cli_main
from prunelab.config import settings
from prunelab.data import resolve_text
from prunelab.export import write_gguf
from prunelab.models import load_model
from prunelab.orchestrate import load_study
from prunelab.profile.llama_cpp import LlamaCppModel
from prunelab.prune import PruneSettings, run_prune

pytestmark = pytest.mark.slow

if os.environ.get("CI", "").lower() != "true":
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is installed by `make test-slow`")

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Pruning a language model removes"]
NEW_TOKENS = 16
PPL_TOKENS = 512  # one window of raw wikipassages validation text, the same tokens in both engines
# prunelab's best configuration (calibrated on wikipassages train, refit): models worth serving, each shape.
PRUNED = {
    "uniform": PruneSettings(ratio=0.2, allocation="uniform", attn_layers="0:", mlp_layers="0:"),
    "per-layer": PruneSettings(ratio=0.2),  # prunelab's best configuration: MLP first, widths differ per layer
    "depth": PruneSettings(ratio=0.2, mode="depth"),  # block influence on the calibration text
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("pruned")
    specs = {"base": "smollm2-135m"}
    for name, prune_settings in PRUNED.items():
        specs[name] = str(run_prune("smollm2-135m", prune_settings, out_dir=folder / name).checkpoint_dir)
    return specs


@pytest.mark.parametrize(("name", "architecture"), [("base", "llama"), ("uniform", "llama"), ("per-layer", "deci"), ("depth", "llama")])
def test_llama_cpp_generates_what_transformers_generates_and_agrees_on_perplexity(checkpoints, name, architecture, tmp_path):
    loaded = load_model(checkpoints[name])
    written = write_gguf(loaded.source.path, tmp_path / "model.gguf", "f16")
    _round_matrices_to_f16(loaded.model)  # the very weights the f16 file holds: what differs then is the engine
    assert written.architecture == architecture
    engine = LlamaCppModel(written.path, n_ctx=PPL_TOKENS, threads=2, all_logits=True)
    try:
        for prompt in PROMPTS:
            ids = loaded.tokenizer(prompt)["input_ids"]
            expected = loaded.model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False)[0, len(ids):].tolist()
            got = engine.greedy(ids, NEW_TOKENS)
            # generate stops at end-of-sequence; llama.cpp's loop here does not
            eos = loaded.model.generation_config.eos_token_id
            stopped = len(expected) < NEW_TOKENS and expected[-1] in (eos if isinstance(eos, list) else [eos])
            assert len(expected) == NEW_TOKENS or stopped
            assert got[: len(expected)] == expected, f"{prompt!r}: llama.cpp {got}, transformers {expected}"

        tokens = loaded.tokenizer(resolve_text("wikipassages", split="validation"))["input_ids"][:PPL_TOKENS]
        with torch.no_grad():
            logits = loaded.model(torch.tensor([tokens])).logits[0, :-1].double()
        transformers_nll = -torch.log_softmax(logits, -1).gather(1, torch.tensor(tokens[1:])[:, None]).mean().item()
        llama_cpp_nll = -engine.token_logprobs(tokens).mean()
    finally:
        engine.close()
    ppl, engine_ppl = math.exp(transformers_nll), math.exp(llama_cpp_nll)
    print(f"\n{name}: {architecture} f16 {written.size_bytes / 2**20:.1f} MiB; PPL@{PPL_TOKENS} wikipassages validation "
          f"transformers {ppl:.3f}, llama.cpp {engine_ppl:.3f} ({engine_ppl / ppl - 1:+.3%})")
    assert abs(engine_ppl / ppl - 1) < 0.01


def test_profile_times_the_exports_in_llama_cpp_against_the_exported_base(checkpoints, capsys):
    code = cli_main(["profile", "--model", checkpoints["per-layer"], "--baseline", "smollm2-135m", "--engine", "llama.cpp",
                     "--seq-len", "64", "--gen-tokens", "16", "--repeats", "3", "--threads", "2", "--skip-memory", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    print(json.dumps(result, indent=1))
    assert result["environment"]["engine"] == "llama.cpp" and result["settings"]["batch_sizes"] == [1]
    latency = result["latency"]["1"]
    assert latency["decode_tokens_per_s"] > 0 and latency["prefill_ms"] > 0
    assert latency["speedup"]["decode"] > 0 and result["baseline"]["latency"]["1"]["decode_tokens_per_s"] > 0


def _round_matrices_to_f16(model) -> None:
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim > 1:  # norms stay f32 in the export
                param.copy_(param.half().float())


def test_a_study_profiles_in_both_engines_and_reports_their_speedups_side_by_side(tiny_checkpoint, tmp_path):
    from test_orchestrate import tiny_study_text, write_text

    profiling = {"seq_len": 8, "batch_sizes": [1], "gen_tokens": 4, "repeats": 2, "warmup": 0, "skip_memory": True,
                 "engines": ["torch", "llama.cpp"]}
    path = tmp_path / "tiny.yaml"
    path.write_text(tiny_study_text(tiny_checkpoint, write_text(tmp_path / "text"), evaluation=None, tuning=None, profiling=profiling))

    assert cli_main(["run", str(path)]) == 0

    folder = settings().home / "reports" / load_study(path).id
    rows = list(csv.DictReader(open(folder / "table_engines.csv")))
    assert [row["Model"] for row in rows] == ["base", "taylor 20%", "l2 20%"]
    for row in rows:
        assert float(row["torch decode tok/s"]) > 0 and float(row["llama.cpp decode tok/s"]) > 0
    assert all(float(row[f"{engine} decode speedup"]) > 0 for row in rows[1:] for engine in ("torch", "llama.cpp"))
    assert "Speed where it is served" in (folder / "report.md").read_text()
