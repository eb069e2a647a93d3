"""Pruning of Llama-family models: what to remove, removing it, and the report
that says exactly what was asked and what was got.

Structured (LLM-Pruner's criteria), block mode (LLM-Pruner's block-wise): whole KV
groups of attention and MLP channels inside the chosen layer ranges. Channel mode
(LLM-Pruner's channel-wise): channels of the residual stream, in every layer at
once. Sparse (magnitude, Wanda, SparseGPT; sparse.py): weights of every decoder
layer's linear maps set to zero, the architecture unchanged.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from prunelab.errors import InvalidArgument
from prunelab.limits import check_limit
from prunelab.models import LlamaFamilyAdapter
from prunelab.prune.calibration import calibration_windows, taylor_group_scores
from prunelab.prune.importance import CRITERIA, Criterion, Slice, attention_slices, group_scores, mlp_slices
from prunelab.prune.layers import DEFAULT_LAYERS, parse_layer_range
from prunelab.prune.sparse import (
    OWL_LAMBDA,
    OWL_M,
    SPARSE_ALLOCATIONS,
    SPARSE_METHODS,
    Pattern,
    SparsePruner,
    linear_weight_counts,
)
from prunelab.prune.structured import (
    ACTIVATION_CRITERIA,
    activation_scores,
    adaptive_plan,
    bias_params_to_add,
    prune_sequentially,
    unit_scores,
)
from prunelab.prune.targets import (
    SEMANTICS,
    TOLERANCE,
    LayerShape,
    RemovalPlan,
    check_ratio,
    layer_ratio_plan,
    mlp_first_plan,
    params_ratio_plan,
    spare_layers,
)

log = logging.getLogger(__name__)

MODES = ("block", "channel", "depth")
ALLOCATIONS = ("uniform", "mlp-first", "global", "adaptive")
# mlp-first: uniform widths, MLP channels only while that removes at most this share
# of each MLP; beyond it the fewest KV groups per layer that keep the MLP under it;
# beyond that the uniform split. Measured on SmolLM2 (flap, refit, 128 x 128
# wikipassages train): at 20 % of the model MLP-only beats the split (raw
# wikipassages validation, 64 windows of 128: 41.8 vs 48.0; its held-out second half
# 53.3 vs 61.8). At 50 %, on bench/spare.py's dev text (rows of wikipassages train the
# calibration never reads; 128 windows of 128) with the first two and the last layer
# spared to half: one KV group of three per layer (cap 0.75, 155.0) beats MLP only
# (cap 0.9, 186.2) and two groups (cap 0.6, 228.0).
MLP_FIRST_CAP = 0.75
# mlp-first spares the first layers, as LLM-Pruner's 4:-2 does, but only in part: the
# first SPARED_FIRST and last SPARED_LAST layers lose at most SPARED_MLP_SHARE of
# their MLP channels, and the other layers take the rest. Chosen with bench/spare.py
# (dev text as above) by the lowest geometric mean of dev perplexity at 20, 28.9 and
# 50 %: first 2, last 0, at most 15 % of their channels: 44.4, 59.0, 144.8 (no
# sparing: 46.0, 63.7, 153.6; first 1 at 25 %: 45.3, 59.4, 144.7). At 50 % alone:
# sparing the last layer too costs 1-5 % (2, 1 at 50 %: 155.0 against 153.6 without
# it); the first two at 0 %, 5 %, 15 %, 25 %, 35 %: 147.8, 146.4, 144.8, 145.8, 148.1.
SPARED_FIRST, SPARED_LAST, SPARED_MLP_SHARE = 2, 0, 0.15
UNIFORM_WIDTHS = ("uniform", "mlp-first")  # allocations decided before any scores
DEPTH_CRITERIA = ("block-influence", "angular", "last")
CORRECTIONS = ("refit", "bias", "none")
STRUCTURED_METHODS = CRITERIA + ACTIVATION_CRITERIA
METHODS = STRUCTURED_METHODS + SPARSE_METHODS
SPARSITY = "sparsity"  # the sparse methods' semantics: share of the decoder's linear weights set to zero

Progress = Callable[[str, float, str], None]  # (phase, fraction of the whole job, message)


def no_progress(_phase: str, _fraction: float, _message: str) -> None:
    pass


# What a method does with the settings left unset: its recipe. LLM-Pruner's criteria
# spare the first 4 and last 2 layers and calibrate on 10 x 64 tokens (prunelab adds
# its refit); the sparse methods read only the calibration fields.
_LLM_PRUNER = {"allocation": "uniform", "attn_layers": DEFAULT_LAYERS, "mlp_layers": DEFAULT_LAYERS,
               "calibration": "wikitext2", "samples": 10, "seq_len": 64, "correction": "refit",
               "correction_samples": 10, "correction_seq_len": 64}
# FLAP's: every layer, allocation across layers, bias compensation; calibration at
# FLAP's window length (128 tokens), 128 windows rather than its 1024 (CPU time).
_FLAP = {"allocation": "adaptive", "attn_layers": "0:", "mlp_layers": "0:", "calibration": "wikitext2",
         "samples": 128, "seq_len": 128, "correction": "bias", "correction_samples": 128, "correction_seq_len": 128}
RECIPES: dict[str, dict] = {
    **{method: _LLM_PRUNER for method in CRITERIA + SPARSE_METHODS},
    **{method: _FLAP for method in ACTIVATION_CRITERIA},
}
# No method named: prunelab's best structured configuration, chosen by measurement
# (README, Benchmarks): flap's scores on the pruned model's own activations, the
# mlp-first allocation, and the layer-by-layer refit, calibrated on raw Wikipedia text.
BEST = {**_FLAP, "method": "flap", "allocation": "mlp-first", "correction": "refit", "calibration": "wikipassages"}
BEST_CALIBRATION_SPLIT = "train"
# Bumped whenever the same settings start to give a different model (a new plan
# rule, a changed default inside a recipe): a study's prune jobs hash it, so a
# state directory never reuses a model an older pruner made. 2: mlp-first takes KV
# groups above 3/4 of each MLP and spares the ends of the stack. 3: it spares the
# first two layers to 15 % of their MLP channels, and not the last.
PRUNER_VERSION = 3
# Depth pruning names no method (--depth-criterion chooses the layers); its one
# calibration pass reads the same raw text as BEST, at the same size.
_DEPTH = {"calibration": BEST["calibration"], "samples": BEST["samples"], "seq_len": BEST["seq_len"]}


@dataclass(frozen=True)
class PruneSettings:
    """Everything that decides the pruned model, apart from the model itself. Fields
    left unset ("", 0, None) take the method's recipe (RECIPES); no method at all
    means prunelab's best configuration (BEST)."""

    ratio: float  # structured: share of parameters to remove (see semantics); sparse: sparsity
    method: str = ""
    variant: str = "element1"
    aggregation: str = "sum"
    semantics: str = ""  # "" = params_ratio for structured methods, sparsity for sparse ones
    mode: str = "block"
    allocation: str = ""
    attn_layers: str | None = None
    mlp_layers: str | None = None
    calibration: str = ""
    samples: int = 0
    seq_len: int = 0
    seed: int = 0
    # How o_proj/down_proj make up for the inputs they lose (correction.py): "refit"
    # (least squares on the calibration activations), "bias" (FLAP's bias
    # compensation) or "none". True/False mean refit/none.
    correction: str = ""
    correction_samples: int = 0  # windows the refit sees; 0 = the method's default
    correction_seq_len: int = 0  # their tokens; 0 = the method's default
    depth_criterion: str = "block-influence"  # mode depth: which layers go
    pattern: str = ""  # sparse methods: unstructured ("" too) or N:M
    owl_lambda: float = OWL_LAMBDA
    owl_m: float = OWL_M

    def __post_init__(self) -> None:
        if isinstance(self.correction, bool):
            object.__setattr__(self, "correction", "refit" if self.correction else "none")
        if not self.method and self.mode == "channel":  # the best configuration is a block one; channel: LLM-Pruner's
            object.__setattr__(self, "method", "taylor")
        recipe = RECIPES.get(self.method, {}) if self.method else _DEPTH if self.mode == "depth" else BEST
        for name, value in recipe.items():
            if getattr(self, name) in ("", 0, None):
                object.__setattr__(self, name, value)
        if not self.semantics:
            object.__setattr__(self, "semantics", SPARSITY if self.sparse else "params_ratio")

    @property
    def label(self) -> str:
        """The method as provenance and the store name it; depth pruning names its criterion."""
        return self.method or f"depth:{self.depth_criterion}"

    @property
    def sparse(self) -> bool:
        return self.method in SPARSE_METHODS

    def validate(self) -> None:
        if self.sparse:
            Pattern.parse(self.pattern)  # before the ratio: a 4:4 pattern would ask for sparsity 1
        check_ratio(self.ratio)
        if self.mode == "depth":
            self._validate_depth()
        elif self.method not in METHODS:
            raise InvalidArgument(
                f"unknown method {self.method!r}; choose one of {', '.join(STRUCTURED_METHODS)} (structured) "
                f"or {', '.join(SPARSE_METHODS)} (sparse)", field="method")
        if self.sparse:
            self._validate_sparse()
        elif self.mode != "depth":
            self._validate_structured()
        for name in ("samples", "seq_len"):
            if getattr(self, name) < 1:
                raise InvalidArgument(f"{name} must be at least 1, got {getattr(self, name)}", field=name)
        for name in ("correction_samples", "correction_seq_len"):
            if getattr(self, name) < 0:
                raise InvalidArgument(f"{name} must be 0 (the default) or positive, got {getattr(self, name)}", field=name)
        for name, kind in (("samples", "samples"), ("seq_len", "seq_len"), ("correction_samples", "samples"), ("correction_seq_len", "seq_len")):
            check_limit(kind, getattr(self, name), name)

    def _validate_structured(self) -> None:
        if self.method in CRITERIA:
            _ = self.criterion  # building it raises on an unknown variant or aggregation
        for name, value, allowed in (
            ("semantics", self.semantics, SEMANTICS),
            ("mode", self.mode, MODES),
            ("allocation", self.allocation, ALLOCATIONS),
            ("correction", self.correction, CORRECTIONS),
        ):
            if value not in allowed:
                raise InvalidArgument(f"unknown {name} {value!r}; choose one of {', '.join(allowed)}", field=name)
        if self.pattern:
            raise InvalidArgument(f"pattern applies to the sparse methods ({', '.join(SPARSE_METHODS)}); "
                                  f"{self.method} removes whole heads and channels", field="pattern")
        if self.mode == "channel" and self.method not in CRITERIA:
            raise InvalidArgument(f"mode channel scores hidden channels by weights or gradients ({', '.join(CRITERIA)}); "
                                  f"{self.method} scores o_proj/down_proj inputs: use mode block", field="mode")

    def _validate_depth(self) -> None:
        # Whole layers go, so only the whole model's share is meaningful; allocation,
        # layer ranges and correction do not apply and are ignored.
        if self.method:
            raise InvalidArgument(f"mode depth removes the layers --depth-criterion chooses; method {self.method!r} "
                                  f"does not apply (leave it unset)", field="method")
        if self.depth_criterion not in DEPTH_CRITERIA:
            raise InvalidArgument(f"unknown depth_criterion {self.depth_criterion!r}; choose one of "
                                  f"{', '.join(DEPTH_CRITERIA)}", field="depth_criterion")
        if self.semantics != "params_ratio":
            raise InvalidArgument(f"mode depth removes whole layers: its ratio is the share of the whole model's "
                                  f"parameters (semantics params_ratio), not {self.semantics}", field="semantics")

    def _validate_sparse(self) -> None:
        pattern = Pattern.parse(self.pattern)
        if self.semantics != SPARSITY:
            raise InvalidArgument(f"{self.method} sets weights to zero: its ratio is the sparsity of the decoder's "
                                  f"linear weights (semantics {SPARSITY}), not {self.semantics}", field="semantics")
        if self.mode != "block":
            raise InvalidArgument(f"mode {self.mode!r} is structured; {self.method} zeroes weights in every layer", field="mode")
        if self.allocation not in SPARSE_ALLOCATIONS:
            raise InvalidArgument(f"allocation {self.allocation!r} is not one of {self.method}'s: "
                                  f"{', '.join(SPARSE_ALLOCATIONS)}", field="allocation")
        if not pattern.unstructured and abs(self.ratio - pattern.sparsity) > 1e-9:
            raise InvalidArgument(f"pattern {pattern} sets {pattern.sparsity:.4g} of the weights to zero, "
                                  f"but ratio (sparsity) {self.ratio:.4g} was asked", field="ratio")
        if self.allocation == "owl":
            self._validate_owl(pattern)

    def _validate_owl(self, pattern: Pattern) -> None:
        if not pattern.unstructured:
            raise InvalidArgument(f"owl varies the sparsity per layer; pattern {pattern} fixes it at {pattern.sparsity:.4g}",
                                  field="allocation")
        if not 0 < self.owl_lambda < 0.5 or self.owl_m <= 0:
            raise InvalidArgument(f"owl needs 0 < owl_lambda < 0.5 and owl_m > 0, got {self.owl_lambda} and {self.owl_m}",
                                  field="owl_lambda")
        reach = 2 * self.owl_lambda  # a layer's sparsity may differ from the mean by this much
        if not reach < self.ratio < 1 - reach:
            raise InvalidArgument(f"owl with owl_lambda {self.owl_lambda} moves a layer's sparsity up to {reach:g} from the "
                                  f"mean: the sparsity must be in ({reach:g}, {1 - reach:g}), got {self.ratio}", field="ratio")

    @property
    def criterion(self) -> Criterion:
        return Criterion(self.method, self.variant, self.aggregation)

    @property
    def needs_calibration_text(self) -> bool:
        if self.sparse:
            return self.method != "magnitude" or self.allocation == "owl"
        if self.mode == "depth":
            return self.depth_criterion != "last"
        if self.method in ACTIVATION_CRITERIA:
            return True
        return self.criterion.needs_gradients or (self.correction != "none" and self.mode == "block")


