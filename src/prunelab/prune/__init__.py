"""Structured pruning with LLM-Pruner's criteria that removes exactly the share of
parameters asked for: `run_prune(model, PruneSettings(...))`."""

from prunelab.prune.job import PruneOutcome, run_prune
from prunelab.prune.pruner import BlockPruner, ChannelPruner, PruneReport, PruneSettings, prune_model

__all__ = ["BlockPruner", "ChannelPruner", "prune_model", "PruneOutcome", "PruneReport", "PruneSettings", "run_prune"]
