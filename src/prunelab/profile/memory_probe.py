"""The child process of `prunelab.profile.memory.measure_memory`:

    python -m prunelab.profile.memory_probe SPEC --seq-len T --batch-size B --dtype D --device DEV

prints the MemoryProfile of loading SPEC and one forward pass as one JSON line. A
module of its own, which the package does not import, so that `-m` runs it fresh.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from prunelab.errors import PrunelabError
from prunelab.profile.memory import measure_in_this_process


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="peak memory of loading SPEC and one forward pass")
    parser.add_argument("spec")
    parser.add_argument("--seq-len", type=int, required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--dtype", required=True)
    parser.add_argument("--device", required=True)
    args = parser.parse_args(argv)
    try:
        profile = measure_in_this_process(
            args.spec, seq_len=args.seq_len, batch_size=args.batch_size, dtype=args.dtype, device=args.device
        )
    except PrunelabError as error:
        print(error.reason, file=sys.stderr)
        return 1
    print(json.dumps(asdict(profile)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
