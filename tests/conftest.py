"""Shared test setup. Fixtures live in tests/fixtures/*.py by topic and are loaded
here as plugins: models (tiny random Llama configs, the real SmolLM2), s3 (a real
SeaweedFS server on 127.0.0.1), grpc (servers on real sockets)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["fixtures.models", "fixtures.s3", "fixtures.grpc", "fixtures.evaluate", "fixtures.hub", "fixtures.disk"]

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
# Converted models are reused across runs (converting the GGUF takes ~30 s); the
# folder is git-ignored, so a fresh clone converts once.
TEST_CACHE = REPO / ".prunelab" / "test-cache"


@pytest.fixture(scope="session", autouse=True)
def read_roots(tmp_path_factory):
    """Servers in tests (in this process and the local cluster's) may read the files
    tests make and the shared data, as a deployment names its data folders in
    PRUNELAB_READ_ROOTS; everything else stays refused to them (prunelab.access)."""
    roots = [tmp_path_factory.getbasetemp(), TEST_CACHE, REPO / "tests", REPO.parent / "shared"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PRUNELAB_READ_ROOTS", ":".join(str(root) for root in roots))
        yield roots


@pytest.fixture(autouse=True)
def prunelab_home(tmp_path, monkeypatch):
    """Every test gets its own empty PRUNELAB_HOME (store, state) and offline mode;
    the model cache is shared so the real model is converted once per machine."""
    from prunelab.config import settings

    home = tmp_path / "prunelab-home"
    monkeypatch.setenv("PRUNELAB_HOME", str(home))
    monkeypatch.setenv("PRUNELAB_CACHE", str(TEST_CACHE))
    monkeypatch.setenv("PRUNELAB_OFFLINE", "true")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.delenv("PRUNELAB_STORE", raising=False)
    for transport in ("PRUNELAB_TLS_DIR", "PRUNELAB_TLS_CLIENT_AUTH", "PRUNELAB_AUTH_TOKEN", "PRUNELAB_AUTH_TOKEN_FILE",
                      "PRUNELAB_ALLOW_PLAINTEXT", "PRUNELAB_GRPC_REFLECTION", "PRUNELAB_HEALTH_PORT"):
        monkeypatch.delenv(transport, raising=False)  # a developer's own TLS setup must not leak in
    settings.cache_clear()
    yield home
    settings.cache_clear()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (real validation text); tests that need it skip where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent (it exists on developer machines and in CI only)")
    return SHARED_DATA
