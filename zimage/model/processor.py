"""diffusers' Z-Image attention processor, minus one no-op.

The original wraps RoPE in ``torch.amp.autocast("cuda", enabled=False)``. zimage never runs under
autocast, so that context changes nothing here, but it puts an autocast node in the compiled
graph and AOTAutograd refuses to cache such graphs: every start re-ran AOT compilation of the
blocks even with the compile cache on disk. Same operations otherwise, in the same order and
dtypes (tests compare the pictures).

The class lives at module level (imported only once diffusers is wanted) so that a compiled
graph that references it can be saved in torch.compile's packages.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_z_image import ZSingleStreamAttnProcessor


class ExactRopeAttnProcessor(ZSingleStreamAttnProcessor):
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, freqs_cis=None):
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
