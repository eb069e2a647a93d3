"""prunelab's service topology as local processes, without containers.

`make up-local` / `make down-local` / `make status-local` call this file; tests
import it (`up`, `down`, `status`). On 127.0.0.1: SeaweedFS as the S3 store, then
the orchestrator, pruner, tuner, profiler and two evaluator replicas, each its own
`python services/<name>/main.py` process with its own PRUNELAB_GRPC_PORT. The
orchestrator reaches the two evaluators as one target, `ipv4:127.0.0.1:P1,127.0.0.1:P2`
(gRPC's ipv4 resolver takes a list; `prunelab.rpc.make_channel` round-robins
over it), as it reaches a scaled Kubernetes Service through `dns:///evaluator:PORT`.

Least privilege, as compose and Kubernetes set it up: the evaluators' S3 key reads the
bucket and writes only below `results/evaluator/` (PRUNELAB_STORE_WRITE_AREA), the
profiler's only reads; the other services and clients hold the full key.

With `--tls` (`up(tls=True)`) every connection is mutual TLS, with certificates
that `prunelab certs` makes in `<state dir>/certs/` (a client uses `certs/cli`, as
the `client_env` of state.json says); without it, plaintext on 127.0.0.1.

`restart NAME` (`restart`) starts one process again where it was, with the same port,
environment and data, as a container's restart policy would; the fault-matrix tests
kill processes and bring them back with it.

PIDs, ports, environments and the S3 key pair are in `<state dir>/state.json`, logs in
`<state dir>/logs/`. The store's data and the orchestrator's database stay in the
state dir across down/up; delete the folder to start afresh.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import psutil

from prunelab.config import TransportSettings, settings
from prunelab.errors import FailedPrecondition, PrunelabError, Unavailable
from prunelab.rpc import check_health
from prunelab.rpc.certs import issue_certificates
from prunelab.store.base import RESULT_AREAS
from prunelab.store.seaweed import HOST, STOP_GRACE_S, free_ports, scoped_identity, start_seaweed

REPO = Path(__file__).resolve().parents[2]
STATE_DIR = REPO / ".prunelab" / "local-cluster"
DEFAULT_ORCHESTRATOR_PORT = 50051
BUCKET = "prunelab-local"
ACCESS_KEY = "prunelab-local"

# Workers in start order, with their replica count; the orchestrator comes last,
# pointed at them.
WORKERS = {"pruner": 1, "tuner": 1, "evaluator": 2, "profiler": 1}
# Workers with a key of their own: where in the bucket each may write (None: nowhere)
SCOPED_KEYS = {"evaluator": next(iter(RESULT_AREAS)), "profiler": None}
ORCHESTRATOR = "orchestrator"
SEAWEED_DIR = "seaweedfs"  # below the state dir: the store's data, keys and log

READY_TIMEOUT_S = 180.0  # importing torch on a loaded 2-core machine is slow
STOP_TIMEOUT_S = 30.0  # the servers drain for up to 25 s (prunelab.rpc.server)
POLL_S = 0.5
CORES = os.cpu_count() or 1


@dataclass
class Process:
    """One process of the cluster, as recorded in state.json."""

    name: str  # "evaluator-2", "seaweedfs"
    pid: int
    started: float  # psutil's create_time: tells our process from a later one with the same PID
    log: str
    port: int | None = None  # gRPC port; None for SeaweedFS
    health_service: str = ""  # what its health check asks for
    service: str = ""  # "evaluator" for evaluator-2: the entry point it runs
    env: dict[str, str] = field(default_factory=dict)  # set for it on top of the inherited environment

    def handle(self) -> psutil.Process | None:
        """The live process, or None if it has exited (or its PID was reused)."""
        try:
            process = psutil.Process(self.pid)
            if process.create_time() == self.started and process.status() != psutil.STATUS_ZOMBIE:
                return process
        except psutil.NoSuchProcess:
            pass
        return None


@dataclass
class Cluster:
    """What `up` started: the addresses to dial and the store's settings."""

    state_dir: str
    orchestrator: str  # host:port for the CLI
    targets: dict[str, str]  # service -> gRPC target, e.g. evaluator -> ipv4:127.0.0.1:P1,127.0.0.1:P2
    store_env: dict[str, str]  # PRUNELAB_STORE and PRUNELAB_S3_*: what a client needs to reach the store
    metrics: str = ""  # the orchestrator's Prometheus endpoint, http://host:port/metrics
    processes: list[Process] = field(default_factory=list)
    seaweed_ports: dict[str, int] = field(default_factory=dict)  # flag -> port: a restarted store keeps them
    client_env: dict[str, str] = field(default_factory=dict)  # with TLS: PRUNELAB_TLS_DIR of the CLI's certificate
    scoped_secrets: dict[str, str] = field(default_factory=dict)  # service -> the secret of its own S3 key (SCOPED_KEYS)

    def client_transport(self) -> TransportSettings:
        """How a client of this cluster dials it: this process's settings, with the cluster's certificate."""
        tls_dir = self.client_env.get("PRUNELAB_TLS_DIR")
        return replace(settings().transport, tls_dir=Path(tls_dir) if tls_dir else None)

    def save(self) -> None:
        path = state_path(Path(self.state_dir))
        path.write_text(json.dumps(asdict(self), indent=2))
        path.chmod(0o600)  # it holds the S3 secret key

    @classmethod
    def load(cls, state_dir: Path) -> Cluster | None:
        path = state_path(state_dir)
        if not path.is_file():
            return None
        raw = json.loads(path.read_text())
        raw["processes"] = [Process(**p) for p in raw["processes"]]
        return cls(**raw)


