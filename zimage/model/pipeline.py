"""The load sequence: find the model, choose the device and memory plan, read the weights while
the libraries import, assemble the pipeline, place it and set the speed switches.

`plan_memory` is the one memory plan: the engine and `python -m zimage doctor` both call it with
the same settings (device, memory fraction, per-GPU caps), so they cannot disagree.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

from zimage.errors import ZImageError
from zimage.model.loading import LoadOptions, ModelSource, assemble, footprint, load_components, resolve_model
from zimage.model.memory import (
    Footprint,
    Hardware,
    MemoryMode,
    MemoryPlan,
    cap_per_gpu,
    capped_hardware,
    choose_mode,
    parse_max_memory,
    probe_hardware,
)
from zimage.ops.profiler import LoadTimeline
from zimage.settings import Settings

log = logging.getLogger(__name__)

DTYPES = ("bfloat16", "float16", "float32")


@dataclass
class LoadedModel:
    """What the load sequence hands the service: the placed pipeline and the facts about it."""

    pipe: Any
    plan: MemoryPlan
    source: ModelSource
    device: str  # the execution device ("cpu", "cuda:0", ...)
    device_name: str
    dtype: Any
    notes: list[str] = field(default_factory=list)  # what is in effect (compile, backend, mode hooks)
    compile_mode: str = "off"  # what the compile beside serving builds ("off": eager only)

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).replace("torch.", "")


def pick_device(settings: Settings, torch: Any) -> tuple[str, Any]:
    """'cpu', 'cuda' (the policy picks the GPU) or 'cuda:N'; and the compute dtype."""
    device = settings.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ZImageError(f"Setting 'device' is {device} but no CUDA GPU is available. Use --device cpu.")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ZImageError(f"Setting 'device' must be auto, cpu, cuda or cuda:N (got {device!r}).")
    dtype = {name: getattr(torch, name) for name in DTYPES}.get(settings.dtype)
    if dtype is None:
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    return device, dtype


def cpu_hardware() -> Hardware:
    try:
        import psutil

        vm = psutil.virtual_memory()
        return Hardware((), vm.total, vm.available)
    except Exception:  # noqa: BLE001 - psutil missing or /proc unreadable: plan with no host numbers
        return Hardware()


def plan_memory(settings: Settings, fp: Footprint, device: str, hw: Hardware | None = None) -> MemoryPlan:
    """The memory plan for this device and model, with every cap the settings set."""
    if hw is None:
        hw = probe_hardware() if device.startswith("cuda") else cpu_hardware()
    if device.startswith("cuda:"):  # one GPU named: the policy sees only that one
        index = int(device.split(":", 1)[1])
        hw = Hardware(tuple(g for g in hw.gpus if g.index == index), hw.host_total, hw.host_available)
    hw = capped_hardware(hw, settings.memory_fraction)
    hw = cap_per_gpu(hw, parse_max_memory(settings.gpu_max_memory))
    return choose_mode(hw, fp, settings.memory_mode)


def prepare_process(settings: Settings) -> None:
    """Environment that torch reads when it is imported: the allocator and the compile caches."""
    from zimage.model import speed

    if settings.cuda_alloc_conf:
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", settings.cuda_alloc_conf)
    speed.prepare_compile_cache(settings)


def load_model(settings: Settings, tl: LoadTimeline) -> LoadedModel:
    """Run the load sequence, recording each stage on the timeline (the banner and /ready show it).

    The blocks are not compiled here: the model is ready on the eager path, and the compile runs
    beside serving (zimage.model.compiler)."""
    from zimage.model import early, speed
    from zimage.model.loading import WeightLoad

    s = settings
    prepare_process(s)  # before torch is imported
    side = early.start(s)  # no-op when the CLI started it at the first moment

    stage = tl.begin("find model")
    source = resolve_model(s)
    if s.loader == "fast":
        # the disk starts reading the weights while Python imports (after the libraries' readahead)
        early.prefetch_weights(source, after=side.libraries_read)
    tl.end(stage, f"{source.kind}: {source.path}")

    stage = tl.begin("import torch")
    early.wait_torch_libraries()
    import torch

    tl.end(stage, f"torch {torch.__version__}; early: {side.summary()}")

    stage = tl.begin("plan memory")
    device, dtype = pick_device(s, torch)
    from zimage.model.memory import apply_memory_fraction

    fp = footprint(source, s.trim_text_encoder)
    plan = plan_memory(s, fp, device)
    if device.startswith("cuda"):  # the GPUs the policy saw: the one named, or all of them
        named = torch.device(device).index
        for index in [named] if named is not None else range(torch.cuda.device_count()):
            apply_memory_fraction(s.memory_fraction, index)
    device = plan.execution_device
    device_name = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else "CPU"
    early.warm_cuda(device)  # cuBLAS, cuDNN, attention: first calls beside the imports below
    tl.end(stage, plan.describe())
    log.info("memory mode %s", plan.describe())

    opts = LoadOptions.from_settings(s, dtype)
    pin = plan.mode in (MemoryMode.BALANCED, MemoryMode.LOWVRAM)
    pending = None
    if s.loader == "fast":
        # Reads start now, on their own threads, and overlap the library imports below.
        pending = WeightLoad(source, plan.placement, opts, lambda _n, frac: tl.progress(frac), pin).start()

    stage = tl.begin("import libraries")
    from zimage.model.imports import import_libraries

    _seconds, version = import_libraries()
    tl.end(
        stage,
        f"diffusers {version}, model classes from their own modules"
        + (" (weights reading meanwhile)" if pending else ""),
    )

    stage = tl.begin("read weights")
    t0 = time.perf_counter()
    marks: dict[str, float] = {}
    modules = load_components(
        source,
        plan.placement,
        opts,
        progress=lambda _name, frac: tl.progress(frac),
        pin_offloaded=pin,
        pending=pending,
        marks=marks,
    )
    gib = fp.total / (1 << 30)
    steps = ", ".join(f"{k} {v:.2f}s" for k, v in marks.items())
    if pending is not None and pending.finished:
        detail = (
            f"{gib:.2f} GiB read in {pending.seconds:.2f}s ({gib / max(pending.seconds, 1e-9):.2f} GiB/s), "
            f"started {t0 - pending.started:.2f}s before this stage, beside the imports; {steps}"
        )
    else:
        detail = f"{gib:.2f} GiB in {time.perf_counter() - t0:.2f}s with {s.loader} loader; {steps}"
    tl.end(stage, detail)

    stage = tl.begin("assemble pipeline")
    from zimage.model.memory import apply_mode

    pipe = assemble(modules)
    notes = apply_mode(pipe, plan, s.vae_tiling, s.vae_slicing)
    if s.attention_slicing:
        notes.append("attention slicing: no effect for Z-Image (no component supports it; SDPA is memory-linear)")
    tl.end(stage, "; ".join(notes))

    stage = tl.begin("speed setup")
    speed_notes, mode = speed.prepare(pipe, s, torch.device(device).type, plan.mode)
    notes += speed_notes
    tl.end(stage, ", ".join(speed_notes) + (f"; compile {mode} beside serving" if mode != "off" else ""))
    return LoadedModel(pipe, plan, source, device, device_name, dtype, notes, compile_mode=mode)
