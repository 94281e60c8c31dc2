"""Serve at once, compile beside: the compiled blocks are built on their own thread while the
eager pipeline already serves, and go live between two jobs.

Every compiled module (the transformer's repeated blocks; the text encoder's layers and the
VAE decoder when those settings are on) gets a `_Route` as its `_compiled_call_impl`, the hook
`torch.nn.Module.__call__` consults. The route sends the call to the compiled function when the
calling thread's job runs on the compiled path, else to the module's own eager `_call_impl`.
A job takes its path once, when it starts (`BlockSwitch.job`), so a switch that lands while a
job runs changes nothing for that job: it finishes eager, and the next one runs compiled.

The compile thread loads the saved compile artifacts (zimage.model.artifacts), compiles by
running the compiled blocks once per warm-up size under its own thread's "compiled" path, then
flips `live`, and saves the artifacts when it had to make them. Where the whole model sits on
one device (gpu and cpu modes), that run goes beside the users' jobs (the transformer alone, on
random inputs of the real shapes: the pipeline object and its scheduler are never shared);
elsewhere memory is tight, so it takes the GPU lock for the run, a pause between two jobs.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from zimage.model import artifacts
from zimage.model.memory import MemoryMode

log = logging.getLogger(__name__)

EAGER, COMPILED = "eager", "compiled"
# What the banner says before a compile has been timed on this machine: seconds the compile took
# beside eager jobs on an H200 (bench/results, 2026-11-30), from artifacts and from nothing.
GUESS_WITH_ARTIFACTS_S = 11.0
GUESS_FRESH_S = 25.0
CONCURRENT_MODES = (MemoryMode.GPU, MemoryMode.CPU)


class _Route:
    """A module's `_compiled_call_impl`: compiled or eager, as the calling thread's job says."""

    def __init__(self, switch: BlockSwitch, module: Any, compiled: Callable[..., Any]):
        self.switch = switch
        self.module = module
        self.compiled = compiled

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.switch.compiled_here():
            return self.compiled(*args, **kwargs)
        return self.module._call_impl(*args, **kwargs)


class BlockSwitch:
    """Which path new jobs take, and each thread's path for the job it runs."""

    def __init__(self) -> None:
        self._local = threading.local()
        self.live = False  # new jobs take the compiled path
        self.modules: list[Any] = []

    def compiled_here(self) -> bool:
        return getattr(self._local, "compiled", False)

    def route(self, module: Any, compile_fn: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
        """Give `module` its route (what Module.compile does, with the eager way kept beside)."""
        module._compiled_call_impl = _Route(self, module, compile_fn(module._call_impl))
        self.modules.append(module)

    def unroute(self) -> None:
        for module in self.modules:
            module._compiled_call_impl = None
        self.modules.clear()
        self.live = False

    @contextlib.contextmanager
    def path(self, compiled: bool) -> Iterator[str]:
        """Run this thread's calls on one path until the block ends."""
        previous = getattr(self._local, "compiled", False)
        self._local.compiled = compiled
        try:
            yield COMPILED if compiled else EAGER
        finally:
            self._local.compiled = previous

    def job(self, allowed: bool = True) -> contextlib.AbstractContextManager[str]:
        """The path of a job starting now, kept for the whole job."""
        return self.path(self.live and allowed and bool(self.modules))


def blocks_of(transformer: Any) -> list[Any]:
    """The transformer's repeated blocks, as diffusers' compile_repeated_blocks finds them."""
    names = set(getattr(transformer, "_repeated_blocks", None) or ())
    if not names:
        raise ValueError(f"{type(transformer).__name__} names no repeated blocks to compile")
    return [m for m in transformer.modules() if type(m).__name__ in names]


def artifact_key(model: Any, settings: Any, mode: str, backend: Any) -> artifacts.ArtifactKey:
    """The compile artifacts' key of this model, placed and set up as it is, compiled this way."""
    processor = model.pipe.transformer.layers[0].attention.processor
    cuda = model.device.startswith("cuda")
    te = bool(settings.compile_text_encoder) and cuda and model.plan.mode in (MemoryMode.GPU, MemoryMode.MULTI_GPU)
    parts = [
        model.dtype_name,
        f"backend={backend if isinstance(backend, str) else 'custom'}",
        f"attention={getattr(processor, '_attention_backend', None)}",
        f"text_encoder={te}",
        f"vae={bool(settings.compile_vae) and cuda}",
    ]
    return artifacts.current_key(model.source.path, mode, ";".join(parts), model.device)


class CompileBeside:
    """The compile thread and what it reports: state, ETA, the artifacts it used or wrote."""

    def __init__(
        self,
        model: Any,  # LoadedModel
        settings: Any,
        mode: str,
        gpu_lock: threading.Lock,
        warmup_sizes: list[tuple[int, int]],
        backend: Any = "inductor",
        run_job: Callable[[], None] | None = None,
    ):
        self.model = model
        self.settings = settings
        self.mode = mode
        self.gpu_lock = gpu_lock
        self.warmup_sizes = warmup_sizes
        self.backend = backend
        self.run_job = run_job  # a whole warm-up job (when more than the blocks is compiled)
        self.switch = BlockSwitch()
        self.state = "waiting"  # waiting, compiling, live, failed
        self.detail = ""
        self.artifacts: artifacts.Loaded | None = None
        self.saved: str | None = None
        self.expected_s: float | None = None
        self.started = 0.0
        self.seconds: float | None = None
        self.error: str | None = None
        self.timeline: list[tuple[str, float]] = []  # (stage, seconds since process start)
        self.on_done: Callable[[CompileBeside], None] | None = None  # called once, live or failed
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self._origin: float | None = None
        self._key_used: artifacts.ArtifactKey | None = None

    # --- what the engine asks -------------------------------------------------------------

    @property
    def live(self) -> bool:
        return self.switch.live

    @property
    def compile_text_encoder(self) -> bool:
        cuda = self.model.device.startswith("cuda")
        return (
            bool(self.settings.compile_text_encoder)
            and cuda
            and self.model.plan.mode
            in (
                MemoryMode.GPU,
                MemoryMode.MULTI_GPU,
            )
        )

    @property
    def compile_vae(self) -> bool:
        return bool(self.settings.compile_vae) and self.model.device.startswith("cuda")

    @property
    def whole_job(self) -> bool:
        """More than the transformer blocks compiled: warm up with a whole job under the GPU lock."""
        return self.compile_text_encoder or self.compile_vae

    @property
    def is_started(self) -> bool:
        return self._thread is not None

    @property
    def concurrent(self) -> bool:
        return self.model.plan.mode in CONCURRENT_MODES and not self.whole_job

    def eta(self) -> float | None:
        """Seconds until full speed, as honest as the last compile on this machine allows."""
        if self.state in ("live", "failed"):
            return 0.0 if self.state == "live" else None
        expected = self.expected_s
        if expected is None:
            expected = GUESS_WITH_ARTIFACTS_S if self.artifacts and self.artifacts.status == "loaded" else GUESS_FRESH_S
        if not self.started:
            return expected
        return max(1.0, expected - (time.perf_counter() - self.started))

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def snapshot(self) -> dict[str, Any]:
        eta = self.eta()
        return {
            "state": self.state,
            "full_speed": self.state == "live",
            "eta_s": None if eta is None else round(eta, 1),
            "seconds": None if self.seconds is None else round(self.seconds, 2),
            "artifacts": None if self.artifacts is None else self.artifacts.status,
            "artifacts_saved": self.saved,
            "detail": self.detail,
            "error": self.error,
            "stages": [{"name": n, "at_s": round(t, 3)} for n, t in self.timeline],
        }

    # --- the thread -----------------------------------------------------------------------

    def start(self, origin: float | None = None) -> threading.Thread:
        if self._thread is not None:
            return self._thread
        self._origin = origin
        self._thread = threading.Thread(target=self._run, name="compile-beside", daemon=True)
        self._thread.start()
        return self._thread

    def _mark(self, name: str) -> None:
        base = self._origin if self._origin is not None else time.time()
        self.timeline.append((name, time.time() - base))

    def _run(self) -> None:
        self.started = time.perf_counter()
        self.state = "compiling"
        try:
            self._compile()
            self.seconds = time.perf_counter() - self.started
            self.state = "live"
            self._mark("live")
            log.info(
                "full speed: compiled blocks live %.1fs after the compile started (artifacts %s)",
                self.seconds,
                self.artifacts.status if self.artifacts else "-",
            )
            if self.artifacts is None or self.artifacts.status != "loaded":
                self._save()
            elif self._key_used is not None:  # the next start's estimate: a compile from artifacts
                artifacts.record_cached_seconds(self.settings.compile_cache_dir, self._key_used, self.seconds)
        except Exception as exc:  # noqa: BLE001 - the eager path keeps serving
            self.state = "failed"
            self.error = f"{type(exc).__name__}: {str(exc)[:300]}"
            self.switch.unroute()
            log.warning("compile failed (%s); serving on the eager path", self.error, exc_info=exc)
        finally:
            if self.on_done is not None:
                try:
                    self.on_done(self)
                except Exception:  # noqa: BLE001 - reporting must not break the thread's end
                    log.exception("compile listener failed")
            self._done.set()

    def _key(self) -> artifacts.ArtifactKey:
        return artifact_key(self.model, self.settings, self.mode, self.backend)

    def _compile(self) -> None:
        import torch

        from zimage.model import speed

        self._mark("compile start")
        key = self._key() if isinstance(self.backend, str) else None
        cache_dir = self.settings.compile_cache_dir
        if key is not None:
            self.artifacts = artifacts.load(cache_dir, key)
            if self.artifacts.status == "loaded":
                self.expected_s = self.artifacts.cached_seconds or GUESS_WITH_ARTIFACTS_S
            self._mark(f"artifacts {self.artifacts.status}")
        self._key_used = key
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        kwargs: dict[str, Any] = {"fullgraph": True, "dynamic": True, "backend": self.backend}
        if self.mode == "regional-max-autotune":
            kwargs["mode"] = "max-autotune-no-cudagraphs"

        def compile_fn(fn):
            return torch.compile(fn, **kwargs)

        pipe = self.model.pipe
        with self._gpu_turn(self.whole_job):
            for block in blocks_of(pipe.transformer):
                self.switch.route(block, compile_fn)
            if self.whole_job:
                if self.compile_text_encoder:
                    for layer in pipe.text_encoder.layers:
                        self.switch.route(layer, lambda f: torch.compile(f, dynamic=True))
                if self.compile_vae:
                    pipe.vae.to(memory_format=torch.channels_last)
                    self.switch.route(pipe.vae.decoder, lambda f: torch.compile(f, dynamic=True))
            self._mark("routes set")
            with self._gpu_turn(not self.concurrent and not self.whole_job), self.switch.path(True):
                if self.whole_job and self.run_job is not None:
                    self.run_job()
                else:
                    for width, height in self.warmup_sizes:
                        self._run_blocks(width, height)
        self._mark("compiled")
        self.detail = speed.describe_compile(self.mode, self.settings, self.model.device)
        self.switch.live = True

    @contextlib.contextmanager
    def _gpu_turn(self, needed: bool) -> Iterator[None]:
        if not needed:
            yield
            return
        with self.gpu_lock:
            yield

    def _run_blocks(self, width: int, height: int) -> None:
        """One transformer call on random inputs of a real request's shapes (1 image, a
        60-token prompt): it traces, compiles and runs the blocks, and touches no shared state."""
        import torch

        from zimage.service.runner import module_device

        transformer = self.model.pipe.transformer
        device = module_device(transformer)
        dtype = transformer.dtype
        cfg = transformer.config
        gen = torch.Generator("cpu").manual_seed(0)
        latent = torch.randn((cfg.in_channels, 1, 2 * (height // 16), 2 * (width // 16)), generator=gen)
        caption = torch.randn((60, cfg.cap_feat_dim), generator=gen)
        timestep = torch.tensor([0.5], dtype=torch.float32, device=device)
        with torch.no_grad():
            out = transformer([latent.to(device, dtype)], timestep, [caption.to(device, dtype)], return_dict=False)[0]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        del out

    def _save(self) -> None:
        key = getattr(self, "_key_used", None)
        if key is None:
            return
        try:
            path = artifacts.save(self.settings.compile_cache_dir, key, self.seconds or 0.0)
            self.saved = str(path) if path else None
        except Exception as exc:  # noqa: BLE001 - a full disk must not stop serving
            log.warning("could not save compile artifacts (%s: %s)", type(exc).__name__, exc)


# ------------------------------------------------------------------------------------------
# the replica's side (zimage.service.replicas.LocalReplica)


def start_beside(replica: Any, warmup: list[Any], run_job: Callable[[], None]) -> CompileBeside | None:
    """The compile of a replica's freshly loaded model, started by the replica after its eager
    warm-up (where it runs beside jobs, at once when there is no warm-up). Not beside the warm-up:
    on a restart from artifacts (H200, 2026-11-30) the compile thread's ten seconds of Python
    held the GIL so that the one-step eager warm-up took 6.1 s instead of about 1.5 s, and /ready
    came that much later; the compile itself only waits those 1.5 s."""
    model = replica.model
    if model.compile_mode == "off":
        return None
    compiler = CompileBeside(
        model,
        replica.settings,
        model.compile_mode,
        replica._gpu,
        [(r.width, r.height) for r in warmup],
        backend=replica.compile_backend,
        run_job=run_job,
    )
    compiler.on_done = replica._compile_done
    if compiler.concurrent and not replica.settings.warmup:
        compiler.start(replica.timeline.origin)
    return compiler


def job_path(replica: Any, eager: bool = False) -> contextlib.AbstractContextManager[str]:
    """The path of a job starting now on this replica (eager when asked or without a compiler)."""
    compiler = replica.compiler
    if compiler is None:
        return contextlib.nullcontext(EAGER)
    if eager:
        return compiler.switch.path(False)
    from zimage.model.speed import compile_mode

    model = replica.model
    device_type = "cuda" if model.device.startswith("cuda") else "cpu"
    # after an out-of-memory downgrade to a streaming mode the blocks carry hooks: eager only
    return compiler.switch.job(compile_mode(replica.settings, device_type, model.plan.mode) != "off")


def speed_of(compiler: CompileBeside | None, loaded: bool) -> dict[str, Any]:
    """A replica's speed for status(): its compiler's state, or eager-only when it compiles nothing."""
    if compiler is None:
        return {"state": "eager-only" if loaded else "loading", "full_speed": loaded, "eta_s": 0.0 if loaded else None}
    return compiler.snapshot()
