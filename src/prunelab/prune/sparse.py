"""Sparsity: weights of the decoder's linear maps set to exact zeros, the
architecture unchanged (a stock config that plain transformers loads).

Methods, with W a linear map's weight (out, in) and x its calibration inputs:
  magnitude: |W|, compared across the whole matrix (the floor every paper reports).
  wanda:     |W| * ||x_j||_2 (Sun et al. 2023), compared within each output row.
  sparsegpt: OBS reconstruction (Frantar & Alistarh 2023): columns are pruned left
             to right in blocks of 128; the mask of a block is chosen by
             W^2 / [H^-1]_jj^2, and each pruned column's error is spread over the
             columns not yet visited through the inverse Hessian H = x^T x (1 %
             mean-diagonal damping, lazy batch updates between blocks). The weights
             are updated, not only masked. Comparison group: each block of the
             matrix, as the reference.
Patterns: unstructured, or N:M (N zeros in every group of M consecutive input
columns of each output row; 2:4 is what sparse tensor cores run).
Allocation: uniform (every layer at the asked sparsity) or owl (Yin et al. 2024):
a layer's sparsity falls with its share of outlier Wanda scores (above M times the
layer's mean), linearly over a range 2 * lambda wide, with mean s.

Calibration runs layer by layer (sequential.py). Unstructured counts are exact per
matrix: round(numel * sparsity) zeros (Wanda's rows differ by at most one zero). The
algorithms are written here because no maintained library applies them to
transformers models; the reference is locuslab/wanda (lib/prune.py, sparsegpt.py).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from prunelab.errors import InvalidArgument
from prunelab.models import LlamaFamilyAdapter
from prunelab.prune.sequential import LayerPass, layer_by_layer

SPARSE_METHODS = ("magnitude", "wanda", "sparsegpt")
SPARSE_ALLOCATIONS = ("uniform", "owl")
UNSTRUCTURED = "unstructured"
SPARSEGPT_BLOCK = 128  # columns per lazy-update block (the reference's)
SPARSEGPT_DAMPING = 0.01  # of the Hessian's mean diagonal (the reference's percdamp)
OWL_LAMBDA = 0.08  # the OWL reference's defaults (Lamda, Hyper_m)
OWL_M = 5.0

_N_OF_M = re.compile(r"(\d+):(\d+)")
_DECODER_LINEAR = re.compile(r".*\.layers\.\d+\.(self_attn|mlp)\.(q|k|v|o|gate|up|down)_proj\.weight")


@dataclass(frozen=True)
class Pattern:
    """Unstructured (zeros == group == 0) or N:M (`zeros` of every `group` columns)."""

    zeros: int = 0
    group: int = 0

    @classmethod
    def parse(cls, text: str) -> Pattern:
        text = text.strip()
        if text in ("", UNSTRUCTURED):
            return cls()
        match = _N_OF_M.fullmatch(text)
        if not match:
            raise InvalidArgument(f"pattern {text!r}: use unstructured or N:M (e.g. 2:4)", field="pattern")
        zeros, group = int(match[1]), int(match[2])
        if not 0 < zeros < group:
            raise InvalidArgument(f"pattern {text!r}: N:M needs 0 < N < M (N zeros in every M weights)", field="pattern")
        return cls(zeros, group)

    @property
    def unstructured(self) -> bool:
        return self.group == 0

    @property
    def sparsity(self) -> float:
        return self.zeros / self.group

    def __str__(self) -> str:
        return UNSTRUCTURED if self.unstructured else f"{self.zeros}:{self.group}"


# ---- masks (True = set to zero)


def lowest_mask(metric: torch.Tensor, count: int) -> torch.Tensor:
    """The `count` lowest entries of the whole tensor."""
    mask = torch.zeros(metric.numel(), dtype=torch.bool, device=metric.device)
    mask[metric.flatten().topk(count, largest=False).indices] = True
    return mask.view_as(metric)


def row_mask(metric: torch.Tensor, count: int) -> torch.Tensor:
    """`count` entries in all, the lowest of each row: every row loses count // rows,
    and the count % rows rows whose next-lowest entry is lowest lose one more."""
    rows = metric.shape[0]
    per_row, extra = divmod(count, rows)
    order = metric.argsort(dim=1)
    mask = torch.zeros_like(metric, dtype=torch.bool)
    mask.scatter_(1, order[:, :per_row], True)
    if extra:
        next_lowest = metric.gather(1, order[:, per_row : per_row + 1]).squeeze(1)
        chosen = next_lowest.topk(extra, largest=False).indices
        mask[chosen, order[chosen, per_row]] = True
    return mask


def group_mask(metric: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """N:M: the `pattern.zeros` lowest of every `pattern.group` consecutive columns."""
    rows, cols = metric.shape
    groups = metric.reshape(rows, cols // pattern.group, pattern.group)
    lowest = groups.topk(pattern.zeros, dim=-1, largest=False).indices
    return torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, lowest, True).reshape(rows, cols)


def zero_count(numel: int, sparsity: float) -> int:
    return round(numel * sparsity)


def magnitude_mask(weight: torch.Tensor, sparsity: float, pattern: Pattern) -> torch.Tensor:
    metric = weight.abs().float()
    return lowest_mask(metric, zero_count(metric.numel(), sparsity)) if pattern.unstructured else group_mask(metric, pattern)


def wanda_scores(weight: torch.Tensor, column_squares: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||x_j||: the weight times the norm of the input it multiplies."""
    return weight.abs().float() * column_squares.sqrt().unsqueeze(0)


