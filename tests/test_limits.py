"""Bounded requests (prunelab.limits, study parsing): a field over its limit is refused
naming the field, the value and the limit, the limits are the deployment's to set, and
a study file can neither expand aliases nor make an error message echo it whole."""

from __future__ import annotations

import pytest

from prunelab.config import settings
from prunelab.errors import InvalidArgument
from prunelab.evaluate.evaluation import EvaluationSpec
from prunelab.orchestrate import parse_study
from prunelab.profile.options import ProfileOptions
from prunelab.prune.pruner import PruneSettings
from prunelab.tune.settings import TuneSettings


@pytest.mark.parametrize(("build", "field", "variable"), [
    (lambda: PruneSettings(ratio=0.2, method="l2", samples=2**31 - 1).validate(), "samples", "PRUNELAB_MAX_SAMPLES"),
    (lambda: PruneSettings(ratio=0.2, method="l2", correction_seq_len=10**9).validate(), "correction_seq_len", "PRUNELAB_MAX_SEQ_LEN"),
    (lambda: TuneSettings(data="wikitext2", steps=10**9).validate(), "steps", "PRUNELAB_MAX_STEPS"),
    (lambda: TuneSettings(data="wikitext2", rank=10**6).validate(), "rank", "PRUNELAB_MAX_LORA_RANK"),
    (lambda: EvaluationSpec(model="m", ppl_corpora=("wikitext2",), max_windows=2**31 - 1).validate(), "max_windows", "PRUNELAB_MAX_WINDOWS"),
    (lambda: ProfileOptions(repeats=10**8).validate(), "repeats", "PRUNELAB_MAX_REPEATS"),
])
def test_a_field_over_its_limit_names_the_field_the_value_and_the_limit(build, field, variable):
    with pytest.raises(InvalidArgument) as caught:
        build()
    assert caught.value.field == field
    assert f"{field}=" in caught.value.reason and "above this deployment's limit of" in caught.value.reason and variable in caught.value.reason


def test_limits_are_the_deployments_to_set(monkeypatch):
    monkeypatch.setenv("PRUNELAB_MAX_SAMPLES", "16")
    settings.cache_clear()
    PruneSettings(ratio=0.2, method="l2", samples=16).validate()
    with pytest.raises(InvalidArgument, match=r"samples=17 is above this deployment's limit of 16 \(PRUNELAB_MAX_SAMPLES\)"):
        PruneSettings(ratio=0.2, method="l2", samples=17).validate()


STUDY = "name: x\nmodel: smollm2-135m\npruning: {methods: [l2], ratios: [0.2]}\nevaluation: {perplexity: {corpora: [wikitext2]}}\n"


def test_study_aliases_are_refused_before_they_expand():
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\nc: [*b, *b, *b, *b, *b, *b, *b, *b, *b]\n"
    with pytest.raises(InvalidArgument, match=r"aliases \(\*a\) are not accepted"):
        parse_study(bomb, "bomb.yaml")
    parse_study(STUDY, "plain.yaml")  # anchors' absence changes nothing for a plain file


def test_study_size_and_grid_are_bounded(monkeypatch):
    monkeypatch.setenv("PRUNELAB_MAX_STUDY_BYTES", "400")
    monkeypatch.setenv("PRUNELAB_MAX_STUDY_JOBS", "50")
    settings.cache_clear()
    with pytest.raises(InvalidArgument, match=r"study file size \(bytes\)=\d+ is above this deployment's limit of 400"):
        parse_study(STUDY + "#" * 400, "big.yaml")
    grid = STUDY.replace("ratios: [0.2]", "ratios: [0.1, 0.2, 0.3]").replace("methods: [l2]", "methods: [l2, l1, random, taylor]")
    parse_study(grid, "twelve.yaml")
    with pytest.raises(InvalidArgument, match=r"pruning grid points=\d+ is above this deployment's limit of 50"):
        parse_study(grid.replace("ratios: [0.1, 0.2, 0.3]", "ratios: [" + ", ".join(f"0.{i}" for i in range(1, 10)) + ", 0.15, 0.25, 0.35, 0.45]"),
                    "many.yaml")


def test_study_errors_never_echo_the_file_whole():
    long_value = "v" * 10_000
    text = "name: x\nmodel: smollm2-135m\npruning:\n" + "".join(
        f"  - {{methods: [l2], ratios: [0.2], surprise{i}: {long_value}}}\n" for i in range(40))
    with pytest.raises(InvalidArgument) as caught:
        parse_study(text, "noisy.yaml")
    lines = caught.value.reason.splitlines()
    assert len(lines) <= 21 and all(len(line) <= 300 for line in lines) and lines[-1].startswith("... and ")
