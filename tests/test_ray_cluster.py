"""`python -m analysis sweep --address` on an existing Ray cluster, as a user runs it: a head node
started with `ray start` in its own processes, with token authentication (Ray's default for the
clusters it starts), reached by its GCS address (host:port) and by a Ray Client address
(ray://host:port). The runs equal the same sweep in one process; without the token the command
stops with one line that says what to set."""
import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import tiny_sweep_base

from analysis.store import RunStore

pytest.importorskip("ray")
ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if process.poll() is not None:
            raise RuntimeError(f"ray start exited with {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"nothing answered at port {port} within {timeout} s")


def without_ray_auth(env: dict) -> dict:
    return {k: v for k, v in env.items() if not k.startswith("RAY_AUTH")}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A one-node cluster with 2 CPUs and token authentication, in its own process group; yields
    (GCS port, Ray Client port, token)."""
    token = secrets.token_hex(32)
    env = {**without_ray_auth(os.environ), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
           "RAY_memory_monitor_refresh_ms": "0"}
    folder = tmp_path_factory.mktemp("ray")
    for attempt in range(3):  # a port free_port found may be taken by one of Ray's own processes meanwhile
        gcs, client = free_port(), free_port()
        log = (folder / f"head-{attempt}.log").open("w")
        head = subprocess.Popen(
            [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", "--port", str(gcs),
             "--ray-client-server-port", str(client), "--num-cpus", "2", "--include-dashboard", "false",
             "--disable-usage-stats"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        try:
            wait_for_port(client, head)
            time.sleep(5)  # `ray start --block` ends its node when one of its processes failed to start
            if head.poll() is None:
                break
        except (RuntimeError, TimeoutError):
            if attempt == 2:
                raise
        _stop_head(head, log, gcs)
    else:
        raise RuntimeError(f"ray start's node ended at once, 3 times (logs in {folder})")
    try:
        yield gcs, client, token
    finally:
        _stop_head(head, log, gcs)


def _stop_head(head: subprocess.Popen, log, gcs: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # (a node that ended may leave processes in its group)
        os.killpg(head.pid, signal.SIGKILL)  # SIGTERM would drain the node for 30 s first
    head.wait(timeout=60)
    log.close()
    latest = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"  # where `ray start` names its cluster
    if latest.exists() and latest.read_text().strip().endswith(f":{gcs}"):
        latest.unlink()


@pytest.fixture(scope="module")
def sweep_args(tmp_path_factory):
    base = tiny_sweep_base(tmp_path_factory.mktemp("cluster-sweep"))
    return ["--model", base.model.source, "--calib", base.calibration.source,
            "--nsamples", str(base.calibration.n_samples), "--seqlen", str(base.calibration.seqlen),
            "--eval", base.evaluation.source, "--eval-seqlen", str(base.evaluation.seqlen),
            "--max-windows", str(base.evaluation.max_windows), "--methods", "wanda",
            "--allocations", "uniform,alphapruning", "--sparsities", "0.5", "--seeds", "0"]


def sweep(args: list, db: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "analysis", "sweep", *args, "--db", str(db)], capture_output=True,
                          text=True, cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)}, timeout=600)


def perplexities(db: Path) -> dict:
    store = RunStore(db)
    return {r["sweep"]["key"]: r["pruned_ppl"] for r in map(store.get, store.all()["id"])}


def assert_same_runs(db: Path, expected: dict) -> None:
    """The sweep stored in `db` has the 2 configurations of `expected`, with the same perplexities."""
    there = perplexities(db)
    assert there.keys() == expected.keys() and len(there) == 2
    for key, ppl in expected.items():
        assert there[key] == pytest.approx(ppl, rel=1e-5)


@pytest.fixture(scope="module")
def in_process(sweep_args, tmp_path_factory):
    db = tmp_path_factory.mktemp("here") / "runs.sqlite"
    p = sweep(sweep_args, db, without_ray_auth(os.environ))
    assert p.returncode == 0, p.stderr[-2000:]
    assert "on this process" in p.stderr
    return perplexities(db)


@pytest.mark.parametrize("scheme", ["gcs", "client"])
def test_sweep_on_an_existing_cluster_equals_in_process(cluster, sweep_args, in_process, tmp_path, scheme):
    gcs, client, token = cluster
    address = f"127.0.0.1:{gcs}" if scheme == "gcs" else f"ray://127.0.0.1:{client}"
    db = tmp_path / "runs.sqlite"
    p = sweep([*sweep_args, "--address", address], db,
              {**without_ray_auth(os.environ), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token})
    assert p.returncode == 0, p.stderr[-2000:]
    assert f"on Ray at {address}" in p.stderr
    assert_same_runs(db, in_process)


def test_a_local_ray_sweep_beside_a_running_cluster(cluster, sweep_args, in_process, tmp_path):
    """`--workers 2` starts a Ray of its own, even where `ray start` runs a cluster on this machine (which
    a bare ray.init() would join, refusing the CPU count)."""
    db = tmp_path / "runs.sqlite"
    p = sweep([*sweep_args, "--workers", "2"], db, without_ray_auth(os.environ))
    assert p.returncode == 0, p.stderr[-2000:]
    assert "on local Ray, 2 workers" in p.stderr
    assert_same_runs(db, in_process)


def test_without_the_token_the_sweep_stops_with_one_line(cluster, sweep_args, tmp_path):
    gcs, _, _ = cluster
    db = tmp_path / "runs.sqlite"
    p = sweep([*sweep_args, "--address", f"127.0.0.1:{gcs}"], db, without_ray_auth(os.environ))
    assert p.returncode == 2, p.stderr[-2000:]
    error = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1
    assert error[0].startswith(f"error: --address: cannot connect to a Ray cluster at 127.0.0.1:{gcs}")
    assert "RAY_AUTH_MODE=token" in error[0]
    assert not db.exists() or len(RunStore(db)) == 0