def state_path(state_dir: Path) -> Path:
    return state_dir / "state.json"


def health_name(service: str) -> str:
    return f"prunelab.v1.{service.capitalize()}"


def entry_point(service: str) -> Path:
    return REPO / "services" / service / "main.py"


def ipv4_target(ports: list[int]) -> str:
    return "ipv4:" + ",".join(f"{HOST}:{port}" for port in ports)


def up(
    state_dir: Path = STATE_DIR,
    *,
    orchestrator_port: int = DEFAULT_ORCHESTRATOR_PORT,
    python: str = sys.executable,
    ready_timeout: float = READY_TIMEOUT_S,
    tls: bool = False,
) -> Cluster:
    """Start the store and every service, wait until each is healthy, and return
    the cluster. `orchestrator_port` 0 picks a free port; `tls`: mutual TLS everywhere.
    Raises Unavailable (after stopping what it started) if one does not come up."""
    state_dir = state_dir.resolve()
    _refuse_if_running(state_dir)
    logs = state_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)

    # One call, so no two are the same; never the orchestrator's fixed port (free
    # ports come from the ephemeral range, which holds 50051).
    ports = iter([port for port in free_ports(sum(WORKERS.values()) + 3) if port != orchestrator_port])
    orchestrator_port = orchestrator_port or next(ports)
    scoped_secrets = {service: secrets.token_hex(20) for service in SCOPED_KEYS}
    store = start_seaweed(state_dir / SEAWEED_DIR, ACCESS_KEY, secrets.token_hex(20), identities=_scoped_identities(scoped_secrets))
    store.client().make_bucket(BUCKET)  # before any service: the scoped keys may not create it
    cluster = Cluster(
        state_dir=str(state_dir),
        orchestrator=f"{HOST}:{orchestrator_port}",
        targets={},
        store_env={
            "PRUNELAB_STORE": f"s3://{BUCKET}",
            "PRUNELAB_S3_ENDPOINT": store.endpoint,
            "PRUNELAB_S3_ACCESS_KEY": store.access_key,
            "PRUNELAB_S3_SECRET_KEY": store.secret_key,
            "PRUNELAB_S3_SECURE": "false",
        },
        processes=[Process("seaweedfs", store.process.pid, psutil.Process(store.process.pid).create_time(), str(store.log_path),
                           service="seaweedfs")],
        seaweed_ports=dict(store.ports),
        scoped_secrets=scoped_secrets,
    )
    cluster.save()  # from here on, `down` can clean up whatever happens
    try:
        # Every process shares this machine's cores: as many jobs at once as cores, one
        # torch thread each, so concurrent jobs do not oversubscribe the CPU.
        base_env = {**cluster.store_env, "PRUNELAB_GRPC_HOST": HOST, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        tls_env = _certificates(state_dir / "certs", cluster) if tls else lambda _name: {}
        for name in WORKERS:
            replica_ports = [next(ports) for _ in range(WORKERS[name])]
            for index, port in enumerate(replica_ports, start=1):
                label = f"{name}-{index}" if WORKERS[name] > 1 else name
                cluster.processes.append(_spawn(name, label, port, base_env | _store_key(cluster, name) | tls_env(name), logs, python))
            cluster.targets[name] = ipv4_target(replica_ports)
        orchestrator_env = {
            **base_env,
            "PRUNELAB_ORCHESTRATOR_MAX_PARALLEL": os.environ.get("PRUNELAB_ORCHESTRATOR_MAX_PARALLEL", str(CORES)),
            "PRUNELAB_ORCHESTRATOR_DB": str(state_dir / "orchestrator.db"),
            "PRUNELAB_METRICS_PORT": str(metrics_port := next(ports)),
            **{f"PRUNELAB_{name.upper()}_ADDR": target for name, target in cluster.targets.items()},
            **tls_env(ORCHESTRATOR),
        }
        cluster.processes.append(_spawn(ORCHESTRATOR, ORCHESTRATOR, orchestrator_port, orchestrator_env, logs, python))
        cluster.targets[ORCHESTRATOR] = cluster.orchestrator
        cluster.metrics = f"http://{HOST}:{metrics_port}/metrics"
        cluster.save()
        _wait_healthy(cluster, ready_timeout)
    except BaseException:  # Ctrl-C included: leave nothing running
        down(state_dir)
        raise
    return cluster


def _scoped_identities(scoped_secrets: dict[str, str]) -> list[dict]:
    return [scoped_identity(service, f"{ACCESS_KEY}-{service}", secret, BUCKET, SCOPED_KEYS[service])
            for service, secret in scoped_secrets.items()]


def _store_key(cluster: Cluster, service: str) -> dict[str, str]:
    """The S3 key `service` runs with: its own scoped one, if it has one, confined to its area."""
    if service not in cluster.scoped_secrets:
        return {}
    return {"PRUNELAB_S3_ACCESS_KEY": f"{ACCESS_KEY}-{service}", "PRUNELAB_S3_SECRET_KEY": cluster.scoped_secrets[service],
            "PRUNELAB_STORE_WRITE_AREA": SCOPED_KEYS[service] or ""}


def _certificates(folder: Path, cluster: Cluster):
    """A certificate per service and for clients in `folder`; the clients' recorded in
    `cluster`. Returns the environment that puts a service on mutual TLS."""
    issue_certificates(folder, [*WORKERS, ORCHESTRATOR, "cli"], [], days=30)
    cluster.client_env = {"PRUNELAB_TLS_DIR": str(folder / "cli")}
    return lambda name: {"PRUNELAB_TLS_DIR": str(folder / name), "PRUNELAB_TLS_CLIENT_AUTH": "true"}


def _refuse_if_running(state_dir: Path) -> None:
    previous = Cluster.load(state_dir)
    if previous is None:
        return
    running = [p.name for p in previous.processes if p.handle() is not None]
    if running:
        raise FailedPrecondition(f"a local cluster is already running from {state_dir} ({', '.join(running)}); stop it first (make down-local)")
    state_path(state_dir).unlink()  # left by a cluster that died without `down`


def _inherited_environment() -> dict[str, str]:
    """This process's environment, less its TLS settings: the cluster's transport is its own (`tls`)."""
    return {k: v for k, v in os.environ.items() if k not in ("PRUNELAB_TLS_DIR", "PRUNELAB_TLS_CLIENT_AUTH")}


def _spawn(service: str, label: str, port: int, env: dict[str, str], logs: Path, python: str, extra_env: dict[str, str] | None = None) -> Process:
    """Start `service` as `label` on `port` with `env` on top of the inherited environment
    (recorded, for `restart`) and `extra_env` on top of that (this start only)."""
    log_path = logs / f"{label}.log"
    with log_path.open("ab") as log_file:  # a restarted process's log continues its predecessor's
        # A session of its own: a Ctrl-C in the terminal that ran `make up-local`
        # does not reach the services; `down` stops them.
        process = subprocess.Popen(
            [python, str(entry_point(service))],
            cwd=REPO,
            env={**_inherited_environment(), **env, **(extra_env or {}), "PRUNELAB_GRPC_PORT": str(port)},
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Process(label, process.pid, psutil.Process(process.pid).create_time(), str(log_path), port, health_name(service), service, env)


def _wait_healthy(cluster: Cluster, timeout: float, names: set[str] | None = None) -> None:
    """Wait until every service of `cluster` (or those `names`) answers SERVING."""
    transport = cluster.client_transport()
    pending = [p for p in cluster.processes if p.port is not None and (names is None or p.name in names)]
    deadline = time.monotonic() + timeout
    while pending:
        for process in list(pending):
            if process.handle() is None:
                raise Unavailable(f"{process.name} exited during startup; the end of {process.log}:\n{_tail(process.log)}")
            if _health(process, transport) == "SERVING":
                print(f"{process.name:<14} SERVING on {HOST}:{process.port}")
                pending.remove(process)
        if pending and time.monotonic() > deadline:
            names = ", ".join(p.name for p in pending)
            raise Unavailable(f"not healthy within {timeout:.0f} s: {names}; logs in {Path(cluster.state_dir) / 'logs'}")
        if pending:
            time.sleep(POLL_S)


def _health(process: Process, transport: TransportSettings) -> str:
    try:
        return check_health(f"{HOST}:{process.port}", process.health_service, timeout=2.0, transport=transport)
    except Unavailable:
        return "UNREACHABLE"


def _tail(path: str, lines: int = 20) -> str:
    return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])


