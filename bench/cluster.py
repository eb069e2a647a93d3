"""Embedded vs local multi-process cluster: the wall time of the same small study.

    python -P bench/cluster.py [--methods l2,taylor] [--windows 40]

The default study (examples/smollm2.yaml) cut down to the methods given at 20 % of
the whole model, WikiText-2 perplexity on --windows windows and profiling, without
tuning or tasks (its text is ../shared/data when present, else the embedded
fallback), runs twice from an empty PRUNELAB_HOME:

- embedded: `prunelab run STUDY` in one process with the local store;
- cluster: `make up-local`'s topology (deploy/local/cluster.py: SeaweedFS as S3,
  orchestrator, pruner, tuner, profiler, two evaluators, one process each), then
  `prunelab run STUDY --orchestrator ADDR`, timed from submission to the end.

Both share one warm model cache (the GGUF -> safetensors conversion is done first,
as a deployment's cache volume would hold it), and the cluster is started before
the clock starts, as a deployment's services are. The script checks that both runs
report the same perplexities and prints the ratio (goal: at most 1.15x).
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def study(methods: list[str], windows: int) -> dict:
    """examples/smollm2.yaml cut down: its model, calibration and profiling, `methods` at
    20 %, perplexity on `windows` windows, no tuning and no tasks."""
    document = yaml.safe_load((REPO / "examples" / "smollm2.yaml").read_text())
    document |= {"name": "cluster-bench", "description": "bench/cluster.py: the default study, cut down"}
    document["pruning"] |= {"methods": methods, "ratios": [0.2]}
    document["evaluation"] = {"perplexity": document["evaluation"]["perplexity"] | {"max_windows": windows}}
    del document["tuning"]
    return document


def timed_run(args: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "prunelab.cli", "run", *args], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"prunelab run {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return wall


def perplexities(report_dir: Path) -> dict[str, float]:
    rows = csv.DictReader(io.StringIO((report_dir / "measurements.csv").read_text()))
    return {row["model"]: float(row["value"]) for row in rows if row["measure"] == "ppl"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="l2,taylor")
    parser.add_argument("--windows", type=int, default=40, help="perplexity windows of 128 tokens")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="prunelab-cluster-bench-"))
    study_file = root / "study.yaml"
    study_file.write_text(yaml.safe_dump(study(args.methods.split(","), args.windows)))
    base_env = {**os.environ, "PRUNELAB_OFFLINE": "true", "PRUNELAB_CACHE": str(root / "cache"), "PRUNELAB_LOG_LEVEL": "WARNING"}
    if SHARED.is_dir():
        base_env["PRUNELAB_DATA_DIR"] = str(SHARED)
    warm = "from prunelab.models import load_model; load_model('smollm2-135m')"
    subprocess.run([sys.executable, "-c", warm], env={**base_env, "PRUNELAB_HOME": str(root / "warm")}, check=True, capture_output=True)

    embedded_env = {**base_env, "PRUNELAB_HOME": str(root / "embedded")}
    embedded_s = timed_run([str(study_file), "--out", str(root / "embedded-report")], embedded_env)
    print(f"embedded: {embedded_s:.1f} s", flush=True)

    sys.path.insert(0, str(REPO / "deploy" / "local"))  # deploy/ is not a package
    import cluster
    cluster_env = {**base_env, "PRUNELAB_HOME": str(root / "cluster")}
    os.environ.update(cluster_env)  # the services inherit it
    running = cluster.up(root / "cluster-state", orchestrator_port=0)
    try:
        cluster_s = timed_run([str(study_file), "--orchestrator", running.orchestrator, "--out", str(root / "cluster-report")],
                              cluster_env)
    finally:
        cluster.down(root / "cluster-state")

    embedded_ppl, cluster_ppl = perplexities(root / "embedded-report"), perplexities(root / "cluster-report")
    same = embedded_ppl.keys() == cluster_ppl.keys() and all(
        abs(cluster_ppl[k] - v) <= 1e-4 * v for k, v in embedded_ppl.items())
    jobs = len(args.methods.split(",")) * 3 + 1  # prune, evaluate, profile per method, the base's evaluation
    print(f"study: {args.methods} at 20 % of SmolLM2-135M, wikitext2 ppl (seq 128, {args.windows} windows), profiling: {jobs} jobs")
    print("| mode | wall s | vs embedded |\n|---|---|---|")
    print(f"| embedded (one process, local store) | {embedded_s:.1f} | 1.00x |")
    print(f"| local cluster (7 processes, SeaweedFS S3) | {cluster_s:.1f} | {cluster_s / embedded_s:.2f}x |")
    print(f"same perplexities: {same} ({', '.join(f'{k[:20]}={v:.2f}' for k, v in sorted(cluster_ppl.items()))})")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
