"""The study file: one YAML document that says what to prune, tune, evaluate and
profile. `load_study` / `parse_study` check all of it before any job exists and name
the file, the field path and the allowed values of every mistake, e.g.

    examples/bad.yaml: pruning.methods[1]: unknown method 'wandda'; allowed: taylor, l1, l2, random, magnitude, wanda, sparsegpt

The allowed values are the worker libraries' own (prunelab.prune, prunelab.tune, ...),
so the study file and the services cannot disagree about them.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import typing
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from prunelab.errors import InvalidArgument
from prunelab.evaluate.evaluation import DTYPES
from prunelab.limits import check_limit
from prunelab.profile.options import ENGINES, GGUF_TYPES
from prunelab.prune.importance import AGGREGATIONS, TAYLOR_VARIANTS
from prunelab.prune.layers import DEFAULT_LAYERS
from prunelab.prune.pruner import ALLOCATIONS, CORRECTIONS, METHODS, MODES, PruneSettings
from prunelab.prune.sparse import OWL_LAMBDA, OWL_M, SPARSE_ALLOCATIONS, SPARSE_METHODS, UNSTRUCTURED, Pattern
from prunelab.prune.targets import SEMANTICS, check_ratio
from prunelab.tune.settings import TuneSettings

MISSING_TASK_DATA = ("skip", "hub")
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_LAYER_SPAN = re.compile(r"none|-?\d*:-?\d*")
_DEVICE = re.compile(r"cpu|cuda(:\d+)?")


def _one_of(what: str, allowed: tuple[str, ...]) -> AfterValidator:
    def check(value: str) -> str:
        if value not in allowed:
            raise ValueError(f"unknown {what} {value!r}; allowed: {', '.join(allowed)}")
        return value

    return AfterValidator(check)


def _ratio(value: float) -> float:
    try:
        check_ratio(value)
    except InvalidArgument as error:
        raise ValueError(f"{error.reason} (the share of parameters to remove)") from None
    return value


def _layer_span(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool):
        # YAML 1.1 reads an unquoted 4:18 as the base-60 integer 258.
        raise ValueError(f'write layer ranges in quotes ("4:18"): YAML reads an unquoted 4:18 as the number {value}')
    if isinstance(value, str) and not _LAYER_SPAN.fullmatch(value.strip()):
        raise ValueError(f"layer range {value!r} must be START:END (end exclusive, negatives count from the end), e.g. \"4:-2\"")
    return value


def _name(value: str) -> str:
    if not _NAME.fullmatch(value):
        raise ValueError(f"name {value!r}: use up to 64 lower-case letters, digits, '.', '_' or '-', starting with a letter or digit")
    return value


def _device(value: str) -> str:
    if value and not _DEVICE.fullmatch(value):
        raise ValueError(f"device {value!r}: use cpu, cuda or cuda:N (\"\" lets the worker choose)")
    return value


Name = Annotated[str, AfterValidator(_name)]
Text = Annotated[str, Field(min_length=1)]
Positive = Annotated[int, Field(ge=1)]
NonNegative = Annotated[int, Field(ge=0)]
Ratio = Annotated[float, AfterValidator(_ratio)]
LayerSpan = Annotated[str, BeforeValidator(_layer_span)]
Device = Annotated[str, AfterValidator(_device)]
# "best": prunelab's best structured configuration (what `prunelab prune` runs when no
# method is named), spelled out in full in each job's inputs.
BEST_METHOD = "best"
Method = Annotated[str, _one_of("method", (BEST_METHOD, *METHODS))]
Variant = Annotated[str, _one_of("taylor variant", TAYLOR_VARIANTS)]
Semantics = Annotated[str, _one_of("semantics", SEMANTICS)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Calibration(Section):
    """Text the pruner computes importance (and its correction) on."""

    dataset: Text = "wikitext2"
    split: Text = "train"
    samples: Positive = 10
    seq_len: Positive = 64


class Layers(Section):
    attn: LayerSpan = DEFAULT_LAYERS
    mlp: LayerSpan = DEFAULT_LAYERS


def _pattern(value: str) -> str:
    try:
        return str(Pattern.parse(value))
    except InvalidArgument as error:
        raise ValueError(error.reason) from None


def _layers_entry(value: Any) -> Any:
    """"4:18" is shorthand for the same range in attention and MLP."""
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        _layer_span(value)
        return {"attn": value, "mlp": value}
    return value


class PruningGrid(Section):
    """Every combination of methods x variants x ratios x semantics x layers, and for
    the sparse methods (magnitude, wanda, sparsegpt) methods x ratios x patterns: their
    ratio is the sparsity of the decoder's linear weights (an N:M pattern's is N/M),
    in every layer; variants, semantics, layers and mode are the structured ones'."""

    methods: Annotated[list[Method], Field(min_length=1)]
    variants: Annotated[list[Variant], Field(min_length=1)] = ["element1"]  # taylor's; other methods have none
    ratios: Annotated[list[Ratio], Field(min_length=1)]
    semantics: Annotated[list[Semantics], Field(min_length=1)] = ["params_ratio"]
    layers: Annotated[list[Annotated[Layers, BeforeValidator(_layers_entry)]], Field(min_length=1)] = [Layers()]
    patterns: Annotated[list[Annotated[str, AfterValidator(_pattern)]], Field(min_length=1)] = [UNSTRUCTURED]
    aggregation: Annotated[str, _one_of("aggregation", AGGREGATIONS)] = "sum"
    mode: Annotated[str, _one_of("mode", MODES)] = "block"
    allocation: Annotated[str, _one_of("allocation", tuple(dict.fromkeys(ALLOCATIONS + SPARSE_ALLOCATIONS)))] = "uniform"
    owl_lambda: float = OWL_LAMBDA
    owl_m: float = OWL_M
    correction: bool | Annotated[str, _one_of("correction", CORRECTIONS)] = True  # true/false: refit/none
    seed: NonNegative = 0
    calibration: Calibration | None = None  # this grid's own calibration text; None: the study's

    @model_validator(mode="after")
    def _settings_valid_for_every_method(self) -> PruningGrid:
        """Combinations a pruner would refuse (allocation owl for taylor, a 2:4 pattern
        with owl, ...) are refused here, with the pruner's own reason."""
        for method in (m for m in self.methods if m != BEST_METHOD):
            sparse = method in SPARSE_METHODS
            for pattern in self.patterns if sparse else [""]:
                ratio = Pattern.parse(pattern).sparsity if sparse and pattern != UNSTRUCTURED else self.ratios[0]
                try:
                    PruneSettings(ratio=ratio, method=method, variant=self.variants[0], aggregation=self.aggregation,
                                  semantics="" if sparse else self.semantics[0], mode="block" if sparse else self.mode,
                                  allocation=self.allocation, pattern=pattern, owl_lambda=self.owl_lambda,
                                  owl_m=self.owl_m).validate()
                except InvalidArgument as error:
                    raise ValueError(f"{method}: {error.reason}") from None
        return self

    @property
    def size(self) -> int:
        """An upper bound on the pruned models this grid makes (the product of its lists)."""
        return math.prod(len(values) for values in (self.methods, self.variants, self.ratios, self.semantics, self.layers, self.patterns))


