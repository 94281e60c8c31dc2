"""--ray: the studio's replicas as Ray Serve deployments.

The slow tests start a real Ray head (`ray start --head --block`, two CPUs, no dashboard, its
session folder under /tmp of its own) and the real server (`python app.py --ray 127.0.0.1:PORT
--ray-replicas 2` with the tiny model on the CPU) once for the module, and drive it with
gradio_client and /metrics: two replicas share the jobs, cancel reaches a replica, a replica
killed under a job is replaced by Serve while the job runs again on the other one, and stopping
the studio stops the replicas. Ray's processes end with the module (the head's process group).

The fast tests need no cluster: Ray's errors as the package's one-sentence errors, the settings,
and that the default path never imports Ray.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from .support import App, free_port, metric, run_python, submit, wait_until

ROOT = Path(__file__).resolve().parents[1]
# Ray turns token authentication on when ~/.ray/auth_token exists (a `ray.init()` of its own writes
# one): the head and the studio here agree on "off", whatever this machine has seen before.
RAY_ENV = {"RAY_AUTH_MODE": "disabled"}
RAY = Path(sys.executable).with_name("ray")

# A job of a second or more on a busy CPU (killed under it, it must be retried), and a long one (cancelled).
LONG = dict(width=256, height=256, steps=40, count=6)
HUGE = dict(width=512, height=512, steps=50, count=8)


# ------------------------------------------------------------------------------------------
# Ray's errors, the settings, the default path (no cluster)


def test_ray_errors_become_one_sentence():
    pytest.importorskip("ray")
    from ray import exceptions as rx
    from ray.serve import exceptions as sx

    from zimage.errors import Cancelled, GenerationFailed, NotReady, OutOfMemory, ReplicaFailed
    from zimage.service.ray_errors import ReplicaLost, explain

    # a replica's own error arrives wrapped (as the handle raises it) and comes out as itself
    oom = OutOfMemory("Out of GPU memory at 2048x2048 with 8 image(s). Try a smaller size.")
    wrapped = rx.RayTaskError("generate", "Traceback (most recent call last): ...", oom).as_instanceof_cause()
    got = explain(wrapped, "10.0.0.5:6379")
    assert type(got) is OutOfMemory and str(got) == str(oom)

    # a runner error that is not ours passes through as itself too (the engine words it)
    boom = RuntimeError("shape mismatch")
    assert explain(rx.RayTaskError("generate", "tb", boom).as_instanceof_cause()) is boom

    # the replica died under the job (killed, its box gone, or its GPU broken): run it elsewhere
    for died in (
        rx.ActorDiedError(),
        rx.ActorUnavailableError("unavailable", b"\x00" * 16),
        sx.ReplicaUnavailableError("abc"),
        rx.WorkerCrashedError(),
        rx.NodeDiedError("node gone"),
        rx.RayTaskError("generate", "tb", ReplicaFailed("unrecoverable CUDA error")).as_instanceof_cause(),
    ):
        assert isinstance(explain(died), ReplicaLost), died

    assert isinstance(explain(sx.RequestCancelledError("r1")), Cancelled)
    assert isinstance(explain(rx.TaskCancelledError()), Cancelled)

    unavailable = explain(sx.DeploymentUnavailableError("zimage"))
    assert isinstance(unavailable, NotReady) and "serve status" in str(unavailable)

    lost = explain(rx.RaySystemError("GCS unreachable\nTraceback ..."), "10.0.0.5:6379")
    assert isinstance(lost, GenerationFailed)
    text = str(lost)
    assert "10.0.0.5:6379" in text and "ray status" in text and "Traceback" not in text and "\n" not in text

    plain = ValueError("not Ray's")
    assert explain(plain) is plain


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("", True),
        ("auto", True),
        ("local", True),
        ("10.0.0.5:6379", True),
        ("head.example:6379", True),
        ("ray://10.0.0.5:10001", True),
        ("10.0.0.5", False),
        ("10.0.0.5:port", False),
        (":6379", False),
    ],
)
def test_ray_address_setting(value, ok):
    from zimage.errors import SettingsError
    from zimage.settings import from_sources

    if ok:
        assert from_sources(cli={"ray": value}, environ={}).ray == value
    else:
        with pytest.raises(SettingsError, match="Setting 'ray' must be auto, local, HOST:PORT"):
            from_sources(cli={"ray": value}, environ={})


def test_ray_replica_settings():
    from zimage.errors import SettingsError
    from zimage.settings import from_sources

    s = from_sources(cli={"ray": "auto", "ray_replicas": "3"}, environ={"ZIMAGE_RAY_MAX_REPLICAS": "4"})
    assert (s.ray_replicas, s.ray_max_replicas) == ("3", 4)
    with pytest.raises(SettingsError, match="'ray_replicas' must be auto or a whole number"):
        from_sources(cli={"ray": "auto", "ray_replicas": "two"}, environ={})
    with pytest.raises(SettingsError, match="'ray_max_replicas' must be at least 1"):
        from_sources(cli={"ray": "auto", "ray_max_replicas": "0"}, environ={})
    with pytest.raises(SettingsError, match="each Ray replica has one GPU"):
        from_sources(cli={"ray": "auto", "memory_mode": "multi-gpu"}, environ={})
    for local in ({"replicas": "2"}, {"gpus": "0,1"}):
        with pytest.raises(SettingsError, match="use --ray-replicas instead"):
            from_sources(cli={"ray": "auto", **local}, environ={})


def test_ray_pool_plans_from_the_settings(make_settings):
    """What the page's concurrency and the banner read before Ray is reached (nothing connects here)."""
    pytest.importorskip("ray")
    from zimage.service.ray_serve import RayPool

    fixed = RayPool(make_settings(ray="auto", ray_replicas="2"))
    assert fixed.size == 2
    assert fixed.deployment_options(cluster_gpus=8)["num_replicas"] == 2
    assert fixed.deployment_options(cluster_gpus=8)["ray_actor_options"]["num_gpus"] == 0  # --device cpu

    auto = RayPool(make_settings(ray="10.0.0.5:6379", device="cuda", ray_max_replicas=6))
    assert auto.size == 6
    opts = auto.deployment_options(cluster_gpus=4)
    assert opts["ray_actor_options"]["num_gpus"] == 1
    scaling = opts["autoscaling_config"]
    assert (scaling["min_replicas"], scaling["max_replicas"], scaling["target_ongoing_requests"]) == (4, 6, 1)
    assert auto.replica_settings().device == "cuda" and auto.replica_settings().ray == ""
    assert "10.0.0.5:6379" in auto.plan.describe()
    assert auto.status() == [] and auto.waiting == 0  # not connected: Ray is not asked (it would start a cluster)


