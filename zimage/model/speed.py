"""Speed switches applied once after loading: attention backend, regional compile with a
persistent cache, VAE compile, and the warm-up requests that pay the compile before users do.

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
    """diffusers' Z-Image attention processor, minus one no-op.

    The original wraps RoPE in ``torch.amp.autocast("cuda", enabled=False)``. zimage never runs
    under autocast, so that context changes nothing here, but it puts an autocast node in the
    compiled graph and AOTAutograd refuses to cache such graphs: every start re-ran AOT
    compilation of the blocks even with the compile cache on disk. Same operations otherwise,
    in the same order and dtypes (tests compare the pictures)."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn
    from diffusers.models.transformers.transformer_z_image import ZSingleStreamAttnProcessor

    class ExactRopeAttnProcessor(ZSingleStreamAttnProcessor):
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, freqs_cis=None):
            import torch

            query = attn.to_q(hidden_states).unflatten(-1, (attn.heads, -1))
            key = attn.to_k(hidden_states).unflatten(-1, (attn.heads, -1))
            value = attn.to_v(hidden_states).unflatten(-1, (attn.heads, -1))
            if attn.norm_q is not None:
                query = attn.norm_q(query)
            if attn.norm_k is not None:
                key = attn.norm_k(key)

            def rope(x_in):
                x = torch.view_as_complex(x_in.float().reshape(*x_in.shape[:-1], -1, 2))
                return torch.view_as_real(x * freqs_cis.unsqueeze(2)).flatten(3).type_as(x_in)

            if freqs_cis is not None:
                query, key = rope(query), rope(key)
            dtype = query.dtype
            if attention_mask is not None and attention_mask.ndim == 2:
                attention_mask = attention_mask[:, None, None, :]
            hidden_states = dispatch_attention_fn(
                query,
                key,
                value,
                attn_mask=attention_mask,
                dropout_p=0.0,
                is_causal=False,
                backend=self._attention_backend,
                parallel_config=self._parallel_config,
            )
            hidden_states = hidden_states.flatten(2, 3).to(dtype)
            output = attn.to_out[0](hidden_states)
            if len(attn.to_out) > 1:
                output = attn.to_out[1](output)
            return output

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


def optimize(pipe: Any, settings: Settings, device_type: str, memory_mode: str) -> list[str]:
    """Apply the speed switches; returns human-readable notes of what is in effect."""
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
        import torch

        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        # keep the processor's attention backend, then drop the autocast no-op (see exact_rope_processor)
        previous = pipe.transformer.layers[0].attention.processor
        processor = exact_rope_processor()
        processor._attention_backend = getattr(previous, "_attention_backend", None)
        install_processor(pipe.transformer, processor)
        kwargs: dict[str, Any] = {"fullgraph": True, "dynamic": True}
        if mode == "regional-max-autotune":
            kwargs["mode"] = "max-autotune-no-cudagraphs"
        pipe.transformer.compile_repeated_blocks(**kwargs)
        notes.append(f"transformer blocks compiled ({mode}, dynamic shapes)")
        if (
            settings.compile_text_encoder
            and device_type == "cuda"
            and memory_mode in (MemoryMode.GPU, MemoryMode.MULTI_GPU)
        ):
            compile_text_encoder(pipe.text_encoder)
            notes.append("text encoder layers compiled")
        if settings.compile_vae and device_type == "cuda":
            pipe.vae.to(memory_format=torch.channels_last)
            pipe.vae.decoder.compile(dynamic=True)
            notes.append("VAE decoder compiled (channels_last)")
    else:
        notes.append("no compile")
    return notes


def compile_text_encoder(text_encoder: Any) -> None:
    """Each decoder layer on its own (the model's outer forward has Python the tracer dislikes)."""
    for layer in text_encoder.layers:
        layer.compile(dynamic=True)


WARMUP_PROMPT = "A lighthouse on a cliff at dusk"
