"""The report's figures (matplotlib, Agg backend: no display needed): perplexity and
average accuracy against the nonzero parameters actually kept (for a structured model
its parameters; a sparse one keeps every dense parameter, so only its nonzero count
places it next to the structured ones), one line per method, sparsity pattern and
pruning scheme, and the tuning runs' curves."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: the orchestrator has no display

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter  # noqa: E402

from prunelab.orchestrate.results import ModelResults  # noqa: E402

DPI = 120


def draw_plots(models: list[ModelResults], ppl_keys: list[tuple[str, int]], tasks: list[str], folder: Path) -> list[str]:
    """Write the figures that have data into `folder`; their file names."""
    written = []
    if ppl_keys and _quality_figure(models, ppl_keys, lambda m, key: m.perplexity[key].ppl if key in m.perplexity else None,
                                    [f"perplexity, {corpus} @ {seq_len}" for corpus, seq_len in ppl_keys], "perplexity (log)",
                                    folder / "ppl_vs_params.png", log_y=True):
        written.append("ppl_vs_params.png")
    if tasks and _quality_figure(models, [None], lambda m, _: m.average_accuracy(tasks),
                                 [f"average accuracy over {', '.join(tasks)}"], "mean acc", folder / "accuracy_vs_params.png"):
        written.append("accuracy_vs_params.png")
    if _tuning_figure(models, folder / "tuning_curves.png"):
        written.append("tuning_curves.png")
    return written


def _quality_figure(models, keys, value_of, titles, y_label, path: Path, log_y: bool = False) -> bool:
    figure, axes = plt.subplots(1, len(keys), figsize=(6 * len(keys), 4.5), squeeze=False)
    drew = False
    for axis, key, title in zip(axes[0], keys, titles, strict=True):
        drew |= _quality_axis(axis, models, lambda m, key=key: value_of(m, key))
        axis.set_title(title)
        axis.set_xlabel("nonzero parameters kept (% of the base model)")
        axis.set_ylabel(y_label)
        if log_y:
            _plain_log_scale(axis)
        axis.grid(True, alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=8)
    if drew:
        figure.tight_layout()
        figure.savefig(path, dpi=DPI)
    plt.close(figure)
    return drew


def _plain_log_scale(axis) -> None:
    """Log scale labelled 40, 100, 1000 rather than 4x10^1; the minor ticks labelled
    too when the data spans less than a decade (else they would collide)."""
    axis.set_yscale("log")
    plain = FuncFormatter(lambda value, _: f"{value:g}")
    axis.yaxis.set_major_formatter(plain)
    low, high = axis.get_ylim()
    axis.yaxis.set_minor_formatter(plain if high / low < 10 else NullFormatter())


def _quality_axis(axis, models: list[ModelResults], value_of) -> bool:
    """One line per method (and scheme, when the study has several) from the base
    model's point down; tuned models as their own dashed line; the base model as a star."""
    base = next(((m.nonzero_kept * 100, value_of(m)) for m in models if m.role == "base" and value_of(m) is not None), None)
    show_scheme = len({m.scheme for m in models if m.role != "base"}) > 1
    show_variant = len({m.facts["variant"] for m in models if m.role != "base" and m.facts["variant"]}) > 1
    lines: dict[str, list[tuple[float, float]]] = defaultdict(list)
    tuned_lines: set[str] = set()
    for model in models:
        value, kept = value_of(model), model.nonzero_kept
        if model.role == "base" or value is None or kept is None:
            continue
        name = model.facts["method"] + (f"-{model.facts['variant']}" if show_variant and model.facts["variant"] else "")
        name += f" {model.pattern}" if model.pattern else ""
        name += f" ({model.scheme})" if show_scheme else ""
        name += f" +{model.facts.get('tuning', 'LoRA')}" if model.role == "tuned" else ""
        if base is not None and model.role == "pruned" and not lines[name]:
            lines[name].append(base)
        lines[name].append((kept * 100, value))
        if model.role == "tuned":
            tuned_lines.add(name)
    for name, points in sorted(lines.items()):
        points.sort()
        axis.plot([x for x, _ in points], [y for _, y in points], marker="s" if name in tuned_lines else "o",
                  linestyle="--" if name in tuned_lines else "-", label=name)
    if base is not None:
        axis.plot(*base, marker="*", markersize=14, color="black", linestyle="none", label="base model", zorder=3)
    return bool(lines) or base is not None


def _tuning_figure(models: list[ModelResults], path: Path) -> bool:
    tuned = [model for model in models if model.tune and model.tune.get("curve")]
    if not tuned:
        return False
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for model in tuned:
        points = [(int(p["step"]), p["val_ppl"]) for p in model.tune["curve"] if p.get("val_ppl") is not None]
        line, = axis.plot([s for s, _ in points], [v for _, v in points], marker="o", label=model.label)
        best = int(model.tune["best_step"])
        best_ppl = model.tune["val_ppl_after"]
        axis.plot([best], [best_ppl], marker="*", markersize=14, color=line.get_color(), linestyle="none", label=f"{model.label}: kept step {best}")
    axis.set_title("Recovery: validation perplexity per tuning run")
    axis.set_xlabel("optimizer step")
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_ylabel("validation perplexity")
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=DPI)
    plt.close(figure)
    return True