class TuneSelection(Section):
    """Pruned models to tune: those that match every key given."""

    method: Method | None = None
    variant: Variant | None = None
    ratio: Ratio | None = None
    pattern: Annotated[str, AfterValidator(_pattern)] | None = None
    allocation: str | None = None
    semantics: Semantics | None = None
    attn_layers: LayerSpan | None = None
    mlp_layers: LayerSpan | None = None

    def matches(self, model: dict[str, Any]) -> bool:
        return all(model.get(key) == value for key, value in self.model_dump(exclude_none=True).items())


class Tuning(Section):
    select: Annotated[list[TuneSelection], Field(min_length=1)]
    # TuneSettings' fields (data, steps, lr, rank, objective, full, ...); checked by TuneSettings itself.
    settings: dict[str, Any]
    # Ways to tune each selected model, e.g. [{name: LoRA}, {name: full-kd, full: true, objective: kd}]:
    # each run's keys override `settings`; its name (default: run_name) labels the
    # tuned model "<pruned model> +<name>".
    runs: Annotated[list[dict[str, Any]], Field(min_length=1)] = [{}]

    @field_validator("settings")
    @classmethod
    def _valid_tune_settings(cls, value: dict[str, Any]) -> dict[str, Any]:
        _check_tune_keys(value, TUNE_KEYS)
        _check_tune_settings(value)
        return value

    @model_validator(mode="after")
    def _valid_runs(self) -> Tuning:
        for index, run in enumerate(self.runs):
            _check_tune_keys(run, (*TUNE_KEYS, "name"), f"runs[{index}]: ")
            if "name" in run and (not isinstance(run["name"], str) or not re.fullmatch(r"[\w.+-]+", run["name"])):
                raise ValueError(f"runs[{index}].name: {run['name']!r} must be a word of letters, digits, '.', '+' or '-'")
            _check_tune_settings(self._merged(run), f"runs[{index}].")
        names = [name for name, _ in self.named_runs()]
        if len(set(names)) != len(names):
            raise ValueError(f"runs: two runs are named alike ({', '.join(names)}); give each a distinct name")
        return self

    def named_runs(self) -> list[tuple[str, dict[str, Any]]]:
        """(name, settings) of each run: `settings` with the run's keys over them."""
        merged = [self._merged(run) for run in self.runs]
        return [(run.get("name") or run_name(tune_settings(given)), given) for run, given in zip(self.runs, merged, strict=True)]

    def _merged(self, run: dict[str, Any]) -> dict[str, Any]:
        return {**self.settings, **{key: value for key, value in run.items() if key != "name"}}


