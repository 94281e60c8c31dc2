"""The one Engine per process: loads the pipeline once and serialises GPU work.

generate() runs the diffusers ZImagePipeline's own denoising loop, around which the engine
does three things itself, each checked against the plain pipeline by the tests:
- the prompt is encoded at its real length (the pipeline pads to 512 tokens, then throws
  the padding away: causal attention means the real tokens never saw it);
- the initial noise is drawn on the CPU from one generator per image (seed s, s+1, ...),
  exactly as the pipeline does with a list of CPU generators, so a seed gives the same
  picture on any device and image i of a batch equals a single image with seed s+i;
- the VAE output is turned into 8-bit RGB on the device, the same arithmetic as the
  pipeline's post-processing, so only 3 bytes per pixel cross to the host.
PNG encoding and writing happen on a writer thread after the GPU lock is released.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .loading import LoadOptions, ModelSource, assemble, footprint, load_components, resolve_model
from .memory import MemoryPlan, choose_mode
from .metrics import EngineMetrics
from .presets import model_preset, parse_size
from .profiler import LoadTimeline, RecentJobs, StageTimer, memory_snapshot
from .requests import (
    Cancelled,
    GenerationRequest,
    GenerationResult,
    InvalidRequest,
    Limits,
    NotReady,
    ShuttingDown,
    StageTimings,
    ZImageError,
    resolve_seed,
    validate,
)
from .settings import Settings
from .store import OutputStore

log = logging.getLogger(__name__)

ProgressFn = Callable[[str, int, int], None]  # (phase, done, total)


class OutOfMemory(ZImageError):
    """The GPU ran out of memory and the fallback did not help either."""


class GenerationFailed(ZImageError):
    """An unexpected error inside the pipeline; the message is safe to show."""


@dataclass
class Job:
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    cancel_event: threading.Event = field(default_factory=threading.Event)
    state: str = "created"  # created, queued, running, done, cancelled, failed
    step: int = 0
    total: int = 0
    created: float = field(default_factory=time.time)

    def cancel(self) -> None:
        self.cancel_event.set()

    @property
    def cancelled(self) -> bool:
        return self.cancel_event.is_set()


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
        self.pipe: Any = None
        self.plan: MemoryPlan | None = None
        self.source: ModelSource | None = None
        self.device = "cpu"
        self.device_name = "CPU"
        self.dtype_name = ""
        self.notes: list[str] = []  # what is in effect (compile, backend, mode hooks)
        self.job_listeners: list[Callable[[Engine, GenerationResult | None, BaseException | None], None]] = []
        self._gpu_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._ready = threading.Event()
        self._loading: threading.Thread | None = None
        self._accepting = True
        self._waiting = 0
        self._running: Job | None = None
        self._jobs: dict[str, Job] = {}
        self._te_device: Any = None
        self._tr_device: Any = None
        self._dtype: Any = None
        self._images_made = 0
        self.metrics.on_scrape(self._refresh_metrics)

    # ------------------------------------------------------------------------------------
    # defaults

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

    # ------------------------------------------------------------------------------------
    # loading

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
        with self._state_lock:
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
        s = self.settings
        tl = self.timeline
        try:
            import os

            from . import speed
            from .loading import WeightLoad, prefetch_hint

            # Before torch is imported: allocator and compile-cache settings are read at import.
            if s.cuda_alloc_conf:
                os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", s.cuda_alloc_conf)
            speed.prepare_compile_cache(s)

            stage = tl.begin("find model")
            self.source = resolve_model(s)
            if s.loader == "fast":
                prefetch_hint(self.source)  # the disk starts reading while Python imports
            tl.end(stage, f"{self.source.kind}: {self.source.path}")

            stage = tl.begin("import torch")
            import torch

            tl.end(stage, f"torch {torch.__version__}")

            stage = tl.begin("plan memory")
            self.device, self._dtype = self._pick_device(torch)
            from .memory import (
                Hardware,
                apply_memory_fraction,
                cap_per_gpu,
                capped_hardware,
                parse_max_memory,
                probe_hardware,
            )

            hw = probe_hardware() if self.device.startswith("cuda") else _cpu_hardware()
            if self.device.startswith("cuda:"):  # one GPU named: the policy sees only that one
                index = torch.device(self.device).index
                hw = Hardware(tuple(g for g in hw.gpus if g.index == index), hw.host_total, hw.host_available)
            for g in hw.gpus:
                apply_memory_fraction(s.memory_fraction, g.index)
            hw = capped_hardware(hw, s.memory_fraction)
            hw = cap_per_gpu(hw, parse_max_memory(s.gpu_max_memory))
            fp = footprint(self.source, s.trim_text_encoder)
            self.plan = choose_mode(hw, fp, s.memory_mode)
            self.device = self.plan.execution_device
            if self.device.startswith("cuda"):
                self.device_name = torch.cuda.get_device_name(torch.device(self.device))
            self.dtype_name = str(self._dtype).replace("torch.", "")
            tl.end(stage, self.plan.describe())
            log.info("memory mode %s", self.plan.describe())

            opts = LoadOptions.from_settings(s, self._dtype)
            pin = self.plan.mode in ("balanced", "lowvram")
            pending = None
            if s.loader == "fast":
                # Reads start now, on their own threads, and overlap the library imports below.
                pending = WeightLoad(
                    self.source, self.plan.placement, opts, lambda _n, frac: tl.progress(frac), pin
                ).start()

            stage = tl.begin("import libraries")
            import diffusers
            import transformers  # noqa: F401

            tl.end(stage, f"diffusers {diffusers.__version__}" + (" (weights reading meanwhile)" if pending else ""))

            stage = tl.begin("read weights")
            t0 = time.perf_counter()
            modules = load_components(
                self.source,
                self.plan.placement,
                opts,
                progress=lambda _name, frac: tl.progress(frac),
                pin_offloaded=pin,
                pending=pending,
            )
            gib = fp.total / (1 << 30)
            if pending is not None and pending.finished:
                detail = (
                    f"{gib:.2f} GiB read in {pending.seconds:.2f}s ({gib / max(pending.seconds, 1e-9):.2f} GiB/s), "
                    f"started {t0 - pending.started:.2f}s before this stage, beside the imports"
                )
            else:
                seconds = time.perf_counter() - t0
                detail = f"{gib:.2f} GiB in {seconds:.2f}s with {s.loader} loader"
            tl.end(stage, detail)

            stage = tl.begin("assemble pipeline")
            from .memory import apply_mode

            pipe = assemble(modules)
            self.notes = apply_mode(pipe, self.plan, s.vae_tiling, s.vae_slicing)
            if s.attention_slicing:
                self.notes.append(
                    "attention slicing: no effect for Z-Image (no component supports it; SDPA is memory-linear)"
                )
            self._te_device = self._module_device(pipe.text_encoder)
            self._tr_device = self._module_device(pipe.transformer)
            self.pipe = pipe
            tl.end(stage, "; ".join(self.notes))

            stage = tl.begin("compile setup")
            device_type = torch.device(self.device).type
            self.notes += speed.optimize(pipe, s, device_type, self.plan.mode)
            tl.end(stage, ", ".join(self.notes[-3:]))

            if s.warmup:
                stage = tl.begin("warm-up")
                self._warmup(speed.WARMUP_PROMPT)
                tl.end(stage)
            tl.ready()
            self.metrics.load_seconds.set(tl.ready_at or 0.0)
            self.metrics.ready.set(1)
            self.metrics.mode.labels(self.plan.mode).set(1)
            self._ready.set()
            log.info("model ready in %.1fs since process start (%s)", tl.ready_at, self.plan.mode)
        except Exception as exc:
            message = str(exc) if isinstance(exc, ZImageError) else f"{type(exc).__name__}: {exc}"
            tl.fail(message)
            raise

    def _pick_device(self, torch) -> tuple[str, Any]:
        """'cpu', 'cuda' (the policy picks the GPU) or 'cuda:N'; and the compute dtype."""
        s = self.settings
        device = s.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ZImageError(f"Setting 'device' is {device} but no CUDA GPU is available. Use --device cpu.")
        if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
            raise ZImageError(f"Setting 'device' must be auto, cpu, cuda or cuda:N (got {device!r}).")
        dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}.get(s.dtype)
        if dtype is None:
            dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        return device, dtype

    @staticmethod
    def _module_device(module) -> Any:
        import torch

        for p in module.parameters():
            return p.device
        return torch.device("cpu")

    def _warmup(self, prompt: str) -> None:
        """One short generation per warm-up size: pays for compiling, cuDNN/cuBLAS set-up and
        allocator growth before the first user does. Blocks are compiled with dynamic shapes, so
        other prompt lengths and sizes do not recompile (bench explore measured 0.5 s for a new
        caption length against 21 s for the first compile)."""
        w, h = self.default_size
        sizes = [parse_size(x) for x in self.settings.warmup_sizes.split(",") if x.strip()] or [(w, h)]
        for ww, hh in sizes:
            req = GenerationRequest(prompt=prompt, width=ww, height=hh, steps=2, seed=0)
            with self._gpu_lock:
                self._run(validate(req, self.limits), Job(), None)

    # ------------------------------------------------------------------------------------
    # jobs

    def new_job(self) -> Job:
        job = Job()
        with self._state_lock:
            self._jobs[job.id] = job
            if len(self._jobs) > 1000:  # forget old finished jobs
                for k in [k for k, j in self._jobs.items() if j.state in ("done", "cancelled", "failed")][:500]:
                    self._jobs.pop(k, None)
        return job

    def cancel(self, job_id: str) -> bool:
        job = self._jobs.get(job_id)
        if job is None:
            return False
        job.cancel()
        return True

    @property
    def queue_depth(self) -> int:
        return self._waiting

    @property
    def running_job(self) -> Job | None:
        return self._running

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
        try:
            req = validate(request, self.limits)
        except InvalidRequest as exc:
            self.metrics.requests.labels("invalid").inc()
            job.state = "failed"
            self._log_request(request, None, "invalid", exc)
            raise
        if not self._accepting:
            self.metrics.requests.labels("rejected").inc()
            self._log_request(req, None, "rejected", "shutting down")
            raise ShuttingDown("The server is shutting down and takes no new jobs. Try again in a minute.")
        if not self.ready:
            if self.load_error:
                self.metrics.requests.labels("unready").inc()
                self._log_request(req, None, "unready", "the model failed to load")
                raise NotReady(f"The model failed to load: {self.load_error}")
            if wait_ready is None or not self.wait_ready(wait_ready):
                self.metrics.requests.labels("unready").inc()
                self._log_request(req, None, "unready", "the model is still loading")
                raise NotReady(
                    self.load_error
                    and f"The model failed to load: {self.load_error}"
                    or f"The model is still loading ({self.timeline.current}, {self.timeline.percent:.0f}%)."
                )
        req = _with_seed(req)
        job.state = "queued"
        job.total = req.steps
        with self._state_lock:
            self._waiting += 1
        try:
            acquired = False
            while not acquired:
                acquired = self._gpu_lock.acquire(timeout=0.1)
                if not acquired and job.cancelled:
                    self.metrics.requests.labels("cancelled").inc()
                    job.state = "cancelled"
                    self._log_request(req, None, "cancelled", "before it started")
                    raise Cancelled("Cancelled before it started.")
                if not acquired and not self._accepting:
                    self.metrics.requests.labels("rejected").inc()
                    self._log_request(req, None, "rejected", "shutting down before it started")
                    raise ShuttingDown("The server is shutting down; this job did not start.")
        finally:
            with self._state_lock:
                self._waiting -= 1
        queue_wait = time.perf_counter() - t_request
        error: BaseException | None = None
        result: GenerationResult | None = None
        try:
            self._running = job
            job.state = "running"
            result = self._run_with_fallback(req, job, progress)
            result.timings.queue_wait = queue_wait
        except BaseException as exc:  # noqa: BLE001 - re-raised below after bookkeeping
            error = exc
        finally:
            self._running = None
            self._gpu_lock.release()
        if error is not None:
            job.state = "cancelled" if isinstance(error, Cancelled) else "failed"
            outcome = (
                "cancelled" if isinstance(error, Cancelled) else "oom" if isinstance(error, OutOfMemory) else "error"
            )
            self.metrics.requests.labels(outcome).inc()
            self._log_request(req, None, outcome, error)
            self._notify(None, error)
            if isinstance(error, ZImageError):
                raise error
            log.error("generation failed", exc_info=error)
            raise GenerationFailed(f"Generation failed: {type(error).__name__}: {str(error)[:300]}") from error
        assert result is not None
        job.state = "done"
        t = result.timings
        self.metrics.requests.labels("ok").inc()
        self.metrics.latency.observe(t.gpu_total)
        self.metrics.queue_wait.observe(queue_wait)
        self.metrics.images.inc(len(result.images))
        self.metrics.stage.labels("text_encoder").observe(t.text_encoder)
        self.metrics.stage.labels("denoise").observe(t.denoise)
        self.metrics.stage.labels("vae_decode").observe(t.vae_decode)
        self._images_made += len(result.images)
        if save:
            metas = [self._metadata(result, seed) for seed in result.seeds]

            def saved(paths: list[str], seconds: float) -> None:
                result.timings.png = seconds
                result.paths = paths
                self.metrics.stage.labels("png").observe(seconds)
                self._log_request(req, result, "ok", None)

            result._saved = self.store.save_async(result.images, metas, saved)
        else:
            self._log_request(req, result, "ok", None)
        self.recent.add(self._summary(result))
        self._notify(result, None)
        return result

    def _notify(self, result: GenerationResult | None, error: BaseException | None) -> None:
        for fn in list(self.job_listeners):
            try:
                fn(self, result, error)
            except Exception:  # noqa: BLE001 - a listener must not break generation
                log.exception("job listener failed")

    def _run_with_fallback(self, req: GenerationRequest, job: Job, progress: ProgressFn | None) -> GenerationResult:
        """Run; on CUDA out-of-memory free memory and retry once, one rung lower."""
        from .memory import downgrade, free_memory, is_oom

        try:
            return self._run(req, job, progress)
        except Exception as exc:
            if not is_oom(exc):
                raise
            stage = getattr(exc, "_zimage_stage", "generation")
            self.metrics.oom.inc()
            log.warning("out of GPU memory during %s (%s x%d); retrying", stage, f"{req.width}x{req.height}", req.count)
            del exc
            free_memory()
            note = self._fallback(stage, downgrade)
            try:
                result = self._run(req, job, progress)
            except Exception as again:
                if is_oom(again):
                    self.metrics.oom.inc()
                    free_memory()
                    raise OutOfMemory(
                        f"Out of GPU memory at {req.width}x{req.height} with {req.count} image(s), even after "
                        f"{note}. Try a smaller size or fewer images; the server is fine and the next request "
                        "will work."
                    ) from None
                raise
            result.notes.append(f"Ran out of GPU memory during {stage}; freed memory and retried with {note}.")
            return result

    def _fallback(self, stage: str, downgrade) -> str:
        """Make the next attempt lighter: VAE tiling for the decode, else the next lower memory mode."""
        vae = self.pipe.vae
        if stage == "vae_decode" and not getattr(vae, "use_tiling", False):
            vae.enable_tiling()
            self.notes.append("VAE tiling (after an out-of-memory error)")
            return "VAE tiling"
        if self.plan is not None:
            lower = downgrade(self.pipe, self.plan)
            if lower is not None:
                self.plan = lower
                self._te_device = self._module_device(self.pipe.text_encoder)
                self.metrics.mode.clear()
                self.metrics.mode.labels(lower.mode).set(1)
                self.notes.append(f"memory mode {lower.mode} (after an out-of-memory error)")
                return f"memory mode {lower.mode}"
        if not getattr(vae, "use_tiling", False):
            vae.enable_tiling()
            return "VAE tiling"
        return "freed memory"

    # ------------------------------------------------------------------------------------
    # the GPU part (caller holds the lock)

    def encode(self, prompt: str, real_length: bool | None = None):
        """Prompt embeddings (tokens, dim) on the transformer's device, as the pipeline computes them."""
        pipe = self.pipe
        if real_length is None:
            real_length = self.settings.real_length_prompt
        tok = pipe.tokenizer
        te = pipe.text_encoder
        text = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True, enable_thinking=True
        )
        if real_length:
            enc = tok([text], padding=False, truncation=True, max_length=512, return_tensors="pt")
        else:
            enc = tok([text], padding="max_length", max_length=512, truncation=True, return_tensors="pt")
        te_dev = self._exec_device_for(te)
        mask = enc.attention_mask.to(te_dev).bool()
        kwargs: dict[str, Any] = {"attention_mask": mask, "use_cache": False}
        embed = getattr(te, "_zimage_embed", None)
        if embed is not None:
            kwargs["inputs_embeds"] = embed(enc.input_ids).to(te_dev, non_blocking=True)
        else:
            kwargs["input_ids"] = enc.input_ids.to(te_dev)
        if getattr(te, "_zimage_trimmed", False):
            hidden = te(**kwargs).last_hidden_state
        else:
            hidden = te(**kwargs, output_hidden_states=True).hidden_states[-2]
        emb = hidden[0] if real_length else hidden[0][mask[0]]
        return emb.to(self._exec_device_for(pipe.transformer), non_blocking=True)

    def _exec_device_for(self, module) -> Any:
        import torch

        if self.plan is not None and self.plan.mode in ("balanced", "lowvram", "model-offload", "sequential-offload"):
            return torch.device(self.plan.execution_device)
        return self._module_device(module)

    def noise(self, seeds: list[int], width: int, height: int):
        """Initial latents: one CPU generator per image, as the pipeline's randn_tensor draws them."""
        import torch

        channels = self.pipe.transformer.config.in_channels
        lh, lw = 2 * (height // 16), 2 * (width // 16)
        parts = [
            torch.randn((1, channels, lh, lw), generator=torch.Generator("cpu").manual_seed(s), dtype=torch.float32)
            for s in seeds
        ]
        return torch.cat(parts).to(self._exec_device_for(self.pipe.transformer))

    def decode(self, latents):
        """Latents -> uint8 RGB (n, H, W, 3) on the device, matching VaeImageProcessor.postprocess."""
        import torch

        vae = self.pipe.vae
        lat = latents.to(vae.dtype)
        lat = lat / vae.config.scaling_factor + vae.config.shift_factor
        image = vae.decode(lat, return_dict=False)[0]
        image = (image / 2 + 0.5).clamp(0, 1)
        image = image.float().mul(255).round().to(torch.uint8)
        return image.permute(0, 2, 3, 1)

    def _run(self, req: GenerationRequest, job: Job, progress: ProgressFn | None):
        import torch
        from PIL import Image

        seeds = req.seeds()
        pipe = self.pipe
        exec_dev = self._exec_device_for(pipe.transformer)
        cuda = exec_dev.type == "cuda"
        # One device: CUDA events. Several, or offload hooks moving weights: synchronise per stage.
        single_stream = cuda and self.plan is not None and self.plan.mode in ("gpu", "balanced", "lowvram")
        timer = StageTimer(exec_dev if single_stream else None)
        sync = (lambda: torch.cuda.synchronize()) if cuda and not single_stream else (lambda: None)
        n = req.count
        stage = "text_encoder"

        def step_done(_pipe, i, _t, _kwargs):
            sync()
            timer.mark(f"step{i}")
            if single_stream and i >= 1:
                timer.wait_previous()  # keep one step in flight: honest progress, prompt cancel
                done = i
            else:
                done = i + 1
            job.step = done
            if progress:
                progress("denoise", done, req.steps)
            if job.cancelled:
                raise Cancelled("Cancelled.")
            return {}

        try:
            with torch.no_grad():
                timer.mark("start")
                if progress:
                    progress("text", 0, req.steps)
                pos = self.encode(req.prompt)
                neg = self.encode(req.negative_prompt) if req.guidance > 0 else None
                sync()
                timer.mark("text_encoder")
                if job.cancelled:
                    raise Cancelled("Cancelled.")
                stage = "denoise"
                latents = self.noise(seeds, req.width, req.height)
                latents = pipe(
                    prompt=None,
                    prompt_embeds=[pos] * n,
                    negative_prompt_embeds=[neg] * n if neg is not None else None,
                    height=req.height,
                    width=req.width,
                    num_inference_steps=req.steps,
                    guidance_scale=req.guidance,
                    latents=latents,
                    output_type="latent",
                    callback_on_step_end=step_done,
                    return_dict=False,
                )[0]
                stage = "vae_decode"
                if progress:
                    progress("decode", req.steps, req.steps)
                pixels = self.decode(latents)
                sync()
                timer.mark("vae_decode")
                stage = "to_host"
                host = pixels.cpu()
                timer.mark("to_host")
        except Exception as exc:
            exc._zimage_stage = stage  # type: ignore[attr-defined]
            raise
        marks = timer.resolve()
        timings = StageTimings()
        for name, dt in marks:
            if name == "text_encoder":
                timings.text_encoder = dt
            elif name.startswith("step"):
                timings.steps.append(dt)
            elif name == "vae_decode":
                timings.vae_decode = dt
            elif name == "to_host":
                timings.to_host = dt
        timings.gpu_total = sum(dt for _, dt in marks)
        images = [Image.fromarray(a) for a in host.numpy()]
        return GenerationResult(
            request=req,
            images=images,
            seeds=seeds,
            timings=timings,
            model=self.source.name if self.source else self.settings.model,
            memory_mode=self.plan.mode if self.plan else "?",
            device=self.device_name,
            job_id=job.id,
        )

    # ------------------------------------------------------------------------------------
    # reporting

    def _metadata(self, result: GenerationResult, seed: int) -> dict[str, Any]:
        r = result.request
        return {
            "prompt": r.prompt,
            "negative_prompt": r.negative_prompt,
            "seed": seed,
            "width": r.width,
            "height": r.height,
            "steps": r.steps,
            "guidance": r.guidance,
            "model": result.model,
            "memory_mode": result.memory_mode,
            "device": result.device,
            "timings": result.timings.as_dict(),
            "batch_seed": r.seed,
            "batch_count": r.count,
            "generator": "zimage",
        }

    def _summary(self, result: GenerationResult) -> dict[str, Any]:
        return {
            "job": result.job_id,
            "when": time.time(),
            "size": f"{result.request.width}x{result.request.height}",
            "count": result.request.count,
            "steps": result.request.steps,
            "seeds": result.seeds,
            "timings": result.timings,
            "notes": list(result.notes),
        }

    def _log_request(self, req: GenerationRequest, result: GenerationResult | None, outcome: str, error) -> None:
        # Every request gets its line, the ones that never ran too (invalid, refused while shutting
        # down or loading, cancelled in the queue); %s because an invalid request may hold any value.
        who = req.user or "-"
        times = result.timings.summary() if result else f"error: {str(error)[:200]}"
        log.info(
            "request user=%s size=%sx%s steps=%s count=%s seed=%s outcome=%s %s",
            who,
            req.width,
            req.height,
            req.steps,
            req.count,
            req.seed,
            outcome,
            times,
        )

    def _refresh_metrics(self) -> None:
        self.metrics.queue_depth.set(self._waiting)
        self.metrics.running.set(1 if self._running else 0)
        snap = memory_snapshot()
        if snap.get("host_rss_bytes") is not None:
            self.metrics.host_rss.set(snap["host_rss_bytes"])
        for g in snap.get("gpus", []):
            for kind in ("allocated", "reserved", "peak_allocated", "peak_reserved"):
                self.metrics.vram.labels(str(g["index"]), kind).set(g[f"{kind}_bytes"])

    def status(self) -> dict[str, Any]:
        """Everything the profiler panel and /ready show, as plain data."""
        last = self.recent.last()
        return {
            "ready": self.ready,
            "load": self.timeline.snapshot(),
            "model": self.source.name if self.source else self.settings.model,
            "device": self.device,
            "device_name": self.device_name,
            "dtype": self.dtype_name,
            "memory_mode": self.plan.mode if self.plan else None,
            "memory_reason": self.plan.reason if self.plan else None,
            "notes": list(self.notes),
            "queue_depth": self._waiting,
            "running": self._running.id if self._running else None,
            "running_step": (self._running.step, self._running.total) if self._running else None,
            "images_made": self._images_made,
            "uptime_s": time.time() - self.started,
            "memory": memory_snapshot(),
            "last": last,
            "pending_writes": self.store.pending,
        }

    # ------------------------------------------------------------------------------------
    # shutdown

    def shutdown(self, grace_s: float = 60.0) -> bool:
        """Stop taking jobs, let the running one finish (or cancel it after grace_s), flush files.

        Returns True when the running job finished on its own."""
        self._accepting = False
        finished = self._gpu_lock.acquire(timeout=max(0.0, grace_s))
        if not finished:
            job = self._running
            if job is not None:
                log.warning("shutdown: cancelling job %s after %.0fs", job.id, grace_s)
                job.cancel()
            finished_after_cancel = self._gpu_lock.acquire(timeout=30.0)
            if finished_after_cancel:
                self._gpu_lock.release()
        else:
            self._gpu_lock.release()
        self.store.close(wait=True)
        return finished


def _with_seed(req: GenerationRequest) -> GenerationRequest:
    from dataclasses import replace

    return replace(req, seed=resolve_seed(req.seed))


def _cpu_hardware():
    from .memory import Hardware

    try:
        import psutil

        vm = psutil.virtual_memory()
        return Hardware((), vm.total, vm.available)
    except Exception:  # noqa: BLE001
        return Hardware()
