"""The bad-input suite: malformed and hostile requests over every RPC of every service,
on one real server. Each must be answered with its status code (never INTERNAL, never
a hang), the server must keep serving, no file outside the read roots may be opened
(an audit hook watches every open() in this process, where the server runs), nothing
may be stored, and no reply may carry the canary secret.

Transport refusals (missing or wrong token, plaintext to TLS, a message over the size
limit) are here too; tests/test_rpc_security.py has the positive TLS cases."""

from __future__ import annotations

import math
import sys
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from prunelab.config import settings
from prunelab.evaluate.service import SERVICE_NAME as EVALUATOR
from prunelab.evaluate.service import EvaluatorServicer
from prunelab.evaluate.service import registration as evaluator_registration
from prunelab.orchestrate import InProcessDispatcher, Orchestrator, StudyDB
from prunelab.orchestrate.service import SERVICE_NAME as ORCHESTRATOR
from prunelab.orchestrate.service import OrchestratorServicer
from prunelab.orchestrate.service import registration as orchestrator_registration
from prunelab.profile.service import SERVICE_NAME as PROFILER
from prunelab.profile.service import ProfilerServicer
from prunelab.profile.service import registration as profiler_registration
from prunelab.prune.service import SERVICE_NAME as PRUNER
from prunelab.prune.service import PrunerServicer
from prunelab.prune.service import registration as pruner_registration
from prunelab.rpc import check_health, make_channel
from prunelab.store import open_store
from prunelab.tune.service import SERVICE_NAME as TUNER
from prunelab.tune.service import TunerServicer
from prunelab.tune.service import registration as tuner_registration
from prunelab.v1 import (
    evaluator_pb2,
    evaluator_pb2_grpc,
    orchestrator_pb2,
    orchestrator_pb2_grpc,
    profiler_pb2,
    profiler_pb2_grpc,
    pruner_pb2,
    pruner_pb2_grpc,
    tuner_pb2,
    tuner_pb2_grpc,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CANARY = "canary-secret-0b1c2d3e"
CALL_TIMEOUT_S = 60
INVALID, DENIED, NOT_FOUND, PRECONDITION, UNAUTHENTICATED, EXHAUSTED = (
    "INVALID_ARGUMENT", "PERMISSION_DENIED", "NOT_FOUND", "FAILED_PRECONDITION", "UNAUTHENTICATED", "RESOURCE_EXHAUSTED")

# Paths a hostile caller tries: {outside} is a folder beside the read roots holding the canary.
HOSTILE_PATHS = [
    ("/proc/self/environ", DENIED), ("/etc/passwd", DENIED), ("{outside}/secret.txt", DENIED),
    ("{outside}/no-such-file", DENIED), ("../../../../etc/passwd", DENIED), ("./secret.txt", DENIED),
    ("~/.ssh/id_rsa", DENIED), ("/etc/../proc/self/environ", DENIED), ("{roots}/../outside/secret.txt", DENIED),
    ("{roots}/link-out/secret.txt", DENIED), ("bad\x00name", INVALID), ("x" * 5000, INVALID),
]
HUGE = 2**31 - 1
MESSAGE_LIMIT = 8 * 2**20


class Case:
    def __init__(self, rpc: str, label: str, code: str, call: Callable[[dict], object]):
        self.rpc, self.label, self.code, self.call = rpc, label, code, call

    def __repr__(self) -> str:
        return f"{self.rpc}[{self.label[:40]}]"


def _stream(stub_method, request):
    return lambda: list(stub_method(request, timeout=CALL_TIMEOUT_S))


def _unary(stub_method, request):
    return lambda: stub_method(request, timeout=CALL_TIMEOUT_S)


def _prune_cases() -> list[Case]:
    def prune(code, label, **fields):
        return Case("Pruner.Prune", label, code, lambda s, f=fields: _stream(s["pruner"].Prune, pruner_pb2.PruneRequest(
            **{"model": s["model"], "ratio": 0.2, "method": "l2", "samples": 2, "seq_len": 8, "calibration": s["corpus"]} | s.format(f))))

    cases = [prune(code, f"model {path!r}", model=path) for path, code in HOSTILE_PATHS]
    cases += [prune(code, f"calibration {path!r}", calibration=path) for path, code in HOSTILE_PATHS[:6]]
    cases += [prune(INVALID, f"ratio {r}", ratio=r) for r in (-1.0, 1.0, 1.5, math.nan, math.inf)]
    cases += [prune(INVALID, f"{name} {v}", **{name: v}) for name in ("samples", "seq_len", "correction_samples", "correction_seq_len")
              for v in (HUGE, -1)]
    cases += [prune(INVALID, f"{name} unknown", **{name: "'; DROP TABLE jobs; --"})
              for name in ("method", "variant", "aggregation", "semantics", "allocation", "mode", "pattern", "correction_method")]
    cases += [prune(INVALID, "attn_layers garbage", attn_layers="4:-2:7:x"), prune(INVALID, "owl_lambda nan", owl_lambda=math.nan),
              prune(NOT_FOUND, "model a missing artifact", model="artifact://" + "0" * 64),
              prune(INVALID, "model a foreign URI", model="file:///etc/passwd"),
              prune(INVALID, "model a bad artifact URI", model="artifact://../../etc")]
    return cases


def _export_cases() -> list[Case]:
    def export(code, label, **fields):
        return Case("Pruner.Export", label, code, lambda s, f=fields: _stream(s["pruner"].Export, pruner_pb2.ExportRequest(
            **{"model": s["model"]} | s.format(f))))

    cases = [export(code, f"model {path!r}", model=path) for path, code in HOSTILE_PATHS]
    cases += [export(INVALID, f"{name} unknown", **{name: "../../etc/passwd"}) for name in ("format", "outtype")]
    cases += [export(INVALID, "model empty", model=""), export(NOT_FOUND, "model a missing artifact", model="artifact://" + "0" * 64)]
    return cases


def _tune_cases() -> list[Case]:
    def tune(code, label, **fields):
        return Case("Tuner.Tune", label, code, lambda s, f=fields: _stream(s["tuner"].Tune, tuner_pb2.TuneRequest(
            **{"model": s["model"], "data": s["corpus"], "steps": 2, "max_length": 8, "batch_size": 1} | s.format(f))))

    cases = [tune(code, f"data {path!r}", data=path) for path, code in HOSTILE_PATHS]
    cases += [tune(code, f"{name} {path!r}", **{name: path}) for name in ("model", "val_data")
              for path, code in HOSTILE_PATHS[:4]]
    cases += [tune(code, f"teacher {path!r}", teacher=path, objective="kd") for path, code in HOSTILE_PATHS[:4]]
    cases += [tune(INVALID, f"{name} {v}", **{name: v}) for name, v in (
        ("steps", HUGE), ("batch_size", HUGE), ("max_length", HUGE), ("rank", HUGE), ("grad_accum", HUGE),
        ("max_val_examples", HUGE), ("eval_every", HUGE), ("steps", -5), ("lr", math.nan), ("lr", -1.0), ("epochs", math.inf),
        ("val_fraction", 2.0), ("temperature", -1.0), ("kd_weight", 1.5), ("max_length", 1))]
    cases += [tune(INVALID, f"{name} unknown", **{name: "<script>"}) for name in ("objective", "schedule", "precision")]
    cases += [tune(INVALID, "target module unknown", target_modules=["../../lm_head"])]
    return cases


def _evaluate_cases() -> list[Case]:
    def evaluate(code, label, **fields):
        return Case("Evaluator.Evaluate", label, code, lambda s, f=fields: _stream(s["evaluator"].Evaluate, evaluator_pb2.EvaluateRequest(
            **{"model": s["model"], "ppl_corpora": [s["corpus"]], "seq_len": 8} | s.format(f))))

    cases = [evaluate(code, f"corpus {path!r}", ppl_corpora=[path]) for path, code in HOSTILE_PATHS]
    cases += [evaluate(code, f"model {path!r}", model=path) for path, code in HOSTILE_PATHS[:6]]
    cases += [evaluate(INVALID, f"{name} {v}", **{name: v}) for name, v in (
        ("seq_len", HUGE), ("seq_len", 1), ("max_windows", HUGE), ("max_windows", -1), ("batch_size", HUGE), ("batch_size", -3),
        ("limit", 2**62), ("num_fewshot", HUGE), ("num_fewshot", -1))]
    cases += [evaluate(INVALID, "task unknown", tasks=["../../etc/passwd"], ppl_corpora=[]),
              evaluate(INVALID, "dtype unknown", dtype="float128"), evaluate(INVALID, "device unknown", device="tpu:0"),
              evaluate(INVALID, "nothing to evaluate", ppl_corpora=[])]
    return cases


def _profile_cases() -> list[Case]:
    def profile(code, label, **fields):
        return Case("Profiler.Profile", label, code, lambda s, f=fields: _stream(s["profiler"].Profile, profiler_pb2.ProfileRequest(
            **{"model": s["model"], "seq_len": 4, "batch_sizes": [1], "gen_tokens": 2, "repeats": 1, "skip_memory": True} | s.format(f))))

    cases = [profile(code, f"model {path!r}", model=path) for path, code in HOSTILE_PATHS[:8]]
    cases += [profile(code, f"baseline {path!r}", baseline=path) for path, code in HOSTILE_PATHS[:4]]
    cases += [profile(INVALID, f"{name} {v}", **{name: v}) for name, v in (
        ("seq_len", HUGE), ("seq_len", -1), ("gen_tokens", HUGE), ("repeats", HUGE), ("warmup", HUGE), ("warmup", -1),
        ("batch_sizes", [HUGE]), ("batch_sizes", [0]), ("batch_sizes", [1, 1]), ("threads", -2))]
    cases += [profile(INVALID, "dtype unknown", dtype="int3"), profile(INVALID, "device unknown", device="quantum")]
    return cases


ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n" for i in range(8))


def _orchestrator_cases() -> list[Case]:
    def submit(code, label, text):
        return Case("Orchestrator.SubmitStudy", label, code,
                    lambda s, t=text: _unary(s["orchestrator"].SubmitStudy, orchestrator_pb2.SubmitStudyRequest(study_yaml=s.format(t), source="x.yaml")))

    valid = "name: x\nmodel: {model}\npruning: {methods: [l2], ratios: [0.2]}\nevaluation: {perplexity: {corpora: [{corpus}]}}\n"
    cases = [
        submit(INVALID, "alias bomb", ALIAS_BOMB), submit(INVALID, "2 MiB file", "name: x\n#" + "y" * 2**21 + "\n"),
        submit(INVALID, "python tag", "!!python/object/apply:os.system ['echo pwned']"), submit(INVALID, "not a mapping", "[1, 2, 3]"),
        submit(INVALID, "not YAML", "name: [unclosed"), submit(INVALID, "unknown key", valid + "surprise: 1\n"),
        submit(INVALID, "wrong type", valid.replace("ratios: [0.2]", "ratios: lots")),
        submit(INVALID, "a million grid points", valid.replace("ratios: [0.2]", "ratios: [" + ", ".join(["0.2"] * 1000) + "]")
               .replace("methods: [l2]", "methods: [" + ", ".join(["l2"] * 1000) + "]")),
        submit(INVALID, "ratio out of range", valid.replace("0.2", "7")), submit(INVALID, "empty", ""),
        submit(INVALID, "a 100k-character value", valid.replace("name: x", "name: " + "n" * 100_000)),
    ]

    def unary(method, code, label, request):
        return Case(f"Orchestrator.{method}", label, code, lambda s: _unary(getattr(s["orchestrator"], method), request))

    for method, request_class in (("GetStudy", orchestrator_pb2.GetStudyRequest), ("CancelStudy", orchestrator_pb2.CancelStudyRequest),
                                  ("GetReport", orchestrator_pb2.GetReportRequest)):
        cases += [unary(method, NOT_FOUND, "unknown study", request_class(study_id="no-such-study-000000000000")),
                  unary(method, NOT_FOUND, "traversal id", request_class(study_id="../../etc/passwd"))]
    cases += [Case("Orchestrator.WatchStudy", "unknown study", NOT_FOUND,
                   lambda s: _stream(s["orchestrator"].WatchStudy, orchestrator_pb2.WatchStudyRequest(study_id="nope")))]
    for uri, code in (("artifact://" + "0" * 64, NOT_FOUND), ("artifact://../../etc/passwd", INVALID), ("/etc/passwd", INVALID), ("", INVALID)):
        cases.append(Case("Orchestrator.GetArtifact", f"uri {uri!r}", code,
                          lambda s, u=uri: _stream(s["orchestrator"].GetArtifact, orchestrator_pb2.GetArtifactRequest(uri=u))))
    header = orchestrator_pb2.ImportDatasetHeader(name="hostile", format="text")
    for label, parts in (
        ("traversal chunk path", [header, orchestrator_pb2.FileChunk(path="../../escape.txt", data=b"x")]),
        ("absolute chunk path", [header, orchestrator_pb2.FileChunk(path="/tmp/escape.txt", data=b"x")]),
        ("no header", [orchestrator_pb2.FileChunk(path="train.txt", data=b"x")]),
        ("bad dataset name", [orchestrator_pb2.ImportDatasetHeader(name="../x", format="text"), orchestrator_pb2.FileChunk(path="train.txt", data=b"x\n")]),
        ("unknown format", [orchestrator_pb2.ImportDatasetHeader(name="ok", format="exe"), orchestrator_pb2.FileChunk(path="train.txt", data=b"x\n")]),
    ):
        requests = [orchestrator_pb2.ImportDatasetRequest(header=p) if isinstance(p, orchestrator_pb2.ImportDatasetHeader)
                    else orchestrator_pb2.ImportDatasetRequest(chunk=p) for p in parts]
        cases.append(Case("Orchestrator.ImportDataset", label, INVALID,
                          lambda s, r=requests: _unary(s["orchestrator"].ImportDataset, iter(r))))
    return cases


CASES = [*_prune_cases(), *_export_cases(), *_tune_cases(), *_evaluate_cases(), *_profile_cases(), *_orchestrator_cases()]


class Stubs(dict):
    def format(self, fields):
        """`fields` with {outside} and {roots} (and, in study text, {model} and {corpus}) filled in."""
        def fill(value):
            if isinstance(value, str):
                return value.replace("{outside}", self["outside"]).replace("{roots}", self["roots"]) \
                    .replace("{model}", self["model"]).replace("{corpus}", self["corpus"])
            if isinstance(value, list):
                return [fill(v) for v in value]
            return value
        return {k: fill(v) for k, v in fields.items()} if isinstance(fields, dict) else fill(fields)


@pytest.fixture(scope="module")
def opened_paths():
    """Every path this process opens from now on (the server runs here)."""
    paths: list[str] = []
    recording = threading.Event()
    recording.set()

    def hook(event, args):
        if recording.is_set() and event == "open" and args and isinstance(args[0], (str, bytes, Path)):
            paths.append(str(args[0]))

    sys.addaudithook(hook)  # cannot be removed: it stops recording instead
    yield paths
    recording.clear()


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_checkpoint, opened_paths):
    root = tmp_path_factory.mktemp("hostile")
    roots, outside = root / "roots", root / "outside"
    (roots / "corpus").mkdir(parents=True)
    (roots / "corpus" / "validation.txt").write_text("the quick brown fox jumps over the lazy dog .\n" * 50)
    (roots / "corpus" / "train.txt").write_text("the quick brown fox jumps over the lazy dog .\n" * 50)
    outside.mkdir()
    (outside / "secret.txt").write_text(CANARY + "\n")
    (roots / "link-out").symlink_to(outside, target_is_directory=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PRUNELAB_HOME", str(root / "home"))
        patch.setenv("PRUNELAB_DATA_DIR", str(roots))
        patch.setenv("PRUNELAB_READ_ROOTS", str(tiny_checkpoint.parent))
        patch.setenv("PRUNELAB_MAX_CONCURRENT_JOBS", "4")
        patch.setenv("PRUNELAB_GRPC_MAX_MESSAGE_BYTES", str(MESSAGE_LIMIT))
        settings.cache_clear()
        db = StudyDB(settings().orchestrator_db)
        orchestrator = Orchestrator(db, InProcessDispatcher())
        orchestrator.start()
        from prunelab.rpc import serve

        running = serve([pruner_registration(PrunerServicer()), tuner_registration(TunerServicer(device="cpu")),
                         evaluator_registration(EvaluatorServicer()), profiler_registration(ProfilerServicer()),
                         orchestrator_registration(OrchestratorServicer(db, orchestrator))],
                        service_names=[PRUNER, TUNER, EVALUATOR, PROFILER, ORCHESTRATOR], port=0, host="127.0.0.1")
        channel = make_channel(running.target)
        stubs = Stubs(pruner=pruner_pb2_grpc.PrunerStub(channel), tuner=tuner_pb2_grpc.TunerStub(channel),
                      evaluator=evaluator_pb2_grpc.EvaluatorStub(channel), profiler=profiler_pb2_grpc.ProfilerStub(channel),
                      orchestrator=orchestrator_pb2_grpc.OrchestratorStub(channel), model=str(tiny_checkpoint), corpus="corpus",
                      outside=str(outside), roots=str(roots), target=running.target)
        seen: Counter = Counter()
        opened_paths.clear()  # writing the canary was the fixture's own doing
        yield stubs, seen, outside
        channel.close()
        running.stop(None)
        orchestrator.stop()
        db.close()
        settings.cache_clear()


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_hostile_request_is_refused_with_its_code(server, case):
    stubs, seen, _ = server
    with pytest.raises(grpc.RpcError) as caught:
        case.call(stubs)()
    code, details = caught.value.code().name, caught.value.details() or ""
    seen[(case.rpc, code)] += 1
    assert code == case.code, f"{case}: {code}: {details[:300]}"
    assert CANARY not in details and len(details) < 2000, f"{case}: details echo too much ({len(details)} chars)"
    for kind in ("model", "adapter", "evaluation", "profile", "dataset", "report"):
        assert open_store().list(kind) == [], f"{case} stored a {kind}"


@pytest.mark.parametrize("size", [MESSAGE_LIMIT + 1, 3 * MESSAGE_LIMIT])
def test_a_message_over_the_size_limit_is_refused_by_the_server(server, size):
    """A client without prunelab's limits (grpcio's default send size is unbounded)."""
    stubs, seen, _ = server
    with grpc.insecure_channel(stubs["target"]) as raw:
        submit = orchestrator_pb2_grpc.OrchestratorStub(raw).SubmitStudy
        with pytest.raises(grpc.RpcError) as caught:
            submit(orchestrator_pb2.SubmitStudyRequest(study_yaml="#" * size), timeout=CALL_TIMEOUT_S)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    seen[("Orchestrator.SubmitStudy (oversized message)", caught.value.code().name)] += 1


def test_after_every_hostile_request_the_server_serves_and_read_nothing_outside(server, opened_paths, capsys):
    stubs, seen, outside = server
    assert len(CASES) >= 100
    assert check_health(stubs["target"], "") == "SERVING"
    leaked = [p for p in opened_paths if p.startswith(str(outside)) or p.startswith(("/proc/self/environ", "/etc/passwd", "/etc/shadow"))]
    assert leaked == [], f"files opened outside the read roots: {leaked[:5]}"
    with capsys.disabled():  # the closing note's table: requests per RPC and the codes they got
        by_rpc: dict[str, Counter] = {}
        for (rpc, code), n in seen.items():
            by_rpc.setdefault(rpc, Counter())[code] += n
        print(f"\nhostile requests: {sum(seen.values())}, crashes (INTERNAL/UNKNOWN): "
              f"{sum(n for (_, code), n in seen.items() if code in ('INTERNAL', 'UNKNOWN'))}")
        for rpc, codes in sorted(by_rpc.items()):
            print(f"  {rpc}: {sum(codes.values())} -> {dict(codes)}")
