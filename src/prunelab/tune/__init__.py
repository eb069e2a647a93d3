"""LoRA recovery of pruned checkpoints that never returns a worse model:
`run_tune(model, TuneSettings(data=...))`."""

from prunelab.tune.data import ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT
from prunelab.tune.job import TuneOutcome, TuneUpdate, check_tune_inputs, run_tune
from prunelab.tune.settings import PROJECTIONS, TuneSettings
from prunelab.tune.state import CurvePoint
from prunelab.tune.trainer import TrainingProgress

__all__ = [
    "ALPACA_PROMPT",
    "ALPACA_PROMPT_NO_INPUT",
    "PROJECTIONS",
    "CurvePoint",
    "TrainingProgress",
    "TuneOutcome",
    "TuneSettings",
    "TuneUpdate",
    "check_tune_inputs",
    "run_tune",
]
