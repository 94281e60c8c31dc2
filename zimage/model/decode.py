"""The VAE decode's memory: the peak of a run in the streaming modes (balanced, lowvram).

Exact measures, applied at load to every pipeline: in-place activations in the decoder and its
self-attention taken a block of queries at a time. Per request, `decode_strategy` decodes a batch
whole, one image at a time (exact) or, only when even one image does not fit the free memory, in
tiles (approximate; the result says so).
"""

from __future__ import annotations

from typing import Any

GiB = 1 << 30


def lean_vae_decoder(vae: Any) -> int:
    """SiLU in place inside the VAE decoder wherever its input is a fresh tensor (a GroupNorm's
    output): the same values, one full-resolution feature map fewer alive at the decode's peak
    (the decode is the peak of a run in balanced mode). Returns how many activations changed."""
    import torch
    from diffusers.models.resnet import ResnetBlock2D

    gn, silu = torch.nn.GroupNorm, torch.nn.SiLU
    decoder = vae.decoder
    changed = 0
    for m in decoder.modules():
        if (
            isinstance(m, ResnetBlock2D)
            and m.time_emb_proj is None  # else the activation would also run on the caller's temb
            and type(m.nonlinearity) is silu
            and isinstance(m.norm1, gn)
            and isinstance(m.norm2, gn)
        ):
            m.nonlinearity = silu(inplace=True)
            changed += 1
    if type(getattr(decoder, "conv_act", None)) is silu and isinstance(getattr(decoder, "conv_norm_out", None), gn):
        decoder.conv_act = silu(inplace=True)
        changed += 1
    return changed


# Most bytes of attention scores the VAE decoder's self-attention holds at once (see chunk_vae_attention).
ATTENTION_SCORES_BYTES = 256 << 20


class QueryChunkedAttention:
    """The VAE decoder's self-attention, its queries taken a block at a time.

    Each query's softmax still runs over every key, so the result is the attention itself; only
    the score matrix held at once shrinks. At 1024x1024 the decoder attends over 16384 positions
    with one head of size 512, which SDPA's fused kernels do not take (flash stops at 256), so it
    falls back to the math kernel and its 16384 x 16384 scores: the decode's peak."""

    def __init__(self, max_scores_bytes: int = ATTENTION_SCORES_BYTES):
        self.max_scores_bytes = max_scores_bytes

    def __call__(
        self,
        attn: Any,
        hidden_states: Any,
        encoder_hidden_states: Any = None,
        attention_mask: Any = None,
        temb: Any = None,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        import torch
        import torch.nn.functional as F

        if encoder_hidden_states is not None or attention_mask is not None or hidden_states.ndim != 4:
            from diffusers.models.attention_processor import AttnProcessor2_0

            return AttnProcessor2_0()(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        residual = hidden_states
        b, c, h, w = hidden_states.shape
        x = hidden_states.view(b, c, h * w).transpose(1, 2)
        if attn.group_norm is not None:
            x = attn.group_norm(x.transpose(1, 2)).transpose(1, 2)
        q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)
        heads = attn.heads
        d = k.shape[-1] // heads
        q, k, v = (t.view(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
        n = q.shape[2]
        rows = max(256, self.max_scores_bytes // (4 * n * b * heads))  # float32 scores, the worst case
        out = torch.cat([F.scaled_dot_product_attention(q[:, :, i : i + rows], k, v) for i in range(0, n, rows)], dim=2)
        out = out.transpose(1, 2).reshape(b, -1, heads * d).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def chunk_vae_attention(vae: Any, max_scores_bytes: int = ATTENTION_SCORES_BYTES) -> int:
    """Give the VAE decoder's plain self-attention modules QueryChunkedAttention; returns how many."""
    from diffusers.models.attention_processor import Attention

    changed = 0
    for m in vae.decoder.modules():
        if (
            isinstance(m, Attention)
            and not m.is_cross_attention
            and m.spatial_norm is None
            and m.norm_q is None
            and m.norm_k is None
        ):
            m.set_processor(QueryChunkedAttention(max_scores_bytes))
            changed += 1
    return changed


# Bytes of decoder activations per output pixel (bfloat16), from the 1024x1024 decode measured
# on an H100/H200 (about 2.5 GiB at the peak before lean_vae_decoder); float32 needs twice that.
DECODE_BYTES_PER_PIXEL = 2.6 * GiB / (1024 * 1024)


def decode_strategy(n: int, height: int, width: int, dtype_bytes: int, available: int | None) -> str:
    """How to decode n images: "batch" (all at once), "slices" (one image at a time: exact) or
    "tiles" (diffusers' tiled decode: approximate, faint seams possible), from the free memory.
    available None (CPU, or unknown) means plenty. Pure."""
    if available is None:
        return "batch"
    one = DECODE_BYTES_PER_PIXEL * height * width * dtype_bytes / 2
    if n * one <= available:
        return "batch"
    if one <= available:
        return "slices"
    return "tiles"


def available_for_decode(device: Any) -> int | None:
    """Bytes this process may still allocate on a CUDA device: free memory plus its allocator's
    cached free blocks, within the per-process memory fraction; None off CUDA."""
    import torch

    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info(device)
    allocated = torch.cuda.memory_allocated(device)
    cached = torch.cuda.memory_reserved(device) - allocated
    available = free + cached
    get_fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    fraction = get_fraction(device) if get_fraction else 1.0
    if fraction < 1.0:
        available = min(available, int(fraction * total) - allocated)
    return max(0, available)
