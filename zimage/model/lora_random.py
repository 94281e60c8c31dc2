"""Random LoRA files in the real key layouts, for the tests and the GPU bench (as tiny.py builds a
random model): diffusers' `lora_A`/`lora_B` and kohya's `lora_down`/`lora_up`/`alpha`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

BLOCK_TARGETS = (
    "attention.to_q",
    "attention.to_k",
    "attention.to_v",
    "attention.to_out.0",
    "feed_forward.w1",
    "feed_forward.w2",
    "feed_forward.w3",
)


def random_lora(
    layers: dict[str, tuple[int, int]],
    rank: int = 4,
    seed: int = 0,
    scale: float = 0.5,
    targets: tuple[str, ...] = BLOCK_TARGETS,
    layout: str = "diffusers",
    alpha: float | None = None,
    dtype: Any = None,
) -> dict[str, Any]:
    """A random LoRA for the Linear layers whose names end with one of `targets`.

    layout "diffusers": `transformer.<module>.lora_A.weight` / `.lora_B.weight` (what diffusers'
    save_lora_weights writes and peft loads); "kohya": `lora_unet_<module_with_underscores>.lora_down
    .weight` / `.lora_up.weight` / `.alpha` (what kohya-style trainers write; diffusers converts it,
    folding alpha/rank into the weights)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    dtype = dtype or torch.float32
    out: dict[str, Any] = {}
    for module, (fan_in, fan_out) in sorted(layers.items()):
        if not any(module == t or module.endswith("." + t) for t in targets):
            continue
        a = (torch.randn(rank, fan_in, generator=g) * scale / fan_in**0.5).to(dtype)
        b = (torch.randn(fan_out, rank, generator=g) * scale).to(dtype)
        if layout == "kohya":
            key = "lora_unet_" + module.replace(".", "_")
            out[f"{key}.lora_down.weight"] = a
            out[f"{key}.lora_up.weight"] = b
            out[f"{key}.alpha"] = torch.tensor(float(alpha if alpha is not None else rank))
        else:
            out[f"transformer.{module}.lora_A.weight"] = a
            out[f"transformer.{module}.lora_B.weight"] = b
    return out


def save_lora(state_dict: dict[str, Any], path: str | Path) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))
    return path
