"""The one memory policy, the placement it implies, and out-of-memory handling.

`choose_mode` is a pure function of the hardware and the model's size: the rest of the code
asks it and never re-decides. Modes:

- gpu:                every component resident on one GPU (fastest);
- balanced:           transformer and VAE resident; the text encoder lives in pinned host
                      memory and is streamed in a layer at a time on a side stream (16 GB cards);
- lowvram:            the transformer's blocks are streamed too, the next one prefetched while
                      the current one runs (8 GB cards);
- multi-gpu:          components placed on different GPUs (text encoder on one, transformer
                      and VAE on another), each loaded straight to its GPU;
- model-offload:      diffusers' enable_model_cpu_offload();
- sequential-offload: diffusers' enable_sequential_cpu_offload();
- cpu:                no GPU: everything on the CPU in float32.
"""

from __future__ import annotations

import enum
import logging
import weakref
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

GiB = 1 << 30


class MemoryMode(enum.StrEnum):
    """How the model sits on the hardware. A StrEnum: settings, logs and metrics see its text."""

    GPU = "gpu"
    BALANCED = "balanced"
    LOWVRAM = "lowvram"
    MULTI_GPU = "multi-gpu"
    MODEL_OFFLOAD = "model-offload"
    SEQUENTIAL_OFFLOAD = "sequential-offload"
    CPU = "cpu"


M = MemoryMode
# Order used by the OOM ladder: each mode falls back to the next one.
LADDER = (M.GPU, M.BALANCED, M.LOWVRAM, M.SEQUENTIAL_OFFLOAD)
STREAMING_MODES = (M.BALANCED, M.LOWVRAM)
# Modes whose hooks move weights to the execution device as they run: tensors go there, not to a weight's device.
HOOKED_MODES = (M.BALANCED, M.LOWVRAM, M.MODEL_OFFLOAD, M.SEQUENTIAL_OFFLOAD)
# One device, one stream: CUDA events time the stages without a sync.
SINGLE_STREAM_MODES = (M.GPU, M.BALANCED, M.LOWVRAM)
# The token-embedding table each streamed text encoder keeps on the host (see detach_embeddings).
_HOST_EMBEDDINGS: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class GPUInfo:
    index: int
    name: str
    total: int  # bytes
    free: int  # bytes


@dataclass(frozen=True)
class Hardware:
    gpus: tuple[GPUInfo, ...] = ()
    host_total: int = 0
    host_available: int = 0

    def describe(self) -> str:
        if not self.gpus:
            return f"no CUDA GPU; {self.host_total / GiB:.0f} GiB host RAM"
        cards = ", ".join(f"{g.name} {g.free / GiB:.1f}/{g.total / GiB:.1f} GiB free" for g in self.gpus)
        return f"{len(self.gpus)} GPU(s): {cards}; {self.host_available / GiB:.0f} GiB host RAM available"


@dataclass(frozen=True)
class Footprint:
    """Bytes of each component's weights as they will sit in memory."""

    transformer: int
    text_encoder: int
    vae: int
    # Activation headroom for a 1024x1024 image: the VAE decoder's full-resolution feature
    # maps dominate (about 2.6 GiB measured for the real model, see bench/results).
    activations: int = int(3.0 * GiB)
    # Streaming buffers: the largest transformer block and text-encoder layer, twice (current + prefetch).
    transformer_block: int = 0
    text_layer: int = 0

    @property
    def total(self) -> int:
        return self.transformer + self.text_encoder + self.vae


@dataclass(frozen=True)
class MemoryPlan:
    mode: MemoryMode
    reason: str
    # component -> device string where its weights live ("cpu" for streamed/offloaded ones)
    placement: dict[str, str] = field(default_factory=dict)
    execution_device: str = "cpu"

    def describe(self) -> str:
        return f"{self.mode} ({self.reason})"


def _fmt(n: int) -> str:
    return f"{n / GiB:.1f} GiB"


