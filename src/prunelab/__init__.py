"""prunelab: prune large language models and measure what pruning costs and buys."""

__version__ = "0.1.0"