@pytest.mark.slow
def test_the_default_path_never_imports_ray(tmp_path):
    code = "\n".join(
        [
            f"import sys; sys.path.insert(0, {str(ROOT)!r})",
            "from zimage.settings import Settings",
            "from zimage.web.server import create_app",
            f"create_app(Settings(model='tiny', device='cpu', outputs_dir={str(tmp_path / 'out')!r}))",
            "print('RAY' if any(m == 'ray' or m.startswith('ray.') for m in sys.modules) else 'NO RAY')",
        ]
    )
    r = run_python(["-c", code], cwd=tmp_path, env={"GRADIO_TEMP_DIR": str(tmp_path / "gradio")})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "NO RAY"


# ------------------------------------------------------------------------------------------
# a real Ray head and the real server on it


class RayHead:
    """`ray start --head --block` in a process group of its own, on free ports, two CPUs."""

    def __init__(self) -> None:
        # Ray's socket paths must stay under 108 characters: a short folder of our own in /tmp
        self.temp = Path(tempfile.mkdtemp(prefix="zr-", dir="/tmp"))
        self.port = free_port()
        ports = [free_port() for _ in range(3)]
        cmd = [
            str(RAY),
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={self.port}",
            f"--ray-client-server-port={ports[0]}",
            f"--dashboard-agent-listen-port={ports[1]}",
            f"--dashboard-agent-grpc-port={ports[2]}",
            "--num-cpus=2",
            "--num-gpus=0",
            "--include-dashboard=false",
            "--object-store-memory=100000000",
            f"--temp-dir={self.temp}",
            "--disable-usage-stats",
        ]
        env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", **RAY_ENV)
        self.log_path = self.temp / "head.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        end = time.monotonic() + 120
        while "Ray runtime started" not in self.log():
            if self.proc.poll() is not None or time.monotonic() > end:
                self.stop()
                raise AssertionError(f"ray start failed:\n{self.log()[-3000:]}")
            time.sleep(0.2)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        """End `ray start` and its whole process tree (Ray's workers run in sessions of their own,
        so its process group is not enough)."""
        import psutil

        try:
            tree = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            tree = []
        # The studio deleted its deployment already; nothing here needs a graceful stop (which
        # drains the node for up to 30 s): terminate the tree, and kill what does not go at once.
        procs = [psutil.Process(self.proc.pid), *tree] if self.proc.poll() is None else tree
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.terminate()
        _, left = psutil.wait_procs(procs, timeout=5)
        for p in left:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        psutil.wait_procs(left, timeout=10)
        self.proc.wait(10)
        shutil.rmtree(self.temp, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_head():
    pytest.importorskip("ray.serve")
    head = RayHead()
    yield head
    head.stop()


@pytest.fixture(scope="module")
def ray_server(ray_head, tmp_path_factory, tiny_dir):
    with pytest.MonkeyPatch.context() as mp:  # App passes the environment on to the studio
        for k, v in RAY_ENV.items():
            mp.setenv(k, v)
        app = App(tmp_path_factory.mktemp("ray-server"), tiny_dir, "--ray", ray_head.address, "--ray-replicas", "2")
    try:
        yield app.wait_ready(timeout=240)
    finally:
        if app.proc.poll() is None:
            app.stop()


def replicas(server) -> dict[str, dict[str, float]]:
    """{replica: {"state": ..., "pid": ...}} from /metrics."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    rows: dict[str, dict] = {}
    for family in text_string_to_metric_families(httpx.get(server.base + "/metrics", timeout=10).text):
        for s in family.samples:
            name = s.labels.get("replica")
            if s.name == "zimage_replica_state" and s.value == 1:
                rows.setdefault(name, {})["state"] = s.labels["state"]
            elif s.name == "zimage_replica_pid":
                rows.setdefault(name, {})["pid"] = int(s.value)
    return {k: v for k, v in rows.items() if "state" in v}


def new_client(server):
    from gradio_client import Client

    return Client(server.base, verbose=False)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
def test_two_ray_replicas_share_the_jobs(ray_server):
    rows = wait_until(lambda: (r := replicas(ray_server)) and len(r) == 2 and r, 30, "two replicas on /metrics")
    assert all(name.startswith("ray-") and row["state"] == "ready" for name, row in rows.items()), rows
    assert all(row.get("pid") for row in rows.values()), rows  # each was asked who it is at start
    ready = ray_server.observed[-1][3]
    assert ready["memory_mode"] == "cpu" and ready["device"] == "CPU", ready
    clients = [new_client(ray_server) for _ in range(2)]  # connected first: a connect can outlast a job
    jobs = [submit(c, seed=10 + i, **LONG) for i, c in enumerate(clients)]
    results = [job.result(timeout=180) for job in jobs]
    for (gallery, details), i in zip(results, range(2)):
        assert len(gallery) == LONG["count"] and details["seeds"][0] == 10 + i
        assert details["device"] == "CPU" and Path(ray_server.outputs, details["files"][0]).is_file()
    ran_on = {details["replica"] for _, details in results}
    assert ran_on == set(rows), (ran_on, rows)  # both replicas took one: the two jobs ran side by side
    assert metric(ray_server.base, "zimage_requests_total", {"outcome": "ok"}) == 2


@pytest.mark.slow
def test_cancel_reaches_the_ray_replica(ray_server):
    job = submit(new_client(ray_server), seed=20, **HUGE)
    wait_until(lambda: any(r["state"] == "busy" for r in replicas(ray_server).values()), 60, "the job to start")
    t0 = time.monotonic()
    job.cancel()
    wait_until(lambda: "outcome=cancelled" in ray_server.log(), 30, "the cancelled request's log line")
    wait_until(lambda: all(r["state"] == "ready" for r in replicas(ray_server).values()), 30, "the replica to be free")
    assert time.monotonic() - t0 < 30
    assert "seed=20 outcome=ok" not in ray_server.log()


@pytest.mark.slow
def test_a_killed_replica_is_replaced_and_its_job_runs_elsewhere(ray_server):
    before = replicas(ray_server)
    job = submit(new_client(ray_server), seed=30, **LONG)
    busy = wait_until(
        lambda: [(n, r["pid"]) for n, r in replicas(ray_server).items() if r["state"] == "busy"],
        60,
        "the job to start on a replica",
        interval=0.02,
    )
    ((victim, pid),) = busy
    os.kill(pid, signal.SIGKILL)  # the replica's Ray worker process, as a crash or the OOM killer would

    gallery, details = job.result(timeout=180)  # accepted, so not lost: it ran again on the other replica
    assert len(gallery) == LONG["count"] and details["seeds"][0] == 30
    assert any(f"The replica {victim} stopped while running this job" in note for note in details["notes"])
    log = ray_server.log()
    assert f"replica {victim} died under it" in log and "seed=30 outcome=ok" in log

    # Serve replaces the dead replica: two replicas again, a new one among them
    rows = wait_until(
        lambda: (
            (r := replicas(ray_server))
            and len(r) == 2
            and victim not in r
            and all(row["state"] == "ready" for row in r.values())
            and r
        ),
        150,
        "Serve to replace the killed replica",
        interval=0.5,
    )
    assert set(rows) - set(before), (rows, before)
    assert not alive(pid)
    gallery, details = new_client(ray_server).predict("a kite", "", 64, 64, 2, 0.0, 31, 1, api_name="/generate")
    assert details["seeds"] == [31]


@pytest.mark.slow
def test_stopping_the_studio_stops_its_replicas(ray_server):
    # the replacement of an earlier test's killed replica may still be starting (a state, no pid yet)
    ready = lambda: [r["pid"] for r in replicas(ray_server).values() if r["state"] == "ready" and "pid" in r]  # noqa: E731
    wait_until(lambda: len(ready()) == 2, 120, "two ready replicas with their pids")
    pids = ready()
    assert ray_server.stop() == 0
    assert "Ray Serve: the zimage replicas are stopped" in ray_server.log()
    wait_until(lambda: not any(alive(p) for p in pids), 30, "the replica processes to end")
