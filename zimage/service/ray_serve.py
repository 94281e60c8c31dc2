"""Replicas past one box: the studio's pool when `--ray ADDRESS|auto|local` is set.

The studio stays one web process. It connects to a Ray cluster as a driver, runs the
`ZImageReplica` Serve deployment (zimage.service.ray_replica: one pipeline per replica, one GPU
each) and sends every job through the deployment handle, streaming progress back. What a
cluster scheduler does is Ray's, not ours: placing replicas on GPUs of any box that joined with
`ray start --address ...`, routing a job to a free replica (the shared queue lives in Serve's
router, one job per replica at a time), scaling the replica count between the cluster's GPUs at
start and `--ray-max-replicas` when jobs queue, health checks, and replacing a replica that died.

What stays here: deploying (with the loading banner's stages; joining the cluster, the Serve
options and reading the replica list are in ray_cluster.py), cancel (the handle cancels the
request, the replica cancels the job after its current step), turning Ray's errors into the
package's one-sentence errors (ray_errors.py), and one retry: a job whose replica died under it
runs once more on another replica (Serve has already replaced the dead one or routes around it);
if that one dies too, the user gets a clear message.

Ray is imported only by these modules, and only when --ray is set: the single-GPU default never
imports it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from zimage.errors import Cancelled, ReplicaFailed, ShuttingDown, ZImageError
from zimage.service import ray_cluster
from zimage.service.payload import from_payload, last_run, relay_progress
from zimage.service.ray_errors import ReplicaLost, cause_line, explain, first_line

if TYPE_CHECKING:  # pragma: no cover
    from zimage.ops.profiler import LoadTimeline
    from zimage.service.jobs import Job
    from zimage.service.request import GenerationRequest
    from zimage.service.result import GenerationResult
    from zimage.settings import Settings

log = logging.getLogger(__name__)

CANCEL_POLL_S = 0.05  # how often the cancel watcher looks at the jobs in flight
STATUS_EVERY_S = 2.0  # how often the replica list is read from Ray (the panel ticks each second)
MAX_TRIES = 2  # a job whose replica died runs once more on another replica
LEARN_HOLD_S = 0.3  # how long each "who are you" call at start holds its replica
CLOSE_TIMEOUT_S = 30.0  # deleting the deployment at shutdown: Ray's own calls have no timeout


@dataclass(frozen=True)
class RayPlan:
    """The replica plan with --ray (what the engine's status and the page's concurrency read)."""

    size: int  # jobs in flight at once: the fixed replica count, or the autoscaling maximum
    address: str
    replicas: str  # "auto" or N

    def describe(self) -> str:
        count = f"autoscaling up to {self.size}" if self.replicas == "auto" else f"{self.size}"
        return f"{count} Ray Serve replica(s) on the Ray cluster at {self.address}, one GPU each"


@dataclass
class _InFlight:
    job: Job
    response: Any  # the DeploymentResponseGenerator
    started: bool = False
    told: bool = False  # cancel already sent


@dataclass
class _Seen:
    """A replica as the studio knows it: from its answers (who, where, last run, VRAM)."""

    identity: dict[str, Any]
    jobs_done: int = 0
    last_run: dict[str, Any] | None = None
    vram: dict[str, Any] | None = None
    memory_mode: str | None = None
    busy_with: str | None = None
    seen: float = field(default_factory=time.time)


class RayPool:
    """The pool the engine uses with --ray (the ReplicaPool's surface: start, run, status, size,
    waiting, running, drain, close)."""

    kind = "ray"

    def __init__(self, settings: Settings, timeline: LoadTimeline | None = None):
        self.settings = settings
        self.timeline = timeline
        self.address = settings.ray
        self.accepting = True
        self.handle: Any = None
        self.min_replicas = 0
        self.max_replicas = 0
        self.lost = 0  # jobs whose replica died under them (each retried once)
        self._lock = threading.Lock()
        self._inflight: dict[str, _InFlight] = {}
        self._seen: dict[str, _Seen] = {}
        self._connected = False
        self._states: dict[str, int] = {}
        self._alive: list[str] = []
        self._closed = threading.Event()
        size = settings.ray_max_replicas if settings.ray_replicas == "auto" else int(settings.ray_replicas)
        self.plan = RayPlan(size, self.address, settings.ray_replicas)

    # --- shape --------------------------------------------------------------------------

    @property
    def size(self) -> int:
        """Jobs that may be in flight at once (Gradio's concurrency): Serve queues what its
        replicas cannot take yet, and sees the queue to scale up."""
        return self.plan.size

    @property
    def replicas(self) -> list[Any]:
        return []

    @property
    def waiting(self) -> int:
        with self._lock:
            return sum(1 for f in self._inflight.values() if not f.started)

    @property
    def running(self) -> list[Job]:
        with self._lock:
            return [f.job for f in self._inflight.values() if f.started]

    # --- start --------------------------------------------------------------------------

    def start(self) -> None:
        """Connect to the cluster and run the deployment; returns once its replicas are loaded."""
        # Before Ray is imported (it reads this at import): Ray's C++ failure handler would take
        # SIGTERM as a crash and abort the process 3 s later, cutting the graceful drain short.
        os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
        from zimage.service import ray_replica

        stage = self._begin("connect to Ray")
        ray = ray_cluster.connect(self.address)
        self._connected = True
        gpus = int(ray.cluster_resources().get("GPU", 0))
        nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
        self._end(stage, f"{self.address}: {nodes} node(s), {gpus} GPU(s)")
        options = self.deployment_options(gpus)
        stage = self._begin("start replicas on Ray Serve")
        from ray import serve

        serve.start(proxy_location="Disabled")  # no HTTP ingress: the studio calls through the handle
        app = ray_replica.ZImageReplica.options(**options).bind(self.replica_settings())
        poll = threading.Thread(target=self._follow_start, args=(stage,), name="ray-start", daemon=True)
        poll.start()
        try:
            self.handle = serve.run(app, name=ray_replica.APP_NAME, route_prefix=None)
        except Exception as exc:  # noqa: BLE001 - Serve's text is a traceback; one sentence instead
            raise ZImageError(
                f"Ray Serve could not start the zimage replicas: {cause_line(exc)} "
                "(`serve status` on the head box shows more)."
            ) from None
        finally:
            self._closed.set()
            poll.join()
            self._closed.clear()
        self._learn_replicas()
        self._end(stage, self._replica_text())
        # Cancels and the replica list each on a thread of their own: a Ray call without an answer
        # (Ray's own calls have no timeout) holds neither a cancel nor the page's live panel.
        for target, name in ((self._watch_cancels, "ray-cancel"), (self._watch_replicas, "ray-status")):
            threading.Thread(target=target, name=name, daemon=True).start()
        log.info("Ray Serve: %s", self._replica_text())

    def _learn_replicas(self) -> None:
        """Ask every replica who it is (device, memory mode, load time, pid): the panel and /metrics
        list them before their first job. Each call holds its replica a moment, so Serve, which gives
        a replica one request at a time, sends each call to a different one."""
        calls = [self.handle.status.remote(LEARN_HOLD_S) for _ in range(self.min_replicas)]
        for call in calls:
            try:
                row = call.result(timeout_s=60)
            except Exception as exc:  # noqa: BLE001 - only for the panel; a replica's first job tells us too
                log.warning("Ray Serve: could not ask a replica who it is (%s)", first_line(exc))
                continue
            with self._lock:
                self._seen.setdefault(row.get("name", "ray"), _Seen(_identity(row), memory_mode=row.get("memory_mode")))

    def deployment_options(self, cluster_gpus: int) -> dict[str, Any]:
        """Serve options (ray_cluster.deployment_options); keeps the least and most replicas."""
        options, self.min_replicas, self.max_replicas = ray_cluster.deployment_options(self.settings, cluster_gpus)
        return options

    def replica_settings(self) -> Settings:
        """What each replica loads with (ray_cluster.replica_settings)."""
        return ray_cluster.replica_settings(self.settings)

    def _follow_start(self, stage: Any) -> None:
        """While serve.run waits: the banner shows how many replicas are up."""
        while not self._closed.wait(0.5):
            states, _ = self._observe()
            up = states.get("RUNNING", 0)
            if self.timeline is not None and self.min_replicas:
                self.timeline.progress(min(0.99, up / self.min_replicas))

    # --- jobs ---------------------------------------------------------------------------

    def run(self, request: GenerationRequest, job: Job, progress: Any) -> GenerationResult:
        """Run the job on a free replica (Serve picks it; the job waits in Serve's queue until one
        is free); once more on another replica when its replica died under it."""
        if not self.accepting:
            raise ShuttingDown("The server is shutting down; this job did not start.")
        notes: list[str] = []
        for attempt in range(1, MAX_TRIES + 1):
            try:
                result = self._run_once(request, job, progress)
            except ReplicaLost as lost:
                self.lost += 1
                who = job.replica or "a replica"
                if attempt >= MAX_TRIES or job.cancelled or not self.accepting:
                    log.error("job %s: replica %s died again (%s); giving up", job.id, who, lost)
                    raise ReplicaFailed(
                        f"The Ray replica running your job stopped ({lost}), and so did the one it was retried on; "
                        "Ray Serve is starting new ones. Please try again in a minute."
                    ) from None
                log.warning(
                    "job %s: replica %s died under it (%s); running it again on another replica", job.id, who, lost
                )
                notes.append(f"The replica {who} stopped while running this job; it ran again on another replica.")
                job.step = 0
                continue
            result.notes[:0] = notes
            return result
        raise AssertionError("unreachable")  # pragma: no cover

    def _run_once(self, request: GenerationRequest, job: Job, progress: Any) -> GenerationResult:
        if job.cancelled:
            raise Cancelled("Cancelled before it started.")
        job.state = "queued"
        response = self.handle.options(stream=True).generate.remote(request, job.id)
        flight = _InFlight(job, response)
        with self._lock:
            self._inflight[job.id] = flight
        seen: _Seen | None = None
        t0 = time.perf_counter()
        outcome = "error"
        try:
            for event in response:
                kind = event[0]
                if kind == "progress":
                    relay_progress(job, progress, *event[1:])
                elif kind == "start":
                    seen = self._started(flight, event[1])
                    t0 = time.perf_counter()
                elif kind == "result":
                    result = from_payload(event[1], request, job, event[1]["replica"].get("name", ""))
                    outcome = "ok"
                    if seen is not None:
                        seen.jobs_done += 1
                        seen.vram = event[1].get("vram") or seen.vram
                        seen.memory_mode = result.memory_mode
                    return result
            raise ReplicaLost("the replica ended the job without a result")
        except ReplicaLost:
            raise
        except BaseException as exc:  # noqa: BLE001 - Ray's errors become ours; ours pass through
            mapped = explain(exc, self.address)
            if isinstance(mapped, Cancelled) or job.cancelled:
                outcome = "cancelled"
                raise (mapped if isinstance(mapped, Cancelled) else Cancelled("Cancelled.")) from None
            if mapped is exc:
                raise
            raise mapped from None
        finally:
            with self._lock:
                self._inflight.pop(job.id, None)
            if seen is not None:
                seen.busy_with = None
                seen.last_run = last_run(t0, outcome, request)

    def _started(self, flight: _InFlight, identity: dict[str, Any]) -> _Seen:
        job = flight.job
        name = identity.get("name", "ray")
        with self._lock:
            flight.started = True
            seen = self._seen.get(name)
            if seen is None:
                seen = self._seen[name] = _Seen(_identity(identity), memory_mode=identity.get("memory_mode"))
            seen.busy_with = job.id
            seen.seen = time.time()
        job.state = "running"
        job.replica = name
        job.started = time.time()
        log.info(
            "job %s runs on Ray replica %s (pid %s on node %s %s)",
            job.id,
            name,
            identity.get("pid"),
            identity.get("node"),
            identity.get("node_id"),
        )
        return seen

    def _watch_cancels(self) -> None:
        """One thread for every job in flight: a cancelled job's request is cancelled through the
        handle, whether it still waits in Serve's queue or runs on a replica."""
        while not self._closed.wait(CANCEL_POLL_S):
            with self._lock:
                todo = [f for f in self._inflight.values() if f.job.cancelled and not f.told]
                for f in todo:
                    f.told = True
            for f in todo:
                try:
                    f.response.cancel()
                except Exception:  # noqa: BLE001 - best effort: the job ends with the replica's answer
                    log.exception("cancelling job %s through Ray Serve failed", f.job.id)

    def _watch_replicas(self) -> None:
        while not self._closed.wait(STATUS_EVERY_S):
            self._observe()

    # --- reporting ----------------------------------------------------------------------

    def _observe(self) -> tuple[dict[str, int], list[str]]:
        """Ask Ray: Serve's replica counts by state (RUNNING, STARTING, ...) and the names of the
        replica actors alive now (Serve names them SERVE_REPLICA::zimage#ZImageReplica#<id>).
        status() reads what the last call found."""
        if not self._connected:  # asking Ray before connecting would start a cluster of its own
            return self._states, self._alive
        try:
            states, alive = ray_cluster.read_replicas()
        except Exception:  # noqa: BLE001 - the panel shows what it knew last
            return self._states, self._alive
        with self._lock:
            self._states, self._alive = states, alive
            for name in [n for n in self._seen if n not in alive and not self._seen[n].busy_with]:
                del self._seen[name]  # replaced or scaled down: Serve has let it go
        return states, alive

    def _replica_text(self) -> str:
        states, _ = self._observe()
        counts = ", ".join(f"{n} {s.lower()}" for s, n in sorted(states.items())) or "no replica yet"
        scale = (
            f"autoscaling {self.min_replicas}-{self.max_replicas}"
            if self.min_replicas != self.max_replicas
            else f"{self.min_replicas} replica(s)"
        )
        return f"{counts} ({scale})"

    def status(self) -> list[dict[str, Any]]:
        """One row per replica alive in Serve: who and where, its state, the job it runs, and
        (once it ran a job for us) its device, memory mode, last run and VRAM after it."""
        with self._lock:
            states, alive = self._states, self._alive
        loading = sum(n for st, n in states.items() if st != "RUNNING")
        rows = []
        with self._lock:
            for name in sorted(alive, key=lambda n: n not in self._seen):  # known ones first
                seen = self._seen.get(name)
                if seen is None:
                    state = "loading" if loading > 0 else "ready"
                    loading -= 1
                    rows.append({"name": name, "kind": "ray", "state": state, "job": None, "step": None})
                    continue
                flight = self._inflight.get(seen.busy_with or "")
                rows.append(
                    {
                        **seen.identity,
                        "kind": "ray",
                        "state": "busy" if seen.busy_with else "ready",
                        "memory_mode": seen.memory_mode,
                        "vram": seen.vram,
                        "last_run": seen.last_run,
                        "jobs_done": seen.jobs_done,
                        "error": None,
                        "job": seen.busy_with,
                        "step": (flight.job.step, flight.job.total) if flight else None,
                    }
                )
        return rows

    # --- the end ------------------------------------------------------------------------

    def wake(self) -> None:
        pass

    def drain(self, grace_s: float) -> bool:
        """Stop taking jobs; wait up to grace_s for the ones in flight, then cancel them."""
        self.accepting = False
        end = time.monotonic() + max(0.0, grace_s)
        while self._inflight and time.monotonic() < end:
            time.sleep(0.05)
        if not self._inflight:
            return True
        with self._lock:
            jobs = [f.job for f in self._inflight.values()]
        for job in jobs:
            log.warning("shutdown: cancelling job %s after %.0fs", job.id, grace_s)
            job.cancel()
        end = time.monotonic() + 30.0
        while self._inflight and time.monotonic() < end:
            time.sleep(0.05)
        return False

    def close(self) -> None:
        """Delete the deployment (its GPUs are free again) and leave the cluster; a cluster that
        no longer answers does not hold up the shutdown (Ray's calls here have no timeout)."""
        self._closed.set()
        if not self._connected:
            return
        self._connected = False
        done = threading.Thread(
            target=ray_cluster.leave, args=(self.handle is not None,), name="ray-close", daemon=True
        )
        done.start()
        done.join(CLOSE_TIMEOUT_S)
        if done.is_alive():
            log.warning(
                "the Ray cluster at %s did not answer within %.0fs; leaving it as it is", self.address, CLOSE_TIMEOUT_S
            )

    # --- timeline helpers ---------------------------------------------------------------

    def _begin(self, name: str) -> Any:
        return self.timeline.begin(name) if self.timeline is not None else None

    def _end(self, stage: Any, detail: str) -> None:
        if self.timeline is not None:
            self.timeline.end(stage, detail)


def _identity(row: dict[str, Any]) -> dict[str, Any]:
    keys = ("name", "pid", "node", "node_id", "gpu", "start_s", "device", "device_name", "memory_reason", "notes")
    return {k: row.get(k) for k in keys if k in row}