def down(state_dir: Path = STATE_DIR, timeout: float = STOP_TIMEOUT_S) -> list[str]:
    """Stop every process `up` recorded (SIGTERM, then SIGKILL after `timeout`
    seconds, the store after STOP_GRACE_S): the services first, the store last, so
    draining calls can still reach it. Returns the names of the processes that were still running."""
    state_dir = state_dir.resolve()
    cluster = Cluster.load(state_dir)
    if cluster is None:
        return []
    services = [p for p in cluster.processes if p.port is not None]
    store = [p for p in cluster.processes if p.port is None]
    stopped = _stop(services, timeout) + _stop(store, STOP_GRACE_S, warn=False)
    # weed's gRPC listeners leave Unix sockets in /tmp named by port (see prunelab.store.seaweed)
    for port in cluster.seaweed_ports.values():
        for leftover in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
            leftover.unlink(missing_ok=True)
    state_path(state_dir).unlink()
    return stopped


def _stop(processes: list[Process], timeout: float, *, warn: bool = True) -> list[str]:
    running = {p.name: handle for p in processes if (handle := p.handle()) is not None}
    for handle in running.values():
        handle.terminate()
    _, still_running = psutil.wait_procs(list(running.values()), timeout=timeout)
    for handle in still_running:
        if warn:
            print(f"pid {handle.pid} ignored SIGTERM for {timeout:.0f} s; killing it")
        handle.kill()
    psutil.wait_procs(still_running, timeout=timeout)
    return list(running)


