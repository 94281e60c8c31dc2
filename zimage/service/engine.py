"""The one Engine per process: the facade the web page, the CLI and the benchmark talk to.

It loads the model once per replica (one in this process by default; one child process per GPU
when the model fits on each, see service.layout), hands each job to the replica pool's shared
queue (service.replicas: the first free replica runs it), and accounts for every request in one
place: its metric, its log line, its listeners (the words for how it ended: service.outcomes).
PNG encoding and writing happen on the store's writer thread after the GPU is released. What it
says about itself (status, speed, the gauges of /metrics) is read in service.status.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from zimage.errors import (
    GenerationFailed,
    NotReady,
    ShuttingDown,
    ZImageError,
)
from zimage.model.lora import LoraLibrary
from zimage.model.pipeline import LoadedModel
from zimage.model.presets import model_preset
from zimage.ops.metrics import EngineMetrics
from zimage.ops.profiler import LoadTimeline, RecentJobs
from zimage.service import outcomes, status
from zimage.service.jobs import Job
from zimage.service.layout import build_replicas, plan_replicas
from zimage.service.replicas import LocalReplica, ReplicaPool
from zimage.service.request import GenerationRequest, Limits, resolve_seed, validate
from zimage.service.result import GenerationResult
from zimage.service.runner import ProgressFn, Runner
from zimage.service.store import MiB, OutputStore, SaveReport
from zimage.settings import Settings

log = logging.getLogger(__name__)

COMPILE_EXIT_WAIT_S = 30.0  # at shutdown, how long a compile still running may take to end
Listener = Callable[["Engine", GenerationResult | None, BaseException | None], None]


class Engine:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.preset = model_preset(settings.model)
        self.limits = Limits.from_settings(settings)
        self.timeline = LoadTimeline()
        self.metrics = EngineMetrics()
        self.recent = RecentJobs()
        self.store = OutputStore(
            settings.outputs_dir,
            settings.png_metadata,
            settings.png_compress_level,
            min_free_bytes=settings.min_free_mib * MiB,
        )
        self.started = time.time()
        self.model: LoadedModel | None = None
        self.runner: Runner | None = None
        self.job_listeners: list[Listener] = []
        if settings.ray:  # past one box: Ray Serve replicas (Ray is imported only then, only here)
            from zimage.service.ray_serve import RayPool

            self.pool: Any = RayPool(settings, self.timeline)
            self.replica_plan: Any = self.pool.plan
        else:
            self.replica_plan = plan_replicas(settings)
            self.pool = ReplicaPool()
        # Jobs waiting in front of the engine (the web server sets it to Gradio's queue length).
        self.waiting_elsewhere: Callable[[], int] = lambda: 0
        # The LoRA files: listed for the page, checked before a job queues (each replica holds its own
        # library on its own pipeline and checks every file against its layers again).
        self.loras = LoraLibrary.from_settings(settings)
        self._ready = threading.Event()
        self._loading: threading.Thread | None = None
        self._loading_lock = threading.Lock()
        self.images_made = 0
        self._handoffs = _Counter()
        self.compile_backend: Any = "inductor"  # torch.compile backend of the compile beside (tests: cheaper)
        self.metrics.on_scrape(self._refresh_metrics)

    # --- what is loaded (None until then) -------------------------------------------------

    @property
    def pipe(self) -> Any:
        return self.model.pipe if self.model else None

    @property
    def plan(self):
        return self.model.plan if self.model else None

    @property
    def source(self):
        return self.model.source if self.model else None

    @property
    def notes(self) -> list[str]:
        return self.model.notes if self.model else []

    @property
    def default_size(self) -> tuple[int, int]:
        w = self.settings.default_width or self.preset.default_size
        h = self.settings.default_height or self.preset.default_size
        return w, h

    def default_request(self, prompt: str, **kw: Any) -> GenerationRequest:
        w, h = self.default_size
        base = dict(width=w, height=h, steps=self.settings.default_steps)
        base.update(kw)
        return GenerationRequest(prompt=prompt, **base)

    # --- loading ---------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    @property
    def load_error(self) -> str | None:
        return self.timeline.error

    def wait_ready(self, timeout: float | None = None) -> bool:
        end = None if timeout is None else time.time() + timeout
        while not self._ready.wait(0.05):
            if self.timeline.error or (end is not None and time.time() > end):
                return False
        return True

    def start_loading(self) -> threading.Thread:
        """Load in a background thread (the web page is up meanwhile)."""
        with self._loading_lock:
            if self._loading is None:
                self._loading = threading.Thread(target=self._load_quietly, name="model-load", daemon=True)
                self._loading.start()
        return self._loading

    def _load_quietly(self) -> None:
        try:
            self.load()
        except Exception:  # noqa: BLE001 - recorded in the timeline; /ready and the UI say why
            log.exception("model loading failed")

    @property
    def concurrency(self) -> int:
        """Jobs that may run at once (one per replica): the page's concurrency limit."""
        return self.replica_plan.size

    def load(self) -> None:
        """Load every replica (in this process for one, in child processes for several) and warm up."""
        tl = self.timeline
        plan = self.replica_plan
        try:
            log.info("replicas: %s", plan.describe())
            if self.settings.ray:
                self.pool.start()  # connect, deploy, wait for the replicas: stages on the timeline
            elif plan.processes:
                self._add_replicas(plan)
                stage = tl.begin(f"start {plan.size} replicas", plan.describe())
                self.pool.start()
                tl.end(stage, ", ".join(f"{r.name} {r.state}" for r in self.pool.replicas))
            else:
                self._add_replicas(plan)
                self.pool.start()
            local = self.pool.replicas[0] if self.pool.replicas else None
            if isinstance(local, LocalReplica):
                self.model, self.runner = local.model, local.runner
            tl.ready()
            self.metrics.load_seconds.set(tl.ready_at or 0.0)
            self.metrics.ready.set(1)
            mode = self._first_status().get("memory_mode")
            self.metrics.mode.labels(mode).set(1)
            speed = self.speed_status()
            self.metrics.full_speed.set(1 if speed.get("full_speed") else 0)
            self._ready.set()
            self._log_timeline()
            log.info(
                "model ready in %.1fs since process start (%s)%s",
                tl.ready_at,
                mode,
                ""
                if speed.get("full_speed")
                else f", full speed in about {speed.get('eta_s') or 0:.0f}s (compiling beside)",
            )
        except Exception as exc:
            tl.fail(str(exc) if isinstance(exc, ZImageError) else f"{type(exc).__name__}: {exc}")
            raise

    def _add_replicas(self, plan: Any) -> None:
        for replica in build_replicas(self.settings, plan, self.metrics, self.timeline, self._replica_changed):
            if isinstance(replica, LocalReplica):
                replica.compile_backend = self.compile_backend
                replica.on_compile_done = self._compile_done
            self.pool.add(replica)

    @property
    def compiler(self) -> Any:
        """The in-process replica's compile beside serving (zimage.model.compiler), or None."""
        local = self.pool.replicas[0] if self.pool.replicas else None
        return getattr(local, "compiler", None) if isinstance(local, LocalReplica) else None

    def _compile_done(self, compiler: Any) -> None:
        if compiler is None:
            return  # nothing compiles: full speed from the start
        self.metrics.full_speed.set(1 if self.speed_status().get("full_speed") else 0)
        if compiler.state == "live":
            self.model.notes.append(compiler.detail)
        else:
            self.model.notes.append(f"eager only: the compile failed ({compiler.error})")
        self._log_timeline()

    def _log_timeline(self) -> None:
        """The load (and compile) timeline as one JSON line: the benchmark reads it from the log."""
        import json

        snap = self.timeline.snapshot()
        data = {"ready_at_s": snap["ready_at_s"], "stages": snap["stages"], "speed": self.speed_status()}
        log.info("load timeline %s", json.dumps(data))

    def _replica_changed(self, replica) -> None:
        """A child replica reported: its load progress (the banner shows the mean), or a new state."""
        rows = [r for r in self.pool.replicas if hasattr(r, "load")]
        if rows and not self.ready:
            self.timeline.progress(sum((r.load or {}).get("percent", 0.0) for r in rows) / len(rows) / 100.0)
        self.pool.wake()

    def _first_status(self) -> dict[str, Any]:
        """What the page shows as "the" model: the first replica that came up."""
        rows = self.pool.status()
        return next((r for r in rows if r.get("state") in ("ready", "busy")), rows[0] if rows else {})

    # --- jobs ------------------------------------------------------------------------------

    def new_job(self) -> Job:
        return Job()

    @property
    def queue_depth(self) -> int:
        return self.pool.waiting

    @property
    def running_jobs(self) -> list[Job]:
        return self.pool.running

    @property
    def running_job(self) -> Job | None:
        running = self.pool.running
        return running[0] if running else None

    def generate(
        self,
        request: GenerationRequest,
        job: Job | None = None,
        progress: ProgressFn | None = None,
        save: bool = True,
        wait_ready: float | None = None,
    ) -> GenerationResult:
        """Validate, wait for the GPU, run, and hand the PNG writing to the writer thread."""
        job = job or self.new_job()
        t_request = time.time()
        req = request
        handing_off = False
        try:
            req = validate(request, self.limits)
            self.loras.check(req.loras)  # a bad LoRA file is refused before it waits for the GPU
            self._admit(wait_ready)
            if save:
                self.store.check_space()  # a full disk refuses the job before the GPU works for nothing
            req = replace(req, seed=resolve_seed(req.seed))
            req, reduced = self._load_aware(req)
            job.total = req.denoise_steps
            # Counted from here until its images are with the writer: shutdown waits for this
            # before it closes the writer, so an image finished as the drain ends is still saved.
            self._handoffs.begin()
            handing_off = True
            result = self.pool.run(req, job, progress)
            if reduced:
                result.steps_asked = request.steps
                result.notes.append(reduced)
                self.metrics.load_aware.inc()
            queue_wait = max(0.0, job.started - t_request)
            result.timings.queue_wait = queue_wait
            result.started_at = job.started
        except BaseException as exc:  # noqa: BLE001 - accounted for, then raised as a user-facing error
            if handing_off:
                self._handoffs.end()
            raise self._failed(req, job, exc) from (None if isinstance(exc, ZImageError) else exc)
        try:
            job.state = "done"
            self._count_made(result, queue_wait)
            if save:
                metas = [result.metadata(seed) for seed in result.seeds]
                result._saved = self.store.save_async(
                    result.images, metas, lambda report: self._saved(req, result, report), owner=req.owner
                )
            else:
                self.metrics.requests.labels("ok").inc()
                self._log_request(req, result, "ok", None)
        finally:
            self._handoffs.end()
        self.recent.add(result.summary())
        self._notify(result, None)
        return result

    def queue_length(self) -> int:
        """Jobs waiting: in the pool and in front of it (Gradio's queue)."""
        try:
            elsewhere = int(self.waiting_elsewhere())
        except Exception:  # noqa: BLE001 - a reading must never fail a request
            elsewhere = 0
        return self.pool.waiting + elsewhere

    def _load_aware(self, req: GenerationRequest) -> tuple[GenerationRequest, str | None]:
        """Load-aware steps (opt-in): with more than load_aware_queue jobs waiting, run this one with
        load_aware_min_steps; returns the request to run and the note that says so (or None)."""
        s = self.settings
        if s.load_aware_queue <= 0 or req.steps <= s.load_aware_min_steps:
            return req, None
        waiting = self.queue_length()
        if waiting <= s.load_aware_queue:
            return req, None
        note = (
            f"Load-aware steps: ran {s.load_aware_min_steps} steps instead of {req.steps} because {waiting} jobs "
            f"were waiting (more than {s.load_aware_queue}); ask again when it is quieter for the full quality."
        )
        return replace(req, steps=s.load_aware_min_steps), note

    def _admit(self, wait_ready: float | None) -> None:
        """Refuse at once while shutting down; wait (up to wait_ready) while the model loads."""
        if not self.pool.accepting:
            raise ShuttingDown("The server is shutting down and takes no new jobs. Try again in a minute.")
        if self.ready:
            return
        if self.load_error:
            raise NotReady(f"The model failed to load: {self.load_error}")
        if wait_ready is None or not self.wait_ready(wait_ready):
            if self.load_error:
                raise NotReady(f"The model failed to load: {self.load_error}")
            tl = self.timeline
            raise NotReady(f"The model is still loading ({tl.current}, {tl.percent:.0f}%).")

    def _failed(self, req: GenerationRequest, job: Job, error: BaseException) -> BaseException:
        """The one place a failed request is counted, logged and told to listeners; returns what to raise."""
        outcome = outcomes.outcome_of(error)
        job.state = "cancelled" if outcome == "cancelled" else "failed"
        self.metrics.requests.labels(outcome).inc()
        self._log_request(req, None, outcome, error)
        if outcome in outcomes.REFUSED:  # refused before it ran: no job listener cares
            return error
        if outcome != "rejected":
            self._notify(None, error)
        if isinstance(error, ZImageError):
            return error
        log.error("generation failed", exc_info=error)
        return GenerationFailed(f"Generation failed: {type(error).__name__}: {str(error)[:300]}")

    def _saved(self, req: GenerationRequest, result: GenerationResult, report: SaveReport) -> None:
        """On the writer thread, once the PNGs are written (or not): the request's outcome is
        counted and logged here, 'unsaved' when a file could not be written."""
        result.timings.png = report.seconds
        result.paths = report.paths
        self.metrics.stage.labels("png", result.replica).observe(report.seconds)
        if report.error is None:
            self.metrics.requests.labels("ok").inc()
            self._log_request(req, result, "ok", None)
            return
        result.unsaved = report.unsaved
        result.save_error = outcomes.unsaved_sentence(report, len(result.images))
        result.notes.append(result.save_error)
        self.metrics.requests.labels("unsaved").inc()
        self._log_request(req, result, "unsaved", report.error)

    def _count_made(self, result: GenerationResult, queue_wait: float) -> None:
        """The job's numbers once its images exist; its outcome is counted when they are saved."""
        t = result.timings
        replica = result.replica
        self.metrics.latency.labels(replica).observe(t.gpu_total)
        self.metrics.queue_wait.observe(queue_wait)
        self.metrics.images.inc(len(result.images))
        self.metrics.jobs_by_path.labels(result.compute_path).inc()
        self.metrics.replica_images.labels(replica).inc(len(result.images))
        self.metrics.stage.labels("text_encoder", replica).observe(t.text_encoder)
        self.metrics.stage.labels("denoise", replica).observe(t.denoise)
        self.metrics.stage.labels("vae_decode", replica).observe(t.vae_decode)
        self.images_made += len(result.images)

    def _notify(self, result: GenerationResult | None, error: BaseException | None) -> None:
        for fn in list(self.job_listeners):
            try:
                fn(self, result, error)
            except Exception:  # noqa: BLE001 - a listener must not break generation
                log.exception("job listener failed")

    # --- reporting -------------------------------------------------------------------------

    def _log_request(self, req: GenerationRequest, result: GenerationResult | None, outcome: str, error) -> None:
        log.info(*outcomes.request_line(req, result, outcome, error))

    def storage(self):
        """The outputs folder's state (store.StorageState), also published in /metrics."""
        state = self.store.state()
        if state.free_bytes is not None:
            self.metrics.outputs_free.set(state.free_bytes)
        self.metrics.storage_ok.set(1 if state.ok else 0)
        return state

    def _refresh_metrics(self) -> None:
        status.refresh_metrics(self)

    def status(self) -> dict[str, Any]:
        """Everything the profiler panel and /ready show, as plain data (service.status)."""
        return status.engine_status(self)

    def speed_phrase(self) -> str:
        """'ready (full speed)', 'ready (full speed in about 12 s)' or why it stays eager."""
        return status.speed_phrase(self.speed_status())

    def speed_status(self, replicas: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """Eager or compiled, and when full speed comes: the in-process compile's own account, or
        over every replica's row (service.status.speed_over_replicas). The banner and /ready say it."""
        compiler = self.compiler
        if compiler is not None:
            return compiler.snapshot()
        rows = replicas if replicas is not None else (self.pool.status() if self.pool.replicas else [])
        return status.speed_over_replicas(rows, self.ready)

    # --- shutdown --------------------------------------------------------------------------

    def shutdown(self, grace_s: float = 60.0) -> bool:
        """Stop taking jobs, let the running one finish (or cancel it after grace_s), flush files.

        Returns True when the running job finished on its own."""
        finished = self.pool.drain(grace_s)
        if not self._handoffs.wait_idle(HANDOFF_WAIT_S):
            log.warning("shutdown: a finished job did not reach the PNG writer within %.0fs", HANDOFF_WAIT_S)
        if self.compiler is not None:  # a compile cannot be stopped midway: let it end (bounded)
            self.compiler.wait(min(grace_s, COMPILE_EXIT_WAIT_S))
        self.pool.close()
        self.store.close(wait=True)
        return finished


HANDOFF_WAIT_S = 30.0  # at shutdown: the most a job past the GPU may take to hand its images to the writer


class _Counter:
    """How many jobs are between the GPU and the PNG writer; wait_idle() until none is."""

    def __init__(self) -> None:
        self._n = 0
        self._cv = threading.Condition()

    def begin(self) -> None:
        with self._cv:
            self._n += 1

    def end(self) -> None:
        with self._cv:
            self._n -= 1
            self._cv.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        with self._cv:
            return self._cv.wait_for(lambda: self._n == 0, timeout)