def choose_mode(hw: Hardware, fp: Footprint, requested: str = "auto") -> MemoryPlan:
    """Pick the memory mode for this hardware and model. Pure: no torch calls."""
    if requested in STREAMING_MODES and not hw.gpus:
        # No GPU: the streaming hooks still run (CPU to CPU), which is how tests cover them.
        comp = dict.fromkeys(("transformer", "text_encoder", "vae"), "cpu")
        return MemoryPlan(
            MemoryMode(requested),
            "set by the memory_mode setting; no GPU, so it streams CPU to CPU and saves nothing",
            comp,
            "cpu",
        )
    if requested not in ("auto", M.CPU) and not hw.gpus:
        return _plan(M.CPU, f"memory_mode={requested} needs a CUDA GPU and none was found", hw, fp)
    if requested != "auto":
        return _plan(requested, f"set by the memory_mode setting; {hw.describe()}", hw, fp)
    if not hw.gpus:
        return _plan(M.CPU, "no CUDA GPU found", hw, fp)

    best = max(hw.gpus, key=lambda g: g.free)
    need_all = fp.total + fp.activations
    if best.free >= need_all:
        return _plan(
            M.GPU,
            f"all weights fit: need {_fmt(need_all)}, GPU {best.index} has {_fmt(best.free)} free",
            hw,
            fp,
        )
    if len(hw.gpus) > 1:
        ranked = sorted(hw.gpus, key=lambda g: g.free, reverse=True)
        main, other = ranked[0], ranked[1]
        if main.free >= fp.transformer + fp.vae + fp.activations and other.free >= fp.text_encoder + GiB // 2:
            return _plan(
                M.MULTI_GPU,
                f"no single GPU holds {_fmt(need_all)}; transformer+VAE on GPU {main.index}, "
                f"text encoder on GPU {other.index}",
                hw,
                fp,
            )
    streaming_te = 2 * fp.text_layer
    if best.free >= fp.transformer + fp.vae + fp.activations + streaming_te:
        if hw.host_available and hw.host_available < fp.text_encoder * 1.3:
            log.warning("balanced mode wants %s of host RAM for the text encoder", _fmt(fp.text_encoder))
        return _plan(
            M.BALANCED,
            f"GPU {best.index} has {_fmt(best.free)} free: the transformer fits but not the text encoder "
            f"too (need {_fmt(need_all)}); streaming the text encoder",
            hw,
            fp,
        )
    minimum = fp.vae + fp.activations + 2 * max(fp.transformer_block, fp.text_layer)
    if best.free >= minimum:
        return _plan(
            M.LOWVRAM,
            f"GPU {best.index} has {_fmt(best.free)} free, less than the transformer needs "
            f"({_fmt(fp.transformer + fp.vae + fp.activations)}); streaming transformer blocks",
            hw,
            fp,
        )
    return _plan(
        M.SEQUENTIAL_OFFLOAD,
        f"GPU {best.index} has only {_fmt(best.free)} free; offloading every layer",
        hw,
        fp,
    )


def _plan(mode: MemoryMode | str, reason: str, hw: Hardware, fp: Footprint) -> MemoryPlan:
    if mode == M.CPU or not hw.gpus:
        comp = dict.fromkeys(("transformer", "text_encoder", "vae"), "cpu")
        return MemoryPlan(M.CPU, reason, comp, "cpu")
    best = max(hw.gpus, key=lambda g: g.free)
    dev = f"cuda:{best.index}"
    if mode == M.GPU:
        placement = dict.fromkeys(("transformer", "text_encoder", "vae"), dev)
    elif mode == M.BALANCED:
        placement = {"transformer": dev, "vae": dev, "text_encoder": "cpu"}
    elif mode == M.LOWVRAM:
        placement = {"transformer": "cpu", "vae": dev, "text_encoder": "cpu"}
    elif mode == M.MULTI_GPU:
        placement = _split(hw, fp)
    elif mode in (M.MODEL_OFFLOAD, M.SEQUENTIAL_OFFLOAD):
        placement = dict.fromkeys(("transformer", "text_encoder", "vae"), "cpu")
    else:
        raise ValueError(f"unknown memory mode {mode!r}")
    return MemoryPlan(MemoryMode(mode), reason, placement, dev)


def _split(hw: Hardware, fp: Footprint) -> dict[str, str]:
    """multi-gpu placement: the transformer on the GPU with the most free memory (as max_memory
    caps it), the text encoder on the next; the VAE beside the transformer when its decode fits
    there, else beside the text encoder when it fits there."""
    ranked = sorted(hw.gpus, key=lambda g: g.free, reverse=True)
    main = ranked[0]
    other = ranked[1] if len(ranked) > 1 else main
    vae = main
    if other is not main and main.free < fp.transformer + fp.vae + fp.activations:
        if other.free >= fp.text_encoder + fp.vae + fp.activations:
            vae = other
    return {"transformer": f"cuda:{main.index}", "text_encoder": f"cuda:{other.index}", "vae": f"cuda:{vae.index}"}


