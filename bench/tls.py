"""What mutual TLS costs a study: the same study on the local cluster with and without
`--tls`, wall time from submit to report.

Run: `.venv/bin/python -P bench/tls.py [--rounds 2]`. Each round starts a cluster
(deploy/local/cluster.py: SeaweedFS, orchestrator, pruner, tuner, profiler, two
evaluators, all on 127.0.0.1), runs the study through `prunelab run --orchestrator`
and stops it; plaintext and TLS alternate, each going first in turn (the second
cluster of a round finds warmer caches), so drifts hit both alike. The study:
SmolLM2-135M (the embedded GGUF, float32), pruned by l2 and random to 20 %, each model's
perplexity on raw `wikipassages` validation (16 windows of 128 tokens): 5 jobs, each one
gRPC stream to a worker (a second prune waits as a busy replica), plus the CLI's watch
stream and health checks. Needs ../shared/data for wikipassages; prints a message and
exits 0 without it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
STUDY = """name: tls-bench-{round}
model: smollm2-135m
calibration: {{dataset: wikipassages, split: train, samples: 8, seq_len: 64}}
pruning:
  - methods: [l2, random]
    ratios: [0.2]
    layers: ["4:-2"]
evaluation:
  perplexity: {{corpora: [wikipassages], split: validation, seq_lens: [128], max_windows: 16}}
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="studies per transport (default %(default)s)")
    args = parser.parse_args()
    if not SHARED.is_dir():
        print(f"skipped: {SHARED} is absent (the study reads wikipassages)")
        return 0
    os.environ.update(PRUNELAB_DATA_DIR=str(SHARED), PRUNELAB_OFFLINE="true", PRUNELAB_LOG_LEVEL="WARNING")
    sys.path.insert(0, str(REPO / "deploy" / "local"))
    import cluster as local_cluster

    from prunelab.cli import main as cli_main
    from prunelab.config import settings

    times: dict[str, list[float]] = {"plaintext": [], "mTLS": []}
    with tempfile.TemporaryDirectory(prefix="prunelab-bench-tls-") as scratch:
        for round_ in range(args.rounds):
            for transport in list(times)[:: 1 if round_ % 2 == 0 else -1]:  # each goes first in turn
                state = Path(scratch) / f"{transport}-{round_}"
                study = Path(scratch) / f"study-{transport}-{round_}.yaml"
                study.write_text(STUDY.format(round=f"{transport.lower()}-{round_}"))
                os.environ.pop("PRUNELAB_TLS_DIR", None)  # the previous round's client certificate
                running = local_cluster.up(state, orchestrator_port=0, tls=transport == "mTLS")
                try:
                    os.environ.update(running.client_env)
                    settings.cache_clear()
                    started = time.monotonic()
                    if cli_main(["run", str(study), "--orchestrator", running.orchestrator, "--plain"]) != 0:
                        raise SystemExit(f"the {transport} study failed; logs in {state / 'logs'}")
                    times[transport].append(time.monotonic() - started)
                finally:
                    local_cluster.down(state)
                print(f"round {round_ + 1} {transport}: {times[transport][-1]:.1f} s", flush=True)
    print("\nSmolLM2-135M, l2 and random at 20 %, perplexity on raw wikipassages validation (16 x 128 tokens);"
          " local cluster on 127.0.0.1, 2 evaluators; wall time from submit to report, median of rounds\n")
    print("| transport | rounds | median s | each s |")
    print("|---|---|---|---|")
    for transport, seconds in times.items():
        print(f"| {transport} | {len(seconds)} | {statistics.median(seconds):.1f} | {', '.join(f'{s:.1f}' for s in seconds)} |")
    plain, tls = statistics.median(times["plaintext"]), statistics.median(times["mTLS"])
    print(f"\nmTLS overhead: {tls - plain:+.1f} s ({(tls / plain - 1) * 100:+.1f} %)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
