"""Speed switches applied once after loading: the attention backend, the compile mode and its
persistent caches (the compile itself runs beside serving: zimage.model.compiler).

Every switch here is exact: it changes how the math runs, never what it computes.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from zimage.model.memory import MemoryMode
from zimage.settings import Settings

log = logging.getLogger(__name__)


def exact_rope_processor():
    """diffusers' Z-Image attention processor minus an autocast no-op (see zimage.model.processor)."""
    from zimage.model.processor import ExactRopeAttnProcessor

    return ExactRopeAttnProcessor()


def install_processor(transformer: Any, processor: Any) -> None:
    for module in transformer.modules():
        if hasattr(module, "set_processor") and hasattr(module, "processor"):
            module.set_processor(processor)


def compile_mode(settings: Settings, device_type: str, memory_mode: str) -> str:
    """The compile mode in effect: off on CPU and where blocks are streamed (hooks can't be traced)."""
    mode = settings.compile
    if mode == "auto":
        mode = "regional" if device_type == "cuda" else "off"
    if memory_mode in (MemoryMode.LOWVRAM, MemoryMode.MODEL_OFFLOAD, MemoryMode.SEQUENTIAL_OFFLOAD):
        return "off"
    return mode


def prepare_compile_cache(settings: Settings) -> None:
    """Point Inductor's on-disk caches at our folder before anything compiles."""
    path = os.path.expanduser(settings.compile_cache_dir)
    os.makedirs(path, exist_ok=True)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", path)
    os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(path, "triton"))
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")


def pick_attention_backend(requested: str, device_type: str) -> str | None:
    """diffusers attention backend name, or None to leave the default (SDPA)."""
    if device_type != "cuda":
        return None
    if requested != "auto":
        return requested
    # Measured on an H100 at 1024px (bench/results): SDPA picks cuDNN/flash itself and was
    # as fast as forcing _native_cudnn; flash-attn 3 is used when its package is installed.
    try:
        import flash_attn_interface  # noqa: F401

        return "_flash_3"
    except ImportError:
        return None


def prepare(pipe: Any, settings: Settings, device_type: str, memory_mode: str) -> tuple[list[str], str]:
    """The switches that apply before the first job: the attention backend, and the exact RoPE
    processor where the blocks will be compiled. Returns (notes, compile mode); the compile
    itself runs beside serving (zimage.model.compiler)."""
    notes: list[str] = []
    backend = pick_attention_backend(settings.attention_backend, device_type)
    if backend:
        try:
            pipe.transformer.set_attention_backend(backend)
            notes.append(f"attention backend {backend}")
        except Exception as exc:  # noqa: BLE001 - a missing backend must not stop the app
            log.warning("attention backend %s unavailable (%s); using SDPA", backend, exc)
            notes.append(f"attention backend SDPA ({backend} unavailable)")
    else:
        notes.append("attention backend SDPA")

    mode = compile_mode(settings, device_type, memory_mode)
    if mode != "off":
        # keep the processor's attention backend, then drop the autocast no-op (see processor.py)
        previous = pipe.transformer.layers[0].attention.processor
        processor = exact_rope_processor()
        processor._attention_backend = getattr(previous, "_attention_backend", None)
        install_processor(pipe.transformer, processor)
    else:
        notes.append("no compile")
    return notes, mode


def describe_compile(mode: str, settings: Settings, device: str) -> str:
    parts = [f"transformer blocks compiled ({mode}, dynamic shapes)"]
    if device.startswith("cuda") and settings.compile_text_encoder:
        parts.append("text encoder layers compiled")
    if device.startswith("cuda") and settings.compile_vae:
        parts.append("VAE decoder compiled (channels_last)")
    return ", ".join(parts)


def compile_text_encoder(text_encoder: Any) -> None:
    """Each decoder layer on its own (the model's outer forward has Python the tracer dislikes)."""
    for layer in text_encoder.layers:
        layer.compile(dynamic=True)


WARMUP_PROMPT = "A lighthouse on a cliff at dusk"