@dataclass
class PruneReport:
    ratio_asked: float
    semantics: str
    ratio_got: float
    params_before: int
    params_after: int
    layer_widths: list[dict[str, int]]
    kept: dict[str, dict[str, list[int]]]  # layer -> {"kv_groups": [...], "mlp_channels": [...]} or {"hidden": [...]}
    timings_s: dict[str, float] = field(default_factory=dict)
    nonzero_params: int = 0  # counted on the pruned weights, whole model
    sparsity: dict | None = None  # sparse methods: pattern, asked, got, allocation, per-layer sparsity, ...

    def as_dict(self) -> dict:
        return asdict(self)


def layer_shapes(adapter: LlamaFamilyAdapter) -> list[LayerShape]:
    """Prunable widths per layer and what one unit of each costs in parameters."""
    shapes = []
    for i, widths in enumerate(adapter.layer_widths()):
        proj = adapter.projections(i)
        group_params = sum(
            p.numel() for m in (proj.q, proj.k, proj.v, proj.o) for p in m.parameters()
        ) // widths.num_key_value_heads
        channel_params = sum(p.numel() for m in (proj.gate, proj.up, proj.down) for p in m.parameters()) // widths.intermediate_size
        shapes.append(LayerShape(widths.num_key_value_heads, group_params, widths.intermediate_size, channel_params))
    return shapes