def next_lower(mode: str) -> str | None:
    """The mode the OOM ladder falls back to, or None at the bottom."""
    if mode in LADDER:
        i = LADDER.index(mode)
        return LADDER[i + 1] if i + 1 < len(LADDER) else None
    return None


# ------------------------------------------------------------------------------------------
# hardware probing (the only impure part)


def probe_hardware() -> Hardware:
    import psutil
    import torch

    vm = psutil.virtual_memory()
    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            gpus.append(GPUInfo(i, torch.cuda.get_device_name(i), total, free))
    return Hardware(tuple(gpus), vm.total, vm.available)


def apply_memory_fraction(fraction: float, device: Any) -> None:
    import torch

    if fraction and torch.cuda.is_available():
        torch.cuda.set_per_process_memory_fraction(fraction, device)


def capped_hardware(hw: Hardware, fraction: float) -> Hardware:
    """What the policy should see when a memory fraction caps each GPU."""
    if not fraction:
        return hw
    gpus = tuple(
        GPUInfo(g.index, g.name, int(g.total * fraction), min(g.free, int(g.total * fraction))) for g in hw.gpus
    )
    return Hardware(gpus, hw.host_total, hw.host_available)


def parse_max_memory(text: str) -> dict[int, int]:
    """'0=20GiB,1=70GiB' -> {0: bytes, 1: bytes} (accelerate's max_memory, per GPU index)."""
    out: dict[int, int] = {}
    units = {"gib": 1 << 30, "gb": 10**9, "mib": 1 << 20, "mb": 10**6}
    for part in filter(None, (p.strip() for p in text.split(","))):
        index, _, amount = part.partition("=")
        amount = amount.strip().lower()
        unit = next((u for u in units if amount.endswith(u)), None)
        try:
            number = float(amount[: -len(unit)] if unit else amount)
            out[int(index)] = int(number * (units[unit] if unit else 1))
        except ValueError:
            raise ValueError(
                f"gpu_max_memory entries must look like 0=20GiB (got {part!r}); units GiB, GB, MiB, MB"
            ) from None
    return out


def cap_per_gpu(hw: Hardware, caps: dict[int, int]) -> Hardware:
    """What the policy should see when max_memory limits some GPUs."""
    if not caps:
        return hw
    gpus = tuple(
        GPUInfo(g.index, g.name, min(g.total, caps.get(g.index, g.total)), min(g.free, caps.get(g.index, g.free)))
        for g in hw.gpus
    )
    return Hardware(gpus, hw.host_total, hw.host_available)


# ------------------------------------------------------------------------------------------
# errors


def is_oom(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text.lower() and "CUDA" in text)


_FATAL_MARKERS = (
    "illegal memory access",
    "device-side assert",
    "unspecified launch failure",
    "misaligned address",
    "CUDA error: an illegal instruction",
    "CUBLAS_STATUS_EXECUTION_FAILED",
    "uncorrectable ECC error",
)


def is_unrecoverable_cuda(exc: BaseException) -> bool:
    """CUDA errors after which the context is unusable: only a fresh process helps."""
    text = str(exc)
    return any(m in text for m in _FATAL_MARKERS)


def free_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------
# applying a plan to a loaded pipeline


def _stream(module: Any, device: Any) -> None:
    """Stream a module's blocks from (pinned) host memory, prefetching the next on a side stream.

    diffusers' block-level group offloading does the work; on CPU (tests) the same hooks run
    with no copies, which keeps the streaming path covered where there is no GPU.
    """
    import torch
    from diffusers.hooks import apply_group_offloading

    device = torch.device(device)
    cuda = device.type == "cuda"
    apply_group_offloading(
        module,
        onload_device=device,
        offload_device=torch.device("cpu"),
        offload_type="block_level",
        num_blocks_per_group=1,
        non_blocking=cuda,
        use_stream=cuda,
        record_stream=cuda,
        low_cpu_mem_usage=False,
    )


def detach_embeddings(text_encoder: Any) -> None:
    """Keep the 0.8 GB token-embedding table on the host: only the prompt's rows are looked up
    there and sent to the GPU, instead of the whole table travelling for every prompt."""
    if text_encoder not in _HOST_EMBEDDINGS and text_encoder.embed_tokens is not None:
        # Held here, not as a submodule: a registered child would join the offload hooks'
        # "unmatched" group, which copies it to the GPU and back (through pageable memory) for
        # every prompt. Measured on an H100 before this fix: 0.77-0.87 s per prompt.
        _HOST_EMBEDDINGS[text_encoder] = text_encoder.embed_tokens
        text_encoder.embed_tokens = None


