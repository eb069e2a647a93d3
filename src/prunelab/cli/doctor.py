"""`prunelab doctor`: what this machine (or container) offers prunelab: versions,
CUDA and each visible GPU with its free memory, the device jobs would run on
(PRUNELAB_DEVICE), and the artifact store (PRUNELAB_STORE) with whether it answers.
Exits non-zero, saying why, when that device cannot be used or the store does not
answer. Run it first on a new host, e.g. `docker compose run --rm pruner prunelab doctor`."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from typing import Any

import prunelab
from prunelab.config import Settings, settings
from prunelab.errors import PrunelabError

EXIT_OK, EXIT_PROBLEMS = 0, 1
GIB = 2**30


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("doctor", help="check this machine: versions, GPUs, the device and the store", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of lines")
    parser.set_defaults(handler=_doctor)


def _doctor(args: argparse.Namespace) -> int:
    findings = examine(settings())
    print(json.dumps(findings, indent=2) if args.json else _lines(findings))
    for problem in findings["problems"]:
        print(f"prunelab doctor: error: {problem}", file=sys.stderr)
    return EXIT_PROBLEMS if findings["problems"] else EXIT_OK


def examine(cfg: Settings) -> dict[str, Any]:
    """Everything `doctor` reports, as one JSON-ready document; `problems` lists what
    stops jobs from running here (empty when all is well)."""
    import torch
    import transformers

    device = _device(cfg, torch)
    store = _store(cfg)
    return {
        "versions": {
            "prunelab": prunelab.__version__, "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__,
        },
        "cuda": {
            "available": torch.cuda.is_available(),
            "built_for": torch.version.cuda,  # None: a CPU-only torch build
            "gpus": _gpus(torch) if torch.cuda.is_available() else [],
        },
        "device": device,
        "store": store,
        "hub": {"offline": cfg.offline, "hf_token_set": bool(os.environ.get("HF_TOKEN"))},
        "problems": [part["problem"] for part in (device, store) if part["problem"]],
    }


def _gpus(torch: Any) -> list[dict[str, Any]]:
    gpus = []
    for index in range(torch.cuda.device_count()):
        properties = torch.cuda.get_device_properties(index)
        free, total = torch.cuda.mem_get_info(index)
        gpus.append({"index": index, "name": properties.name, "capability": f"{properties.major}.{properties.minor}",
                     "free_bytes": free, "total_bytes": total})
    return gpus


def _device(cfg: Settings, torch: Any) -> dict[str, Any]:
    """The device settings() resolves to, and why it cannot be used, if it cannot."""
    name = cfg.torch_device()
    return {"configured": cfg.device, "resolved": name, "problem": _device_problem(name, cfg.device, torch)}


def _device_problem(name: str, configured: str, torch: Any) -> str | None:
    asked = f"PRUNELAB_DEVICE={configured!r}"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        return f"{asked} is not a device; use auto, cpu, cuda or cuda:N"
    if device.type == "cuda" and not torch.cuda.is_available():
        return f"{asked} asks for a GPU, but no CUDA GPU is visible here: {_why_no_gpu(torch)}"
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        return f"{asked} asks for GPU {device.index}, but {torch.cuda.device_count()} GPU(s) are visible (numbered from 0)"
    try:
        torch.ones(1, device=device).add_(1)  # a real allocation and kernel: catches a driver too old for this torch
    except (RuntimeError, AssertionError) as error:  # torch raises AssertionError for a backend it was built without
        return f"{asked}: {name} fails a first tensor operation: {error}"
    return None


def _why_no_gpu(torch: Any) -> str:
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build (install its CUDA build, see README, GPU hosts)"
    return (f"torch was built for CUDA {torch.version.cuda}; check the NVIDIA driver (nvidia-smi), the container's GPU "
            f"reservation (compose device_ids, Kubernetes nvidia.com/gpu) and CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES', '(unset)')}")


def _store(cfg: Settings) -> dict[str, Any]:
    """The store jobs would use, opened as they open it (for S3: one bucket check)."""
    from prunelab.store import open_store

    try:
        return {"location": open_store(cfg).location, "reachable": True, "problem": None}
    except PrunelabError as error:
        return {"location": cfg.store, "reachable": False, "problem": f"store {cfg.store}: {error.reason}"}


def _lines(findings: dict[str, Any]) -> str:
    versions, cuda, device, store, hub = (findings[key] for key in ("versions", "cuda", "device", "store", "hub"))
    lines = [", ".join(f"{name} {version}" for name, version in versions.items())]
    if cuda["available"]:
        lines.append(f"CUDA {cuda['built_for']}: {len(cuda['gpus'])} GPU(s) visible")
        lines += [f"  GPU {gpu['index']}: {gpu['name']} (compute {gpu['capability']}), "
                  f"{gpu['free_bytes'] / GIB:.1f} GiB free of {gpu['total_bytes'] / GIB:.1f} GiB" for gpu in cuda["gpus"]]
    else:
        lines.append("CUDA: no GPU visible" + ("" if cuda["built_for"] else " (CPU-only torch build)"))
    lines.append(f"device: {device['resolved']} (PRUNELAB_DEVICE={device['configured']}): "
                 + ("usable" if device["problem"] is None else "NOT usable"))
    lines.append(f"store: {store['location']}: " + ("reachable" if store["reachable"] else "NOT reachable"))
    lines.append(f"hub: {'offline' if hub['offline'] else 'online when reachable'}, HF_TOKEN {'set' if hub['hf_token_set'] else 'not set'}")
    return "\n".join(lines)
