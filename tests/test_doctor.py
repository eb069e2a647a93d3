"""`prunelab doctor` on this machine: versions, CUDA, the configured device and the
store; exit 0 when jobs can run here, 1 with the reason when they cannot."""

from __future__ import annotations

import json
import socket

import pytest
import torch

import prunelab
from prunelab.cli import main
from prunelab.config import settings


def doctor(monkeypatch, capsys, **env: str) -> tuple[int, dict, str]:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings.cache_clear()
    code = main(["doctor", "--json"])
    out, err = capsys.readouterr()
    return code, json.loads(out), err


def test_cpu_is_usable_and_the_local_store_answers(monkeypatch, capsys, prunelab_home):
    code, found, err = doctor(monkeypatch, capsys, PRUNELAB_DEVICE="cpu")
    assert code == 0 and err == "" and found["problems"] == []
    assert found["versions"]["torch"] == torch.__version__
    assert found["device"] == {"configured": "cpu", "resolved": "cpu", "problem": None}
    assert found["store"] == {"location": str(prunelab_home / "store"), "reachable": True, "problem": None}
    assert found["cuda"]["available"] == torch.cuda.is_available()
    assert len(found["cuda"]["gpus"]) == torch.cuda.device_count()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_asking_for_cuda_without_a_gpu_fails_and_says_why(monkeypatch, capsys):
    code, found, err = doctor(monkeypatch, capsys, PRUNELAB_DEVICE="cuda")
    assert code == 1
    assert "prunelab doctor: error: PRUNELAB_DEVICE='cuda' asks for a GPU, but no CUDA GPU is visible here" in err
    assert found["device"]["problem"] in err and found["store"]["reachable"]


def test_an_unreachable_store_fails(monkeypatch, capsys):
    with socket.socket() as probe:  # a port nothing listens on once closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code, found, err = doctor(monkeypatch, capsys, PRUNELAB_DEVICE="cpu", PRUNELAB_STORE="s3://models",
                              PRUNELAB_S3_ENDPOINT=f"127.0.0.1:{port}", PRUNELAB_S3_ACCESS_KEY="key", PRUNELAB_S3_SECRET_KEY="secret")
    assert code == 1 and not found["store"]["reachable"]
    assert f"store s3://models: cannot reach S3 at 127.0.0.1:{port}" in err


def test_the_text_report_names_the_device_and_the_store(monkeypatch, capsys, prunelab_home):
    monkeypatch.setenv("PRUNELAB_DEVICE", "cpu")
    settings.cache_clear()
    assert main(["doctor"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"prunelab {prunelab.__version__}, python ") and f"torch {torch.__version__}" in lines[0]
    assert "device: cpu (PRUNELAB_DEVICE=cpu): usable" in lines
    assert f"store: {prunelab_home / 'store'}: reachable" in lines
