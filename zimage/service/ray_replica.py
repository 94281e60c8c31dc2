"""The Ray Serve deployment: one zimage pipeline per replica, in the Ray worker process that Serve
starts for it on any box of the cluster (one GPU each; the CPU for the tiny model in tests).

Each replica is the same in-process replica the single-GPU default runs (`LocalReplica`: load the
model, warm up, `Runner.run_with_fallback`), so a picture made through Ray is the picture made
locally. Serve does the rest: it places replicas on GPUs, routes each job to a free one
(`max_ongoing_requests=1`: one job per pipeline at a time, the others wait in Serve's queue),
calls `check_health` and replaces a replica that died or reports itself broken.

This module imports Ray: only `zimage.service.ray_serve` and `ray_cluster` import it, and only with `--ray`.

`generate` is a streaming method. It yields plain tuples:
  ("start", identity)                   once the job reached this replica (who runs it)
  ("progress", phase, done, total)      as the in-process runner reports it
  ("result", payload)                   service.payload: uint8 pixels, seeds, timings, notes...
Errors are raised as the runner raises them (ZImageErrors carry a user-facing message); the
caller cancels through the handle, which cancels this coroutine, which cancels the job: the
runner stops after the current step, as it does in-process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from ray import serve

if TYPE_CHECKING:  # pragma: no cover
    from zimage.service.request import GenerationRequest
    from zimage.settings import Settings

log = logging.getLogger(__name__)

APP_NAME = "zimage"  # the Serve application (and the Ray namespace the studio uses)


@serve.deployment(
    ray_actor_options={"num_gpus": 1},  # the studio sets num_gpus 0 for --device cpu (the tiny model)
    max_ongoing_requests=1,  # one job per pipeline; the rest wait in Serve's queue for a free replica
    health_check_period_s=10,
    health_check_timeout_s=60,  # a long job holds the GPU, not the event loop: a check answers at once
    graceful_shutdown_timeout_s=60,
    max_constructor_retry_count=3,  # a model that cannot load fails the start in minutes, not hours
    logging_config={"log_level": "WARNING", "enable_access_log": False},  # our own log line per request is enough
)
class ZImageReplica:
    def __init__(self, settings: Settings):
        import ray

        from zimage.ops.metrics import EngineMetrics
        from zimage.ops.profiler import LoadTimeline
        from zimage.service.replicas import LocalReplica

        logging.basicConfig(
            level=getattr(logging, settings.log_level, logging.INFO),
            format="%(asctime)s %(levelname)s [ray replica] %(name)s: %(message)s",
        )
        try:
            replica_id = serve.get_replica_context().replica_id.unique_id
        except Exception:  # noqa: BLE001 - only a name for the logs and the panel
            replica_id = str(os.getpid())
        self.name = f"ray-{replica_id}"
        self.identity: dict[str, Any] = {
            "name": self.name,
            "pid": os.getpid(),
            "node": ray.util.get_node_ip_address(),
            "node_id": ray.get_runtime_context().get_node_id()[:12],  # two nodes may share an address
            "gpu": ",".join(str(g) for g in ray.get_gpu_ids()) or None,
        }
        self.replica = LocalReplica(self.name, settings, EngineMetrics(), LoadTimeline())
        t0 = time.perf_counter()
        self.replica.start()
        self.identity["start_s"] = round(time.perf_counter() - t0, 2)
        m = self.replica.model
        self.identity.update(
            device=m.device,
            device_name=m.device_name,
            memory_mode=str(m.plan.mode),
            memory_reason=m.plan.reason,
            notes=list(m.notes),
        )
        self.broken: str | None = None  # why this replica must go (check_health tells Serve)
        self._watch_bytes = int(max(0.0, settings.watchdog_reserved_gib) * (1 << 30))
        self._reserved: deque[int | None] = deque(maxlen=max(settings.watchdog_strikes, 8))
        self._strikes = settings.watchdog_strikes
        self._gpu = ThreadPoolExecutor(1, thread_name_prefix="zimage-gpu")  # the pipeline is not thread-safe
        log.info(
            "%s ready in %.1fs (pid %d on %s, %s)",
            self.name,
            self.identity["start_s"],
            os.getpid(),
            self.identity["node"],
            m.device_name,
        )

    def check_health(self) -> None:
        """Serve calls it every health_check_period_s; raising makes Serve replace this replica.
        After an unrecoverable CUDA error only a fresh process helps."""
        if self.broken:
            raise RuntimeError(f"replica {self.name} is unusable: {self.broken}")

    async def status(self, hold_s: float = 0.0) -> dict[str, Any]:
        """Who this replica is. hold_s keeps the request open a moment: N calls at once then reach
        N different replicas (each takes one request at a time), so the studio learns them all."""
        if hold_s > 0:
            await asyncio.sleep(hold_s)
        return {**self.replica.status(), **self.identity, "kind": "ray"}

    async def generate(self, request: GenerationRequest, job_id: str):
        from zimage.errors import ReplicaFailed
        from zimage.service.jobs import Job

        if self.broken:  # Serve replaces it at its next health check; the studio runs the job elsewhere
            raise ReplicaFailed(f"replica {self.name} is being replaced ({self.broken})")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job = Job(id=job_id)

        def progress(phase: str, done: int, total: int) -> None:
            loop.call_soon_threadsafe(events.put_nowait, ("progress", phase, done, total))

        yield ("start", self.identity)
        running = loop.run_in_executor(self._gpu, self._run, request, job, progress)
        try:
            while True:
                getter = asyncio.ensure_future(events.get())
                done, _ = await asyncio.wait({getter, running}, return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    yield getter.result()
                    continue
                getter.cancel()
                while not events.empty():  # the last steps' progress before the result
                    yield events.get_nowait()
                break
        except (asyncio.CancelledError, GeneratorExit):
            # The caller cancelled (or went away): stop the runner after its current step and keep
            # this request open until it has, so Serve gives this replica no second job meanwhile.
            job.cancel()
            with contextlib.suppress(BaseException):
                await running
            raise
        yield ("result", self._payload(running.result()))

    def _run(self, request: GenerationRequest, job: Any, progress: Any) -> Any:
        from zimage.errors import ReplicaFailed
        from zimage.model.memory import is_unrecoverable_cuda

        try:
            result = self.replica.run(request, job, progress)
        except Exception as exc:
            if not is_unrecoverable_cuda(exc):
                raise
            text = str(exc).strip()
            self.broken = text.splitlines()[0][:300] if text else type(exc).__name__
            log.error("%s: unrecoverable CUDA error; Serve will replace this replica: %s", self.name, exc)
            # the studio runs the job again on another replica; check_health has Serve replace this one
            raise ReplicaFailed(f"the GPU of replica {self.name} hit an unrecoverable CUDA error") from None
        if self._watch_bytes > 0:  # the memory watchdog, per replica: a fresh replica gets fragmented VRAM back
            from zimage.ops.watchdog import cuda_reserved_bytes, decide

            self._reserved.append(cuda_reserved_bytes(self._watch_bytes))
            verdict = decide(self._reserved, self._watch_bytes, self._strikes)
            if verdict.exit:
                self.broken = f"watchdog: {verdict.reason}"
                log.warning("%s: %s; Serve will replace this replica", self.name, verdict.reason)
        return result

    def _payload(self, result: Any) -> dict[str, Any]:
        from zimage.service.payload import to_payload

        return {
            **to_payload(result),
            "vram": self.replica.status().get("vram"),
            "replica": self.identity,
        }