def wanda_mask(weight: torch.Tensor, column_squares: torch.Tensor, sparsity: float, pattern: Pattern) -> torch.Tensor:
    metric = wanda_scores(weight, column_squares)
    return row_mask(metric, zero_count(metric.numel(), sparsity)) if pattern.unstructured else group_mask(metric, pattern)


@torch.no_grad()
def sparsegpt_weights(weight: torch.Tensor, gram: torch.Tensor, sparsity: float, pattern: Pattern,
                      block: int = SPARSEGPT_BLOCK, damping: float = SPARSEGPT_DAMPING) -> torch.Tensor:
    """SparseGPT's pruned and reconstructed weight (float32 math, `weight`'s dtype out)."""
    w = weight.float().clone()
    hessian = gram.float().clone()
    dead = torch.diagonal(hessian) == 0  # inputs that never fire: their weights cannot matter
    hessian[dead, dead] = 1
    w[:, dead] = 0
    hessian.diagonal().add_(damping * hessian.diagonal().mean())
    # Upper Cholesky factor of H^-1: row i is the OBS update of column i given that
    # columns < i are already fixed (SparseGPT's Lemma: no re-inversion per column).
    inverse = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hessian)), upper=True)
    if not pattern.unstructured:
        block = max(1, block // pattern.group) * pattern.group  # groups never straddle blocks
    columns = w.shape[1]
    for start in range(0, columns, block):
        end = min(start + block, columns)
        _prune_block(w, inverse, start, end, sparsity, pattern)
    return w.to(weight.dtype)


def _prune_block(w: torch.Tensor, inverse: torch.Tensor, start: int, end: int, sparsity: float, pattern: Pattern) -> None:
    """Prune columns [start, end) of `w` in place and push their error right."""
    block_w = w[:, start:end].clone()
    block_inv = inverse[start:end, start:end]
    diag = torch.diagonal(block_inv)
    errors = torch.zeros_like(block_w)
    mask = None
    if pattern.unstructured:
        scores = block_w.pow(2) / diag.pow(2).unsqueeze(0)
        mask = lowest_mask(scores, zero_count(scores.numel(), sparsity))
    else:
        mask = torch.zeros_like(block_w, dtype=torch.bool)
    for i in range(end - start):
        if not pattern.unstructured and i % pattern.group == 0:
            group = slice(i, i + pattern.group)
            scores = block_w[:, group].pow(2) / diag[group].pow(2).unsqueeze(0)
            mask[:, group] = group_mask(scores, pattern)
        column = block_w[:, i]
        kept = column.masked_fill(mask[:, i], 0.0)
        error = (column - kept) / block_inv[i, i]
        block_w[:, i:] -= error.unsqueeze(1) * block_inv[i, i:].unsqueeze(0)
        block_w[:, i] = kept  # exact zeros, whatever the update's rounding
        errors[:, i] = error
    w[:, start:end] = block_w
    w[:, end:] -= errors @ inverse[start:end, end:]


# ---- allocation


def outlier_ratio(scores: list[torch.Tensor], multiple: float = OWL_M) -> float:
    """Share of a layer's Wanda scores above `multiple` times their mean."""
    flat = torch.cat([s.flatten() for s in scores])
    return float((flat > flat.mean() * multiple).float().mean())


def owl_sparsities(ratios: list[float], target: float, spread: float = OWL_LAMBDA) -> list[float]:
    """Layer sparsities over a range 2 * `spread` wide (so within target +/- 2 * spread),
    mean `target`: the more outliers a layer has, the more of it is kept (OWL's rule)."""
    r = torch.tensor(ratios, dtype=torch.float64)
    width = r.max() - r.min()
    scaled = (r - r.min()) / width * 2 * spread if width > 0 else torch.zeros_like(r)
    density = scaled - scaled.mean() + (1 - target)
    return (1 - density).tolist()


# ---- the prune


def _no_progress(_index: int, _layers: int, _what: str) -> None:
    pass


@dataclass
class SparsePruner:
    """Sets `sparsity` of the decoder's linear weights to zero, in place."""

    model: nn.Module
    method: str
    sparsity: float
    pattern: Pattern
    allocation: str
    owl_spread: float = OWL_LAMBDA
    owl_multiple: float = OWL_M
    on_layer: Callable[[int, int, str], None] = _no_progress  # (index, layers, what): progress; a cancelled job stops there

    def __post_init__(self) -> None:
        self.adapter = LlamaFamilyAdapter(self.model)
        self.layer_sparsity = [self.sparsity] * self.adapter.num_layers

    @property
    def needs_calibration(self) -> bool:
        return self.method != "magnitude" or self.allocation == "owl"

    def check_shapes(self) -> None:
        """N:M groups must tile every linear map's inputs."""
        if self.pattern.unstructured:
            return
        for i in range(self.adapter.num_layers):
            for name, linear in self.adapter.linears(i).items():
                if linear.in_features % self.pattern.group:
                    raise InvalidArgument(
                        f"pattern {self.pattern}: layer {i} {name}_proj has {linear.in_features} inputs, "
                        f"not a multiple of {self.pattern.group}", field="pattern")

    def run(self, windows: torch.Tensor | None) -> list[float]:
        """Prune; returns each decoder layer's sparsity as asked of it."""
        self.check_shapes()
        if self.allocation == "owl":
            self.layer_sparsity = owl_sparsities(self._outlier_ratios(windows), self.sparsity, self.owl_spread)
        if self.method == "magnitude":
            for i in range(self.adapter.num_layers):
                self._prune_layer_by_magnitude(i)
        else:
            layer_by_layer(self.model, windows, self._prune_layer)
        return self.layer_sparsity

    def _outlier_ratios(self, windows: torch.Tensor) -> list[float]:
        """OWL's first pass: the dense model, layer by layer, nothing changed."""
        ratios = []

        def measure(index: int, _layer: nn.Module, layer_pass: LayerPass) -> None:
            linears = self.adapter.linears(index)
            stats = layer_pass.statistics(linears, gram=False)
            ratios.append(outlier_ratio([wanda_scores(m.weight, stats.of(n)) for n, m in linears.items()], self.owl_multiple))
            self.on_layer(index, self.adapter.num_layers, "outlier ratios")

        layer_by_layer(self.model, windows, measure)
        return ratios

    @torch.no_grad()
    def _prune_layer_by_magnitude(self, index: int) -> None:
        for linear in self.adapter.linears(index).values():
            linear.weight.masked_fill_(magnitude_mask(linear.weight, self.layer_sparsity[index], self.pattern), 0.0)
        self.on_layer(index, self.adapter.num_layers, self.method)

    @torch.no_grad()
    def _prune_layer(self, index: int, _layer: nn.Module, layer_pass: LayerPass) -> None:
        """All of a layer's statistics come from its unpruned self (as the reference),
        then each linear map is pruned and its statistics freed."""
        linears = self.adapter.linears(index)
        sparsity = self.layer_sparsity[index]
        stats = layer_pass.statistics(linears, gram=self.method == "sparsegpt")
        for name, linear in linears.items():
            if self.method == "wanda":
                linear.weight.masked_fill_(wanda_mask(linear.weight, stats.of(name), sparsity, self.pattern), 0.0)
            else:
                linear.weight.copy_(sparsegpt_weights(linear.weight, stats.of(name), sparsity, self.pattern))
            stats.release(name)
        self.on_layer(index, self.adapter.num_layers, self.method)


def linear_weight_counts(adapter: LlamaFamilyAdapter) -> tuple[list[int], list[int]]:
    """Per decoder layer: weights of its linear maps, and how many are exactly zero."""
    totals, zeros = [], []
    for i in range(adapter.num_layers):
        weights = [m.weight for m in adapter.linears(i).values()]
        totals.append(sum(w.numel() for w in weights))
        zeros.append(sum(int((w == 0).sum()) for w in weights))
    return totals, zeros


def saved_linear_zeros(checkpoint_dir: Path, pattern: Pattern) -> tuple[int, int, bool]:
    """(zeros, weights, every N:M group holds N zeros) of the decoder's linear weights
    as written in a checkpoint's safetensors files. A group holds more than N only
    where the unpruned model already had zeros (SmolLM2's Q4_1 weights: 0.03 %); at
    most M - N nonzeros per group is what N:M kernels need."""
    zeros = total = 0
    groups_hold = True
    for shard in sorted(Path(checkpoint_dir).glob("*.safetensors")):
        with safe_open(shard, framework="pt") as tensors:
            for name in tensors.keys():  # noqa: SIM118 (safe_open is not a dict)
                if not _DECODER_LINEAR.fullmatch(name):
                    continue
                is_zero = tensors.get_tensor(name) == 0
                zeros += int(is_zero.sum())
                total += is_zero.numel()
                if not pattern.unstructured:
                    per_group = is_zero.reshape(is_zero.shape[0], -1, pattern.group).sum(-1)
                    groups_hold &= bool((per_group >= pattern.zeros).all())
    return zeros, total, groups_hold


def check_saved_sparsity(checkpoint_dir: Path, record: dict) -> None:
    """The written weights say what the report says: a failed check is a bug here."""
    pattern = Pattern.parse(record["pattern"])
    zeros, total, groups_hold = saved_linear_zeros(checkpoint_dir, pattern)
    if total != record["linear_weights"] or abs(zeros / total - record["got"]) > 1e-12 or not groups_hold:
        raise AssertionError(f"{checkpoint_dir}: saved weights have {zeros}/{total} zeros"
                             f"{'' if groups_hold else ', N:M groups broken'}; the report says {record}")