def restart(
    state_dir: Path,
    name: str,
    *,
    extra_env: dict[str, str] | None = None,
    python: str = sys.executable,
    ready_timeout: float = READY_TIMEOUT_S,
) -> Process:
    """Start the exited process `name` ("pruner", "evaluator-2", "seaweedfs") again as
    `up` started it: same port, environment and data, `extra_env` added for this start
    only. Returns once it is healthy (the store: once it answers S3 calls).
    Raises FailedPrecondition if there is no such process or it is still running."""
    state_dir = state_dir.resolve()
    cluster = Cluster.load(state_dir)
    old = next((p for p in cluster.processes if p.name == name), None) if cluster is not None else None
    if old is None:
        raise FailedPrecondition(f"no process named {name!r} in the local cluster at {state_dir}")
    if (running := old.handle()) is not None:
        raise FailedPrecondition(f"{name} is still running (pid {running.pid}); stop it first")
    if old.port is None:
        store = start_seaweed(state_dir / SEAWEED_DIR, ACCESS_KEY, cluster.store_env["PRUNELAB_S3_SECRET_KEY"],
                              ready_timeout=ready_timeout, ports=cluster.seaweed_ports,
                              identities=_scoped_identities(cluster.scoped_secrets))
        new = replace(old, pid=store.process.pid, started=psutil.Process(store.process.pid).create_time())
    else:
        new = _spawn(old.service, name, old.port, old.env, Path(old.log).parent, python, extra_env)
    cluster.processes = [new if p.name == name else p for p in cluster.processes]
    cluster.save()
    if new.port is not None:
        _wait_healthy(cluster, ready_timeout, {name})
    return new


