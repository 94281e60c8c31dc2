"""The one Engine per process: the facade the web page, the CLI and the benchmark talk to.

It loads the model once (zimage.model.pipeline), admits jobs to the GPU one at a time
(service.jobs), has the runner do the GPU math (service.runner), and accounts for every
request in one place: its metric, its log line, its listeners. PNG encoding and writing
happen on the store's writer thread after the GPU is released.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from zimage.errors import Cancelled, GenerationFailed, InvalidRequest, NotReady, OutOfMemory, ShuttingDown, ZImageError
from zimage.model.pipeline import LoadedModel, load_model
from zimage.model.presets import model_preset, parse_size
from zimage.model.speed import WARMUP_PROMPT
from zimage.ops.metrics import EngineMetrics
from zimage.ops.profiler import LoadTimeline, RecentJobs, memory_snapshot
from zimage.service.jobs import Admission, Job
from zimage.service.request import GenerationRequest, Limits, resolve_seed, validate
from zimage.service.result import GenerationResult
from zimage.service.runner import ProgressFn, Runner
from zimage.service.store import OutputStore
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
        self.store = OutputStore(settings.outputs_dir, settings.png_metadata, settings.png_compress_level)
        self.started = time.time()
        self.model: LoadedModel | None = None
        self.runner: Runner | None = None
        self.job_listeners: list[Listener] = []
        self.admission = Admission()
        self._ready = threading.Event()
        self._loading: threading.Thread | None = None
        self._loading_lock = threading.Lock()
        self._images_made = 0
        self.compiler = None  # zimage.model.compiler.CompileBeside once the model is loaded
        self.compile_backend: object = "inductor"  # torch.compile backend of the compile beside
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

    def load(self) -> None:
        """Load, warm the eager path, be ready; the compiled blocks follow beside (see compiler.py)."""
        tl = self.timeline
        try:
            self.model = load_model(self.settings, tl)
            self.runner = Runner(self.model, self.metrics, self.settings.real_length_prompt)
            compiler = self._start_compile() if self.model.compile_mode != "off" else None
            if self.settings.warmup:
                stage = tl.begin("warm-up")
                self._warmup(WARMUP_PROMPT, steps=1)
                tl.end(stage, "eager path, 1 step")
            if compiler is not None and not compiler.is_started:
                compiler.start(tl.origin)  # after the eager warm-up: it takes the GPU lock
            tl.ready()
            self.metrics.load_seconds.set(tl.ready_at or 0.0)
            self.metrics.ready.set(1)
            self.metrics.full_speed.set(0 if compiler is not None else 1)
            self.metrics.mode.labels(self.model.plan.mode).set(1)
            self._ready.set()
            self._log_timeline()
            log.info(
                "model ready in %.1fs since process start (%s)%s",
                tl.ready_at,
                self.model.plan.mode,
                f", full speed in about {compiler.eta():.0f}s (compiling beside)" if compiler else "",
            )
            if compiler is None:
                self._after_start()
        except Exception as exc:
            tl.fail(str(exc) if isinstance(exc, ZImageError) else f"{type(exc).__name__}: {exc}")
            raise

    def _start_compile(self):
        """The compile beside serving; started now when it runs beside jobs, else after the warm-up."""
        from zimage.model.compiler import CompileBeside

        req = self._warmup_requests(WARMUP_PROMPT, steps=2)
        compiler = CompileBeside(
            self.model,
            self.settings,
            self.model.compile_mode,
            self.admission.lock,
            [(r.width, r.height) for r in req],
            backend=self.compile_backend,
            run_job=lambda: [self.runner.run(r, Job(), None) for r in req],
        )
        compiler.on_done = self._compile_done
        self.compiler = compiler
        if compiler.concurrent:
            compiler.start(self.timeline.origin)
        return compiler

    def _compile_done(self, compiler) -> None:
        if compiler.state == "live":
            self.metrics.full_speed.set(1)
            self.model.notes.append(compiler.detail)
        else:
            self.model.notes.append(f"eager only: the compile failed ({compiler.error})")
        self._log_timeline()
        self._after_start()

    def _log_timeline(self) -> None:
        """The load (and compile) timeline as one JSON line: the benchmark reads it from the log."""
        import json

        snap = self.timeline.snapshot()
        data = {"ready_at_s": snap["ready_at_s"], "stages": snap["stages"], "speed": self.speed_status()}
        log.info("load timeline %s", json.dumps(data))

    def _after_start(self) -> None:
        """Everything is loaded and imported: record the files read (the next start reads them ahead)."""
        from zimage.model.early import write_manifest

        write_manifest(self.settings.compile_cache_dir)

    def _warmup_requests(self, prompt: str, steps: int) -> list[GenerationRequest]:
        w, h = self.default_size
        sizes = [parse_size(x) for x in self.settings.warmup_sizes.split(",") if x.strip()] or [(w, h)]
        return [
            validate(GenerationRequest(prompt=prompt, width=ww, height=hh, steps=steps, seed=0), self.limits)
            for ww, hh in sizes
        ]

    def _warmup(self, prompt: str, steps: int = 1) -> None:
        """One short eager generation per warm-up size: pays for cuDNN/cuBLAS set-up and allocator
        growth before the first user does. The compiled blocks warm up beside (compiler.py)."""
        for req in self._warmup_requests(prompt, steps):
            with self.admission.lock, self._path(eager=True):
                self.runner.run(req, Job(), None)

    def _path(self, eager: bool = False):
        """The path a job starting now takes (kept for the whole job); eager without a compiler."""
        import contextlib

        compiler = self.compiler
        if compiler is None:
            return contextlib.nullcontext("eager")
        if eager:
            return compiler.switch.path(False)
        from zimage.model.speed import compile_mode

        allowed = (
            compile_mode(self.settings, "cuda" if self.model.device.startswith("cuda") else "cpu", self.model.plan.mode)
            != "off"
        )
        return compiler.switch.job(allowed)

    # --- jobs ------------------------------------------------------------------------------

    def new_job(self) -> Job:
        return Job()

    @property
    def queue_depth(self) -> int:
        return self.admission.waiting

    @property
    def running_job(self) -> Job | None:
        return self.admission.running

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
        t_request = time.perf_counter()
        req = request
        try:
            req = validate(request, self.limits)
            self._admit(wait_ready)
            req = replace(req, seed=resolve_seed(req.seed))
            job.total = req.steps
            with self.admission.turn(job), self._path() as path:
                queue_wait = time.perf_counter() - t_request
                started_at = time.time()
                result = self.runner.run_with_fallback(req, job, progress)
            result.compute_path = path
            self.metrics.jobs_by_path.labels(path).inc()
            result.timings.queue_wait = queue_wait
            result.started_at = started_at
        except BaseException as exc:  # noqa: BLE001 - accounted for, then raised as a user-facing error
            raise self._failed(req, job, exc) from (None if isinstance(exc, ZImageError) else exc)
        job.state = "done"
        self._count_ok(result, queue_wait)
        if save:
            metas = [result.metadata(seed) for seed in result.seeds]

            def saved(paths: list[str], seconds: float) -> None:
                result.timings.png = seconds
                result.paths = paths
                self.metrics.stage.labels("png").observe(seconds)
                self._log_request(req, result, "ok", None)

            result._saved = self.store.save_async(result.images, metas, saved)
        else:
            self._log_request(req, result, "ok", None)
        self.recent.add(result.summary())
        self._notify(result, None)
        return result

    def _admit(self, wait_ready: float | None) -> None:
        """Refuse at once while shutting down; wait (up to wait_ready) while the model loads."""
        if not self.admission.accepting:
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
        outcome = _OUTCOMES.get(type(error), "error")
        job.state = "cancelled" if outcome == "cancelled" else "failed"
        self.metrics.requests.labels(outcome).inc()
        self._log_request(req, None, outcome, error)
        if outcome in ("invalid", "unready"):  # refused before it ran: no job listener cares
            return error
        if outcome != "rejected":
            self._notify(None, error)
        if isinstance(error, ZImageError):
            return error
        log.error("generation failed", exc_info=error)
        return GenerationFailed(f"Generation failed: {type(error).__name__}: {str(error)[:300]}")

    def _count_ok(self, result: GenerationResult, queue_wait: float) -> None:
        t = result.timings
        self.metrics.requests.labels("ok").inc()
        self.metrics.latency.observe(t.gpu_total)
        self.metrics.queue_wait.observe(queue_wait)
        self.metrics.images.inc(len(result.images))
        self.metrics.stage.labels("text_encoder").observe(t.text_encoder)
        self.metrics.stage.labels("denoise").observe(t.denoise)
        self.metrics.stage.labels("vae_decode").observe(t.vae_decode)
        self._images_made += len(result.images)

    def _notify(self, result: GenerationResult | None, error: BaseException | None) -> None:
        for fn in list(self.job_listeners):
            try:
                fn(self, result, error)
            except Exception:  # noqa: BLE001 - a listener must not break generation
                log.exception("job listener failed")

    # --- reporting -------------------------------------------------------------------------

    def _log_request(self, req: GenerationRequest, result: GenerationResult | None, outcome: str, error) -> None:
        # Every request gets its line, the ones that never ran too (invalid, refused while shutting
        # down or loading, cancelled in the queue); %s because an invalid request may hold any value.
        times = f"path {result.compute_path}, {result.timings.summary()}" if result else f"error: {str(error)[:200]}"
        log.info(
            "request user=%s size=%sx%s steps=%s count=%s seed=%s outcome=%s %s",
            req.user or "-",
            req.width,
            req.height,
            req.steps,
            req.count,
            req.seed,
            outcome,
            times,
        )

    def _refresh_metrics(self) -> None:
        self.metrics.queue_depth.set(self.admission.waiting)
        self.metrics.running.set(1 if self.admission.running else 0)
        snap = memory_snapshot()
        if snap.get("host_rss_bytes") is not None:
            self.metrics.host_rss.set(snap["host_rss_bytes"])
        for g in snap.get("gpus", []):
            for kind in ("allocated", "reserved", "peak_allocated", "peak_reserved"):
                self.metrics.vram.labels(str(g["index"]), kind).set(g[f"{kind}_bytes"])

    def status(self) -> dict[str, Any]:
        """Everything the profiler panel and /ready show, as plain data."""
        m = self.model
        running = self.admission.running
        return {
            "ready": self.ready,
            "load": self.timeline.snapshot(),
            "model": m.source.name if m else self.settings.model,
            "device": m.device if m else "cpu",
            "device_name": m.device_name if m else "CPU",
            "dtype": m.dtype_name if m else "",
            "memory_mode": str(m.plan.mode) if m else None,
            "memory_reason": m.plan.reason if m else None,
            "notes": list(self.notes),
            "queue_depth": self.admission.waiting,
            "running": running.id if running else None,
            "running_step": (running.step, running.total) if running else None,
            "images_made": self._images_made,
            "uptime_s": time.time() - self.started,
            "memory": memory_snapshot(),
            "last": self.recent.last(),
            "pending_writes": self.store.pending,
            "speed": self.speed_status(),
        }

    def speed_phrase(self) -> str:
        """'ready (full speed)', 'ready (full speed in about 12 s)' or why it stays eager."""
        sp = self.speed_status()
        if sp.get("full_speed"):
            return "ready (full speed)"
        if sp.get("state") == "failed":
            return "ready (eager speed: the compile failed)"
        eta = sp.get("eta_s")
        return f"ready (full speed in about {eta:.0f} s)" if eta is not None else "ready (compiling)"

    def speed_status(self) -> dict[str, Any]:
        """Eager or compiled, and when full speed comes: the banner and /ready say it."""
        compiler = self.compiler
        if compiler is None:
            return {"state": "eager-only" if self.model else "loading", "full_speed": bool(self.model), "eta_s": 0.0}
        return compiler.snapshot()

    # --- shutdown --------------------------------------------------------------------------

    def shutdown(self, grace_s: float = 60.0) -> bool:
        """Stop taking jobs, let the running one finish (or cancel it after grace_s), flush files.

        Returns True when the running job finished on its own."""
        finished = self.admission.drain(grace_s)
        if self.compiler is not None:  # a compile cannot be stopped midway: let it end (bounded)
            self.compiler.wait(min(grace_s, COMPILE_EXIT_WAIT_S))
        self.store.close(wait=True)
        return finished


_OUTCOMES: dict[type, str] = {
    InvalidRequest: "invalid",
    NotReady: "unready",
    ShuttingDown: "rejected",
    Cancelled: "cancelled",
    OutOfMemory: "oom",
}
