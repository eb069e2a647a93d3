"""Embedded vs local multi-process cluster: the wall time of the same small study.

    python -P bench/cluster.py [--methods l2,taylor] [--windows 40] [--jobs 1] [--threads N]

The default study (examples/smollm2.yaml) cut down to the methods given at 20 % of
the whole model, perplexity on its corpora (--windows windows each) and profiling, without
tuning or tasks (its text is ../shared/data when present, else the embedded
fallback). The model, SmolLM2-135M-Instruct, is the Q4_1 GGUF dequantized to float32,
so its perplexities are not the original checkpoint's. Three runs, each from an
empty PRUNELAB_HOME (no result reused):

1. embedded: `prunelab run STUDY --max-parallel JOBS` in one process, local store;
2. cluster, like for like: `make up-local`'s topology (deploy/local/cluster.py:
   SeaweedFS as S3, orchestrator, pruner, tuner, profiler, two evaluators, one
   process each) with the orchestrator running JOBS jobs at once, then
   `prunelab run STUDY --orchestrator ADDR`;
3. cluster at full parallelism: the same topology as `make up-local` sizes it (as
   many jobs at once as cores, one torch thread per process); its own row, not a
   like-for-like comparison.

What is inside each clock: runs 1 and 2 give every process (the embedded one, and
every service) OMP_NUM_THREADS=THREADS, so torch uses the same number of threads per
job. Each `prunelab run` is a driver process that first imports what the services
import at start-up (torch, transformers, lm-eval through the evaluator, every
service module), then starts its clock around `prunelab run` itself: submitting the
study, every job, and writing the report. The cluster's own start-up (processes,
imports, health checks) is outside its clock and printed on its own line. Both
sides share one warm model cache (the GGUF -> safetensors conversion is done first,
as a deployment's cache volume would hold it). The script checks that every run
reports the same perplexities.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
CORES = os.cpu_count() or 1

# `prunelab run ...` with the clock started after the imports the services do at start-up.
DRIVER = r"""
import json, sys, time
import torch, transformers  # noqa: F401
import prunelab.evaluate.service, prunelab.orchestrate.service, prunelab.profile.service  # noqa: F401
import prunelab.prune.service, prunelab.tune.service  # noqa: F401
from prunelab.cli import main
started = time.perf_counter()
code = main(sys.argv[1:])
print(json.dumps({"wall_s": time.perf_counter() - started, "code": code, "torch_threads": torch.get_num_threads()}))
"""


def study(methods: list[str], windows: int) -> dict:
    """examples/smollm2.yaml cut down: its model, calibration and profiling, `methods` at
    20 %, perplexity on `windows` windows, no tuning and no tasks."""
    document = yaml.safe_load((REPO / "examples" / "smollm2.yaml").read_text())
    document |= {"name": "cluster-bench", "description": "bench/cluster.py: the default study, cut down"}
    document["pruning"] |= {"methods": methods, "ratios": [0.2]}
    document["evaluation"] = {"perplexity": document["evaluation"]["perplexity"] | {"max_windows": windows}}
    del document["tuning"]
    return document


def timed_run(args: list[str], env: dict[str, str]) -> tuple[float, int]:
    """`prunelab run ARGS` through DRIVER: the clock's seconds and the driver's torch threads."""
    done = subprocess.run([sys.executable, "-c", DRIVER, "run", *args], env=env, capture_output=True, text=True)
    last = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else "{}"
    result = json.loads(last) if last.startswith("{") else {}
    if done.returncode != 0 or result.get("code") != 0:
        raise SystemExit(f"prunelab run {' '.join(args)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return result["wall_s"], result["torch_threads"]


def perplexities(report_dir: Path) -> dict[str, float]:
    """"model corpus" -> perplexity, every corpus the study measures."""
    rows = csv.DictReader(io.StringIO((report_dir / "measurements.csv").read_text()))
    return {f"{row['model']} {row['name']}": float(row["value"]) for row in rows if row["measure"] == "ppl"}


def run_on_cluster(name: str, root: Path, study_file: Path, env: dict[str, str]) -> tuple[float, float]:
    """Start the cluster with `env`, run the study on it, stop it: (start-up s, study s)."""
    import cluster  # deploy/local/cluster.py, put on sys.path by main()

    saved = dict(os.environ)
    os.environ.update(env)  # the services inherit it
    try:
        started = time.perf_counter()
        running = cluster.up(root / f"{name}-state", orchestrator_port=0)
        startup_s = time.perf_counter() - started
        try:
            wall_s, _client_threads = timed_run([str(study_file), "--orchestrator", running.orchestrator, "--out", str(root / f"{name}-report")],
                                        env)
        finally:
            cluster.down(root / f"{name}-state")
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return startup_s, wall_s


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="l2,taylor")
    parser.add_argument("--windows", type=int, default=40, help="perplexity windows of 128 tokens")
    parser.add_argument("--jobs", type=int, default=1, help="jobs at once, embedded and like-for-like cluster (default 1, as make run)")
    parser.add_argument("--threads", type=int, default=CORES, help=f"torch threads per process in runs 1 and 2 (default {CORES}, the cores)")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO / "deploy" / "local"))  # deploy/ is not a package
    root = Path(tempfile.mkdtemp(prefix="prunelab-cluster-bench-"))
    study_file = root / "study.yaml"
    document = study(args.methods.split(","), args.windows)
    study_file.write_text(yaml.safe_dump(document))
    corpora = document["evaluation"]["perplexity"]["corpora"]
    base_env = {**os.environ, "PRUNELAB_OFFLINE": "true", "PRUNELAB_CACHE": str(root / "cache"), "PRUNELAB_LOG_LEVEL": "WARNING"}
    if SHARED.is_dir():
        base_env["PRUNELAB_DATA_DIR"] = str(SHARED)
    warm = "from prunelab.models import load_model; load_model('smollm2-135m')"
    subprocess.run([sys.executable, "-c", warm], env={**base_env, "PRUNELAB_HOME": str(root / "warm")}, check=True, capture_output=True)

    like = {**base_env, "OMP_NUM_THREADS": str(args.threads)}
    embedded_s, embedded_threads = timed_run(
        [str(study_file), "--max-parallel", str(args.jobs), "--out", str(root / "embedded-report")],
        {**like, "PRUNELAB_HOME": str(root / "embedded")})
    print(f"embedded: {embedded_s:.1f} s", flush=True)
    like_startup_s, like_s = run_on_cluster(
        "cluster", root, study_file,
        {**like, "PRUNELAB_HOME": str(root / "cluster"), "PRUNELAB_ORCHESTRATOR_MAX_PARALLEL": str(args.jobs)})
    print(f"cluster, {args.jobs} job(s) at once: {like_s:.1f} s", flush=True)
    full = {**base_env, "OMP_NUM_THREADS": "1", "PRUNELAB_HOME": str(root / "full"), "PRUNELAB_ORCHESTRATOR_MAX_PARALLEL": str(CORES)}
    full_startup_s, full_s = run_on_cluster("full", root, study_file, full)

    reports = {name: perplexities(root / f"{name}-report") for name in ("embedded", "cluster", "full")}
    reference = reports["embedded"]
    same = all(r.keys() == reference.keys() and all(abs(r[k] - v) <= 1e-4 * v for k, v in reference.items())
               for r in reports.values())
    # per model one evaluation per corpus and a profile; per method a prune
    jobs = (len(args.methods.split(",")) + 1) * (len(corpora) + 1) + len(args.methods.split(","))
    print(f"study: {args.methods} at 20 % of SmolLM2-135M (Q4_1 GGUF dequantized to float32), perplexity on "
          f"{', '.join(corpora)} (seq 128, first {args.windows} windows each), profiling: {jobs} jobs; {CORES} cores")
    print("clock: `prunelab run` from submission to the written report, after the driver imported what the services "
          "import at start-up; the cluster's start-up is outside it")
    print("| mode | jobs at once | torch threads per process | wall s | vs embedded |\n|---|---|---|---|---|")
    print(f"| embedded (one process, local store) | {args.jobs} | {embedded_threads} | {embedded_s:.1f} | 1.00x |")
    print(f"| local cluster, like for like (7 processes, SeaweedFS S3) | {args.jobs} | {args.threads} | {like_s:.1f} | "
          f"{like_s / embedded_s:.2f}x |")
    print(f"| local cluster at full parallelism (make up-local's sizing) | {CORES} | 1 | {full_s:.1f} | {full_s / embedded_s:.2f}x |")
    print(f"cluster start-up, not in the clocks: {like_startup_s:.1f} s (like for like), {full_startup_s:.1f} s (full parallelism)")
    print(f"same perplexities in all three: {same} ({', '.join(f'{k}={v:.2f}' for k, v in sorted(reference.items()))})")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