def status(state_dir: Path = STATE_DIR) -> dict[str, str]:
    """Each recorded process's state: its health status name ("SERVING", ...),
    "running" for the store, or "exited". Empty if no cluster was started."""
    cluster = Cluster.load(state_dir.resolve())
    if cluster is None:
        return {}
    states = {}
    for process in cluster.processes:
        if process.handle() is None:
            states[process.name] = "exited"
        else:
            states[process.name] = _health(process, cluster.client_transport()) if process.port is not None else "running"
    return states


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="deploy/local/cluster.py", description=__doc__.splitlines()[0])
    parser.add_argument("--state-dir", type=Path, default=STATE_DIR, help="PIDs, logs, store data (default %(default)s)")
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("up", help="start the cluster and wait until every service is healthy")
    start.add_argument("--orchestrator-port", type=int, default=DEFAULT_ORCHESTRATOR_PORT, help="0: any free port (default %(default)s)")
    start.add_argument("--timeout", type=float, default=READY_TIMEOUT_S, help="seconds to wait for health (default %(default)s)")
    start.add_argument("--tls", action="store_true", help="mutual TLS between every process (certificates in STATE_DIR/certs)")
    commands.add_parser("down", help="stop every process of the cluster")
    again = commands.add_parser("restart", help="start one exited process again (same port, environment, data)")
    again.add_argument("name", help="a process name from `status`: pruner, evaluator-2, seaweedfs, ...")
    commands.add_parser("status", help="each process's health")
    args = parser.parse_args(argv)

    if args.command == "up":
        try:
            cluster = up(args.state_dir, orchestrator_port=args.orchestrator_port, ready_timeout=args.timeout, tls=args.tls)
        except PrunelabError as err:
            print(f"up-local: {err.reason}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("up-local: interrupted; stopped what had started", file=sys.stderr)
            return 130
        print(f"store: {cluster.store_env['PRUNELAB_STORE']} at http://{cluster.store_env['PRUNELAB_S3_ENDPOINT']}")
        print(f"logs:  {Path(cluster.state_dir) / 'logs'}")
        client = "".join(f"{key}={value} " for key, value in cluster.client_env.items())
        print(f"orchestrator: {cluster.orchestrator}   ({client}prunelab run STUDY.yaml --orchestrator {cluster.orchestrator})")
        print(f"metrics: {cluster.metrics}")
        print("stop it with: make down-local")
        return 0
    if args.command == "restart":
        try:
            process = restart(args.state_dir, args.name)
        except PrunelabError as err:
            print(f"restart: {err.reason}", file=sys.stderr)
            return 1
        print(f"{process.name} restarted (pid {process.pid})")
        return 0
    if args.command == "down":
        stopped = down(args.state_dir)
        print(f"stopped: {', '.join(stopped)}" if stopped else "no local cluster was running")
        return 0
    states = status(args.state_dir)
    if not states:
        print("no local cluster (make up-local)")
        return 1
    for name, state in states.items():
        print(f"{name:<14} {state}")
    return 0 if all(state in ("SERVING", "running") for state in states.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