TUNE_KEYS = tuple(TuneSettings.__dataclass_fields__)


def _check_tune_keys(given: dict[str, Any], allowed: tuple[str, ...], where: str = "") -> None:
    unknown = [key for key in given if key not in allowed]
    if unknown:
        raise ValueError(f"{where}unknown key(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(allowed)}")


def _check_tune_settings(given: dict[str, Any], where: str = "") -> None:
    try:
        tune_settings(given).validate()
    except InvalidArgument as error:
        raise ValueError(f"{where}{error.field}: {error.reason}" if error.field else f"{where}{error.reason}") from None


def tune_settings(given: dict[str, Any]) -> TuneSettings:
    """TuneSettings from a study's `tuning.settings` (YAML lists become tuples)."""
    return TuneSettings(**{key: tuple(value) if isinstance(value, list) else value for key, value in given.items()})


def run_name(settings: TuneSettings) -> str:
    """A tuning run's default name: what trains, then the objective unless it is ce:
    "LoRA" (the seed study's recovery), "full", "LoRA-kd", "full-kd+ce"."""
    trained = {"lora": "LoRA", "full": "full"}[settings.trained]
    return trained if settings.objective == "ce" else f"{trained}-{settings.objective}"


class Perplexity(Section):
    corpora: Annotated[list[Text], Field(min_length=1)]  # wikitext2, ptb, stored text datasets, local files
    split: Text = "validation"
    seq_lens: Annotated[list[Annotated[int, Field(ge=2)]], Field(min_length=1)] = [128]
    max_windows: Positive | None = None  # the first N windows only; None = all


class Evaluation(Section):
    perplexity: Perplexity | None = None
    tasks: list[Text] = []  # lm-eval task names
    # A task whose data is not in the store: "skip" it (the report says how to import
    # it), or let the evaluator read lm-eval's own dataset from the "hub" (online only).
    missing_task_data: Annotated[str, _one_of("missing_task_data", MISSING_TASK_DATA)] = "skip"
    limit: Positive | None = None  # documents per task; None = all
    num_fewshot: NonNegative = 0
    batch_size: Positive = 8
    seed: NonNegative | None = None  # lm-eval's seeds; None = its default
    dtype: Annotated[str, _one_of("dtype", tuple(DTYPES))] = "float32"
    device: Device = ""  # "" = the worker's GPU when it has one, else CPU

    @model_validator(mode="after")
    def _something_to_evaluate(self) -> Evaluation:
        if self.perplexity is None and not self.tasks:
            raise ValueError("nothing to evaluate: give perplexity corpora and/or tasks")
        return self


class Profiling(Section):
    seq_len: Positive = 64
    batch_sizes: Annotated[list[Positive], Field(min_length=1)] = [1, 8]
    gen_tokens: Positive = 32
    repeats: Positive = 5
    warmup: NonNegative = 1
    device: Device = "cpu"
    dtype: Annotated[str, _one_of("dtype", tuple(DTYPES))] = "float32"
    threads: NonNegative = 0  # torch threads while timing; 0 = the worker's setting
    skip_memory: bool = False
    # One profile job per engine; llama.cpp times a GGUF export of each model against
    # the exported base, at batch size 1, and the report puts the speedups side by side.
    engines: Annotated[list[Annotated[str, _one_of("engine", ENGINES)]], Field(min_length=1)] = ["torch"]
    gguf_type: Annotated[str, _one_of("gguf_type", GGUF_TYPES)] = "f16"  # llama.cpp's exports


class Export(Section):
    """Every model of the study (base, pruned, tuned) written as a file to serve."""

    format: Annotated[str, _one_of("export format", ("gguf",))] = "gguf"
    outtype: Annotated[str, _one_of("outtype", GGUF_TYPES)] = "f16"


def _export(value: Any) -> Any:
    """`export: gguf` is the short form of `export: {format: gguf}`."""
    return {"format": value} if isinstance(value, str) else value


def _grids(value: Any) -> Any:
    """`pruning` is one grid or a list of grids."""
    return [value] if isinstance(value, dict) else value