def prune_model(model, tokenizer, settings: PruneSettings, calibration_text: str, progress: Progress = no_progress) -> PruneReport:
    """Prune `model` in place as `settings` say (sparse, or block or channel mode)."""
    if settings.sparse:
        pruner = SparseJob
    elif settings.mode == "depth":
        from prunelab.prune.depth import DepthJob  # here: depth.py imports this module

        pruner = DepthJob
    else:
        pruner = ChannelPruner if settings.mode == "channel" else BlockPruner
    return pruner(model, tokenizer, settings, calibration_text, progress).run()


class _Pruner:
    """What block and channel pruning share: the model, its adapter, the seeded
    generator (random importance) and phase timings."""

    def __init__(self, model, tokenizer, settings: PruneSettings, calibration_text: str, progress: Progress = no_progress):
        settings.validate()
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings
        self.text = calibration_text
        self.progress = progress
        self.adapter = LlamaFamilyAdapter(model)
        self.generator = torch.Generator().manual_seed(settings.seed)
        self.timings: dict[str, float] = {}

    def _timed(self, phase: str, fn, *args):
        start = time.perf_counter()
        result = fn(*args)
        self.timings[phase] = round(time.perf_counter() - start, 3)
        return result


class BlockPruner(_Pruner):
    """Block-wise pruning of one loaded model, in place: score the KV groups and MLP
    channels, plan how many go per layer, then remove them layer by layer with the
    correction (structured.py)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        n = self.adapter.num_layers
        self.attn_layers = parse_layer_range(self.settings.attn_layers, n, "attn_layers")
        self.mlp_layers = parse_layer_range(self.settings.mlp_layers, n, "mlp_layers")

    def run(self) -> PruneReport:
        s = self.settings
        params_before = self.adapter.num_parameters()
        shapes = layer_shapes(self.adapter)
        plan = self._plan(shapes, params_before)  # fails fast, before any heavy work
        scores = self._timed("importance", self._importance)
        if s.allocation == "global":
            plan = global_plan(scores, shapes, plan.removed_params(shapes), self.attn_layers, self.mlp_layers)
        elif s.allocation == "adaptive":
            plan = adaptive_plan(scores, shapes, plan.removed_params(shapes))
        kept = self._timed("prune", self._remove, plan, scores)
        params_after = self.adapter.num_parameters()
        ratio_got = 1 - params_after / params_before
        if s.semantics == "params_ratio" and abs(ratio_got - s.ratio) > TOLERANCE + 1e-9:
            raise AssertionError(f"planned {s.ratio} but removed {ratio_got}: plan arithmetic is wrong")
        return PruneReport(
            ratio_asked=s.ratio,
            semantics=s.semantics,
            ratio_got=ratio_got,
            params_before=params_before,
            params_after=params_after,
            layer_widths=[w.as_dict() for w in self.adapter.layer_widths()],
            kept={str(i): k for i, k in kept.items()},
            timings_s=self.timings,
            nonzero_params=self.adapter.num_nonzero_parameters(),
        )

    def _plan(self, shapes: list[LayerShape], params_before: int) -> RemovalPlan:
        s = self.settings
        if s.semantics == "layer_ratio":
            return layer_ratio_plan(shapes, self.attn_layers, self.mlp_layers, s.ratio, self.adapter.head_dim)
        plan = self._params_plan(shapes, s.ratio, params_before)
        if s.correction != "bias":
            return plan
        # The biases the compensation adds are parameters too: remove as many more.
        added = bias_params_to_add(self.adapter, any(plan.kv_groups), any(plan.mlp_channels))
        return self._params_plan(shapes, s.ratio + added / params_before, params_before)

    def _params_plan(self, shapes: list[LayerShape], ratio: float, params_before: int) -> RemovalPlan:
        if self.settings.allocation == "mlp-first":
            plan = mlp_first_plan(shapes, self.attn_layers, self.mlp_layers, ratio, params_before, MLP_FIRST_CAP)
            if plan is not None:
                return spare_layers(plan, shapes, self._end_layers(), SPARED_MLP_SHARE)
        return params_ratio_plan(shapes, self.attn_layers, self.mlp_layers, ratio, params_before)

    def _end_layers(self) -> set[int]:
        n = self.adapter.num_layers
        return {i for i in (*range(SPARED_FIRST), *range(n - SPARED_LAST, n)) if i in self.mlp_layers}

    def _block_slices(self) -> dict[tuple[int, str], list[Slice]]:
        widths = self.adapter.layer_widths()
        slices = {}
        for i in self.attn_layers:
            block = self.adapter.layers[i].self_attn
            per_group = widths[i].num_attention_heads // widths[i].num_key_value_heads
            slices[(i, "kv_groups")] = attention_slices(block, self.adapter.head_dim, per_group)
        for i in self.mlp_layers:
            slices[(i, "mlp_channels")] = mlp_slices(self.adapter.layers[i].mlp)
        return slices

    def _importance(self) -> dict[tuple[int, str], torch.Tensor]:
        """Scores per block of the unpruned model. Activation criteria need them only to
        allocate across layers; with a uniform plan they score on the pruned model's
        inputs during removal instead."""
        s = self.settings
        slices = self._block_slices()
        by_activation = s.method in ACTIVATION_CRITERIA
        if by_activation and s.allocation in UNIFORM_WIDTHS:
            return {}
        windows = self._windows(s.samples, s.seq_len, 0.05) if by_activation or s.criterion.needs_gradients else None
        self.progress("importance", 0.1, f"scoring {len(slices)} blocks by {s.method}")
        if by_activation:
            return activation_scores(self.model, windows, s.method, list(slices))
        if s.criterion.needs_gradients:
            return taylor_group_scores(self.model, slices, windows, s.criterion)
        widths = self.adapter.layer_widths()
        return {
            (i, kind): group_scores(group, s.criterion, widths[i].num_key_value_heads if kind == "kv_groups"
                                    else widths[i].intermediate_size, self.generator)
            for (i, kind), group in slices.items()
        }

    def _windows(self, samples: int, seq_len: int, fraction: float) -> torch.Tensor:
        self.progress("calibrate", fraction, f"{samples} windows of {seq_len} tokens from {self.settings.calibration}")
        return calibration_windows(self.tokenizer, self.text, samples, seq_len, self.settings.seed).to(self.model.device)

    def _remove(self, plan: RemovalPlan, scores: dict[tuple[int, str], torch.Tensor]) -> dict[int, dict[str, list[int]]]:
        """Remove the planned units. Layer by layer on the correction windows when the
        correction or an activation criterion needs the pruned model's activations;
        else straight from the scores."""
        s = self.settings
        by_activation = s.method in ACTIVATION_CRITERIA
        if s.correction == "none" and not by_activation:
            self.progress("prune", 0.6, "removing groups and channels")
            kept = choose_kept(scores, plan, layer_shapes(self.adapter))
            for i, k in kept.items():
                if "kv_groups" in k:
                    self.adapter.keep_kv_groups(i, k["kv_groups"])
                if "mlp_channels" in k:
                    self.adapter.keep_mlp_channels(i, k["mlp_channels"])
            return kept

        def score(key, weight, stats, name, span):
            return unit_scores(s.method, weight, stats, name, span) if by_activation else scores[key]

        def layer_done(index: int, layers: int) -> None:
            self.progress("prune", 0.3 + 0.55 * (index + 1) / layers, f"{s.correction} correction: layer {index + 1}/{layers}")

        windows = self._windows(s.correction_samples, s.correction_seq_len, 0.3)
        return prune_sequentially(self.model, windows, plan, score, s.correction, layer_done)


def choose_kept(scores: dict[tuple[int, str], torch.Tensor], plan: RemovalPlan, shapes: list[LayerShape]) -> dict[int, dict[str, list[int]]]:
    """The highest-scoring units survive; indices sorted so weights keep their order."""
    kept: dict[int, dict[str, list[int]]] = {}
    for (i, kind), score in scores.items():
        width = shapes[i].kv_groups if kind == "kv_groups" else shapes[i].mlp_channels
        remove = plan.kv_groups[i] if kind == "kv_groups" else plan.mlp_channels[i]
        if remove == 0:
            continue
        keep = torch.topk(score, width - remove).indices.sort().values
        kept.setdefault(i, {})[kind] = keep.tolist()
    return kept


def global_plan(scores: dict[tuple[int, str], torch.Tensor], shapes: list[LayerShape], target: int,
                attn_layers: range, mlp_layers: range) -> RemovalPlan:
    """Rank every unit of every allowed layer together by importance per parameter and
    remove the least important until `target` parameters are gone; each layer keeps
    at least one KV group and one channel."""
    units = []  # (score per parameter, layer, kind, parameters)
    for (i, kind), score in scores.items():
        params = shapes[i].group_params if kind == "kv_groups" else shapes[i].channel_params
        units += [(float(v) / params, i, kind, params) for v in score]
    units.sort(key=lambda u: u[0])
    groups = [0] * len(shapes)
    channels = [0] * len(shapes)
    removed = 0
    for _, i, kind, params in units:
        if removed + params > target:
            continue
        count, width = (groups, shapes[i].kv_groups) if kind == "kv_groups" else (channels, shapes[i].mlp_channels)
        if count[i] + 1 < width:
            count[i] += 1
            removed += params
    return RemovalPlan(groups, channels)


class ChannelPruner(_Pruner):
    """Channel-wise pruning (LLM-Pruner's --channel_wise): channels of the residual
    stream, removed from the embeddings, every layer and the head at once. Layer
    ranges do not apply, and there is no least-squares correction: every projection
    loses inputs or outputs at once, so there is no unpruned output to refit to."""

    def run(self) -> PruneReport:
        s = self.settings
        params_before = self.adapter.num_parameters()
        slices = self._hidden_slices()
        per_channel = sum(sl.param.numel() for sl in slices) // self.adapter.hidden_size
        removed = self._channels_to_remove(per_channel, params_before)
        scores = self._timed("importance", self._scores, slices)
        keep = torch.topk(scores, self.adapter.hidden_size - removed).indices.sort().values
        self._timed("prune", self.adapter.keep_hidden_channels, keep.tolist())
        params_after = self.adapter.num_parameters()
        return PruneReport(
            ratio_asked=s.ratio, semantics=s.semantics, ratio_got=1 - params_after / params_before,
            params_before=params_before, params_after=params_after,
            layer_widths=[w.as_dict() for w in self.adapter.layer_widths()],
            kept={"hidden": {"channels": keep.tolist()}}, timings_s=self.timings,
            nonzero_params=self.adapter.num_nonzero_parameters(),
        )

    def _channels_to_remove(self, per_channel: int, params_before: int) -> int:
        s = self.settings
        hidden = self.adapter.hidden_size
        if s.semantics == "layer_ratio":
            return hidden - int(hidden * (1 - s.ratio))
        removed = min(round(s.ratio * params_before / per_channel), hidden - 1)
        if abs(removed * per_channel / params_before - s.ratio) > TOLERANCE:
            raise InvalidArgument(
                f"ratio {s.ratio:.4f} cannot be reached by removing hidden channels: the largest reachable is "
                f"{(hidden - 1) * per_channel / params_before:.4f}", field="ratio",
            )
        return removed

    def _hidden_slices(self) -> list[Slice]:
        """Every parameter with a hidden-size axis, embeddings first (the root)."""
        model = self.model
        slices = [Slice(model.get_input_embeddings().weight, 1, 1)]
        for i, layer in enumerate(self.adapter.layers):
            proj = self.adapter.projections(i)
            slices += [Slice(m.weight, 1, 1) for m in (proj.q, proj.k, proj.v, proj.gate, proj.up)]
            slices += [Slice(m.weight, 0, 1) for m in (proj.o, proj.down)]
            slices += [Slice(layer.input_layernorm.weight, 0, 1), Slice(layer.post_attention_layernorm.weight, 0, 1)]
        slices.append(Slice(self.adapter.decoder.norm.weight, 0, 1))
        if not self.adapter.tied_embeddings:
            slices.append(Slice(model.get_output_embeddings().weight, 1, 1))
        return slices

    def _scores(self, slices: list[Slice]) -> torch.Tensor:
        s = self.settings
        self.progress("importance", 0.5, f"scoring {self.adapter.hidden_size} hidden channels by {s.method}")
        if not s.criterion.needs_gradients:
            return group_scores(slices, s.criterion, self.adapter.hidden_size, self.generator)
        windows = calibration_windows(self.tokenizer, self.text, s.samples, s.seq_len, s.seed).to(self.model.device)
        return taylor_group_scores(self.model, {"hidden": slices}, windows, s.criterion)["hidden"]


class SparseJob(_Pruner):
    """Magnitude, Wanda or SparseGPT on every decoder layer (sparse.py); the report's
    ratio is the share of the decoder's linear weights that are zero."""

    def run(self) -> PruneReport:
        s = self.settings
        params_before = self.adapter.num_parameters()
        pattern = Pattern.parse(s.pattern)
        pruner = SparsePruner(self.model, s.method, s.ratio, pattern, s.allocation, s.owl_lambda, s.owl_m,
                              on_layer=self._layer_done)
        pruner.check_shapes()  # fails fast, before any heavy work
        windows = None
        if pruner.needs_calibration:
            self.progress("calibrate", 0.05, f"{s.samples} windows of {s.seq_len} tokens from {s.calibration}")
            windows = calibration_windows(self.tokenizer, self.text, s.samples, s.seq_len, s.seed)
        asked = self._timed("prune", pruner.run, windows)
        totals, zeros = linear_weight_counts(self.adapter)
        got = sum(zeros) / sum(totals)
        if pattern.unstructured and abs(got - s.ratio) > 0.001:
            raise AssertionError(f"asked sparsity {s.ratio} but got {got}: mask arithmetic is wrong")
        nonzero = self.adapter.num_nonzero_parameters()
        return PruneReport(
            ratio_asked=s.ratio, semantics=SPARSITY, ratio_got=got, params_before=params_before,
            params_after=self.adapter.num_parameters(),
            layer_widths=[w.as_dict() for w in self.adapter.layer_widths()], kept={}, timings_s=self.timings,
            nonzero_params=nonzero,
            sparsity={
                "pattern": str(pattern), "asked": s.ratio, "got": got, "allocation": s.allocation,
                "layers": [z / t for z, t in zip(zeros, totals, strict=True)], "layers_asked": asked,
                "linear_weights": sum(totals), "nonzero_params": nonzero,
            },
        )

    def _layer_done(self, index: int, layers: int, what: str) -> None:
        self.progress("prune", 0.1 + 0.75 * (index + 1) / layers, f"{what}: layer {index + 1}/{layers}")
