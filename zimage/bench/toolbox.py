"""Bench row `zimage-toolbox`: image to image against text to image, and LoRA switching.

In one process on one model (the full-size random one on the GPU box, the tiny one in the CPU test):
1. text to image, then image to image at strength 0.5 from its picture: the denoise time of each
   (about half the steps run, so about half the time) and the VAE encode the source costs;
2. LoRAs: two random LoRAs in the real diffusers key layout are written to the row's LoRA folder
   after loading (so the baseline runs without any LoRA layer); the first LoRA job creates the slot
   (hotswap mode: counted as the one expected recompile), then a -> b -> a -> none is switched and
   the graphs Dynamo compiled meanwhile are counted (torch._dynamo.utils.counters: unique_graphs),
   with the denoise time per image with a LoRA against the baseline.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any


def _median(xs: list[float]) -> float | None:
    return round(statistics.median(xs), 4) if xs else None


def transformer_layers(model: Path) -> dict[str, tuple[int, int]]:
    """The transformer's Linear layers from its config alone (meta tensors: nothing is allocated)."""
    from accelerate import init_empty_weights
    from diffusers import ZImageTransformer2DModel

    from zimage.model.lora import linear_layers

    with init_empty_weights():
        transformer = ZImageTransformer2DModel.from_config(ZImageTransformer2DModel.load_config(model / "transformer"))
    return linear_layers(transformer)


def row_toolbox(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from torch._dynamo.utils import counters

    from zimage.bench.runner import PROMPT
    from zimage.model.lora_random import random_lora, save_lora
    from zimage.service.engine import Engine
    from zimage.service.request import GenerationRequest
    from zimage.settings import Settings

    extra = json.loads(args.settings or "{}")
    rank = int(extra.pop("bench_lora_rank", 32))
    work = Path(args.workdir)
    lora_dir = work / "loras"
    lora_dir.mkdir(parents=True, exist_ok=True)
    for old in lora_dir.glob("*.safetensors"):
        old.unlink()
    settings = Settings(
        model=args.model,
        outputs_dir=str(work / "outputs"),
        compile_cache_dir=args.compile_cache,
        min_size=min(256, args.size),
        lora_dir=str(lora_dir),
        lora_max_rank=max(64, rank),
        **extra,
    )
    engine = Engine(settings)
    engine.load()
    t2i = GenerationRequest(PROMPT, width=args.size, height=args.size, steps=args.steps, seed=42)

    def runs(req: GenerationRequest, n: int) -> list[Any]:
        return [engine.generate(req, save=False) for _ in range(n)]

    source = engine.generate(t2i, save=False).images[0]
    i2i = GenerationRequest(PROMPT, width=0, height=0, steps=args.steps, seed=42, image=source, strength=0.5)
    engine.generate(i2i, save=False)  # first run at this size through the img2img path
    plain = runs(t2i, args.runs)
    from_image = runs(i2i, args.runs)
    t2i_denoise = _median([r.timings.denoise for r in plain])
    i2i_denoise = _median([r.timings.denoise for r in from_image])

    dtype = engine.pipe.transformer.dtype
    layers = transformer_layers(Path(args.model))
    t = time.perf_counter()
    for name, seed in (("a", 1), ("b", 2)):
        save_lora(random_lora(layers, rank=rank, seed=seed, scale=0.5, dtype=dtype), lora_dir / f"{name}.safetensors")
    write_s = time.perf_counter() - t

    graphs0 = counters["stats"]["unique_graphs"]
    first = engine.generate(_with(t2i, [("a.safetensors", 1.0)]), save=False)
    graphs1 = counters["stats"]["unique_graphs"]
    switches = []
    for loras in (
        [("b.safetensors", 1.0)],
        [("a.safetensors", 1.0)],
        [],
        [("a.safetensors", 0.8), ("b.safetensors", 0.5)],
    ):
        switches.append(engine.generate(_with(t2i, loras), save=False))
    graphs2 = counters["stats"]["unique_graphs"]
    with_lora = runs(_with(t2i, [("a.safetensors", 1.0)]), args.runs)
    slot_empty = runs(t2i, args.runs)
    lora_denoise = _median([r.timings.denoise for r in with_lora])
    out: dict[str, Any] = {
        "memory_mode": engine.plan.mode,
        "lora_mode": engine.runner.loras.mode if engine.runner else settings.lora_mode,
        "notes": engine.notes,
        "text_to_image": {
            "denoise_s": t2i_denoise,
            "steps": len(plain[0].timings.steps),
            "total_s": _median([r.timings.gpu_total for r in plain]),
        },
        "image_to_image_0_5": {
            "denoise_s": i2i_denoise,
            "steps": len(from_image[0].timings.steps),
            "vae_encode_s": _median([r.timings.vae_encode for r in from_image]),
            "total_s": _median([r.timings.gpu_total for r in from_image]),
            "denoise_vs_text_to_image": round(i2i_denoise / t2i_denoise, 3) if t2i_denoise else None,
        },
        "lora": {
            "rank": rank,
            "files_written_s": round(write_s, 3),
            "first_lora_job_s": round(first.timings.gpu_total, 4),
            "first_lora_apply_s": round(first.timings.lora, 4),
            "graphs_compiled_by_first_lora": graphs1 - graphs0,
            "graphs_compiled_by_switches": graphs2 - graphs1,
            "switch_apply_s": [round(r.timings.lora, 4) for r in switches],
            "denoise_with_lora_s": lora_denoise,
            "denoise_slot_empty_s": _median([r.timings.denoise for r in slot_empty]),
            "denoise_without_any_lora_s": t2i_denoise,
            "cost_per_image": round(lora_denoise / t2i_denoise - 1, 4) if t2i_denoise else None,
            "notes": first.notes,
        },
    }
    if torch.cuda.is_available():
        out["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    engine.shutdown(5)
    return out


def _with(req: Any, loras: list[tuple[str, float]]) -> Any:
    from dataclasses import replace

    return replace(req, loras=tuple(loras))


def summary_lines(results: dict[str, Any]) -> list[str]:
    """Lines under the bench table for the toolbox row (the issue's targets beside the numbers)."""
    lines = []
    for name, r in results.get("rows", {}).items():
        if "lora" not in r or "error" in r:
            continue
        t, i, lo = r["text_to_image"], r["image_to_image_0_5"], r["lora"]
        lines += [
            "",
            f"{name}: image to image at strength 0.5: {i['steps']} of {t['steps']} steps, denoise "
            f"{i['denoise_s']} s vs {t['denoise_s']} s ({i['denoise_vs_text_to_image']}x; target about 0.5), "
            f"VAE encode {i['vae_encode_s']} s",
            f"{name}: LoRAs ({r['lora_mode']}, rank {lo['rank']}): graphs compiled by the first LoRA "
            f"{lo['graphs_compiled_by_first_lora']}, by 4 switches {lo['graphs_compiled_by_switches']} (target 0); "
            f"cost per image {lo['cost_per_image']} (target <= 0.05); swap {lo['switch_apply_s']} s",
        ]
    return lines