def host_embedding(text_encoder: Any) -> Any:
    """The host-side embedding table detach_embeddings took from this text encoder, or None."""
    return _HOST_EMBEDDINGS.get(text_encoder)


_ON_TRANSFORMER: dict[type, type] = {}


def _transformer_device(pipe: Any) -> Any:
    """The device the denoising loop runs on: the transformer's, unless offload hooks decide."""
    if getattr(pipe.transformer, "_diffusers_hook", None) is None and not any(
        hasattr(m, "_hf_hook") for m in pipe.components.values() if hasattr(m, "modules")
    ):
        for p in pipe.transformer.parameters():
            return p.device
    return super(type(pipe), pipe)._execution_device


def execute_on_transformer(pipe: Any) -> Any:
    """Make the pipeline's `_execution_device` the transformer's device.

    diffusers takes it from the first component in name order, the text encoder, and makes the
    timesteps and moves the latents there: with the text encoder on another GPU (multi-gpu) the
    transformer then gets tensors from the wrong GPU ("mat1 is on cuda:1, different from other
    tensors on cuda:0" in t_embedder). The instance gets a subclass of its own class whose
    property answers the transformer's device; with offload hooks the library's answer stands.
    Idempotent; call it on every pipeline made from these components (from_pipe) too."""
    cls = type(pipe)
    if getattr(cls, "_zimage_on_transformer", False):
        return pipe
    sub = _ON_TRANSFORMER.get(cls)
    if sub is None:
        sub = type(
            cls.__name__,
            (cls,),
            {
                "_execution_device": property(_transformer_device),
                "_zimage_on_transformer": True,
                "__module__": cls.__module__,
            },
        )
        _ON_TRANSFORMER[cls] = sub
    pipe.__class__ = sub
    return pipe


def apply_mode(pipe: Any, plan: MemoryPlan, vae_tiling: bool = False, vae_slicing: bool = False) -> list[str]:
    """Install the hooks a plan needs; returns notes for the UI."""
    notes: list[str] = []
    execute_on_transformer(pipe)
    from zimage.model.decode import chunk_vae_attention, lean_vae_decoder

    lean_vae_decoder(pipe.vae)
    chunk_vae_attention(pipe.vae)
    exec_dev = plan.execution_device
    if plan.mode in STREAMING_MODES:
        detach_embeddings(pipe.text_encoder)
        _stream(pipe.text_encoder, exec_dev)
        notes.append("text encoder streamed layer by layer from pinned host memory")
        if plan.mode == M.LOWVRAM:
            _stream(pipe.transformer, exec_dev)
            notes.append("transformer blocks streamed with prefetch")
    elif plan.mode == M.MODEL_OFFLOAD:
        pipe.enable_model_cpu_offload(device=exec_dev)
        notes.append("diffusers model CPU offload")
    elif plan.mode == M.SEQUENTIAL_OFFLOAD:
        pipe.enable_sequential_cpu_offload(device=exec_dev)
        notes.append("diffusers sequential CPU offload")
    if vae_tiling:
        pipe.vae.enable_tiling()
        notes.append("VAE tiling")
    if vae_slicing:
        pipe.vae.enable_slicing()
        notes.append("VAE slicing")
    return notes


def downgrade(pipe: Any, plan: MemoryPlan) -> MemoryPlan | None:
    """Move a running pipeline one rung down the OOM ladder (gpu -> balanced -> lowvram)."""
    import torch

    target = next_lower(plan.mode)
    if target not in STREAMING_MODES:
        return None
    cuda = torch.device(plan.execution_device).type == "cuda"

    def to_host(module: Any) -> None:
        module.to("cpu")
        if cuda:
            for p in module.parameters():
                p.data = p.data.pin_memory()

    if plan.mode == M.GPU:  # -> balanced
        to_host(pipe.text_encoder)
        detach_embeddings(pipe.text_encoder)
        _stream(pipe.text_encoder, plan.execution_device)
        placement = dict(plan.placement, text_encoder="cpu")
    elif plan.mode == M.BALANCED:  # -> lowvram
        for block in pipe.transformer.modules():  # compiled blocks cannot trace offload hooks
            if getattr(block, "_compiled_call_impl", None) is not None:
                block._compiled_call_impl = None
        to_host(pipe.transformer)
        _stream(pipe.transformer, plan.execution_device)
        placement = dict(plan.placement, transformer="cpu")
    else:
        return None
    free_memory()
    return MemoryPlan(
        target, f"fell back from {plan.mode} after running out of GPU memory", placement, plan.execution_device
    )