class Study(Section):
    name: Name
    model: Text  # registered name, artifact://<digest>, checkpoint dir, .gguf or hub id
    description: str = ""
    calibration: Calibration = Calibration()
    pruning: Annotated[list[PruningGrid], BeforeValidator(_grids)] = []  # none: the base model alone
    tuning: Tuning | None = None
    evaluation: Evaluation | None = None  # None: no evaluations
    profiling: Profiling | None = None  # None: no profiles
    export: Annotated[Export | None, BeforeValidator(_export)] = None  # None: no exports

    @model_validator(mode="after")
    def _something_to_do(self) -> Study:
        if self.evaluation is None and self.profiling is None and self.export is None:
            raise ValueError("nothing to do: give evaluation, profiling and/or export")
        return self

    @property
    def digest(self) -> str:
        """sha256 of the study's content with every default filled in."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    @property
    def id(self) -> str:
        return f"{self.name}-{self.digest[:12]}"


# ---- loading


def load_study(path: Path | str) -> Study:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise InvalidArgument(f"{path}: cannot read the study file: {error.strerror}") from None
    return parse_study(text, str(path))


class _NoAliasLoader(yaml.SafeLoader):
    """YAML without aliases (`*name`): a few hundred bytes of nested aliases expand to
    gigabytes (the "billion laughs"), and a study never needs them."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            raise yaml.YAMLError(f"aliases (*{self.peek_event().anchor}) are not accepted in a study file; write the value out")
        return super().compose_node(parent, index)


def parse_study(text: str, source: str) -> Study:
    """The study in `text`; InvalidArgument listing every mistake as `source: path: what`
    (at most MAX_ERROR_LINES lines of at most MAX_ERROR_CHARS: the input is never echoed whole)."""
    check_limit("study_bytes", len(text.encode("utf-8", "surrogatepass")), "study file size (bytes)")
    try:
        document = yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as error:
        raise InvalidArgument(_clipped(f"{source}: not valid YAML: {error}")) from None
    if not isinstance(document, dict):
        raise InvalidArgument(f"{source}: a study is a YAML mapping with name, model, pruning, evaluation, ...")
    try:
        study = Study.model_validate(document)
    except ValidationError as error:
        single_grid = isinstance(document.get("pruning"), dict)
        lines = [_clipped(f"{source}: {_path(e['loc'], single_grid)}: {_explain(e)}") for e in error.errors()]
        more = [f"... and {len(lines) - MAX_ERROR_LINES} more"] if len(lines) > MAX_ERROR_LINES else []
        raise InvalidArgument("\n".join(lines[:MAX_ERROR_LINES] + more)) from None
    check_limit("study_jobs", sum(grid.size for grid in study.pruning), "pruning grid points")
    return study


MAX_ERROR_LINES = 20
MAX_ERROR_CHARS = 300


def _clipped(line: str) -> str:
    return line if len(line) <= MAX_ERROR_CHARS else line[: MAX_ERROR_CHARS - 3] + "..."


def _path(loc: tuple[Any, ...], single_grid: bool) -> str:
    """("pruning", 0, "methods", 1) -> "pruning.methods[1]" (or "pruning[0].methods[1]"
    when the file gives a list of grids)."""
    parts: list[str] = []
    for index, part in enumerate(loc):
        if isinstance(part, int):
            if not (single_grid and index == 1 and loc[0] == "pruning"):
                parts[-1] += f"[{part}]"
        elif not part.startswith(("function-", "json-or-python")):  # pydantic's validator wrappers
            parts.append(part)
    return ".".join(parts) or "(top level)"


def _explain(error: dict[str, Any]) -> str:
    kind = error["type"]
    if kind == "value_error":
        return str(error["ctx"]["error"])
    if kind == "extra_forbidden":
        allowed = _fields_at(error["loc"][:-1])
        return f"unknown key {error['loc'][-1]!r}; allowed: {', '.join(allowed)}"
    if kind == "missing":
        return "required but missing"
    return f"{error['msg']} (got {error['input']!r})"


def _fields_at(loc: tuple[Any, ...]) -> list[str]:
    """The keys allowed in the section at `loc`."""
    section: Any = Study
    for part in loc:
        if isinstance(part, str) and part in getattr(section, "model_fields", {}):
            section = _section_type(section.model_fields[part].annotation)
    return list(section.model_fields)


def _section_type(annotation: Any) -> Any:
    """The Section class inside list[...], X | None, Annotated[...]."""
    if isinstance(annotation, type) and issubclass(annotation, Section):
        return annotation
    for argument in typing.get_args(annotation):
        found = _section_type(argument)
        if found is not None:
            return found
    return None


__all__ = [
    "Calibration",
    "Evaluation",
    "Layers",
    "Perplexity",
    "Profiling",
    "PruningGrid",
    "Study",
    "TuneSelection",
    "Tuning",
    "load_study",
    "parse_study",
    "tune_settings",
]
