"""The profiler: what a model costs to keep and to run.

Static figures (`static`): parameters by part, MACs through ptflops checked against
the analytic formula, checkpoint bytes, and for sparse models the nonzero parameters
and the MACs a kernel skipping zero weights would do. Memory (`memory`): peak to load and run one
forward pass, measured in a child process. Latency (`latency`): prefill time and
decode tokens/s with the KV cache, several batch sizes, alternating with a baseline
in the same process (`profiler`). Report rows and Markdown (`report`); the gRPC
servicer (`service`).
"""

from prunelab.profile.latency import Spread
from prunelab.profile.memory import MemoryProfile
from prunelab.profile.options import ProfileOptions
from prunelab.profile.profiler import (
    BatchLatency,
    ModelProfile,
    ProfileReport,
    ProgressUpdate,
    RunEnvironment,
    Speedup,
    profile_models,
    run_profile,
)
from prunelab.profile.report import DENSE_KERNELS_NOTE, BatchRow, ProfileRow, is_sparse, render_markdown, report_rows
from prunelab.profile.static import MacBreakdown, ParamCounts, analytic_macs, count_parameters, nonzero_macs, ptflops_macs

__all__ = [
    "DENSE_KERNELS_NOTE",
    "BatchLatency",
    "BatchRow",
    "MacBreakdown",
    "MemoryProfile",
    "ModelProfile",
    "ParamCounts",
    "ProfileOptions",
    "ProfileReport",
    "ProfileRow",
    "ProgressUpdate",
    "RunEnvironment",
    "Speedup",
    "Spread",
    "analytic_macs",
    "count_parameters",
    "is_sparse",
    "nonzero_macs",
    "profile_models",
    "ptflops_macs",
    "render_markdown",
    "report_rows",
    "run_profile",
]
