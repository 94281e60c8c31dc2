"""Engine-only rows, each run in a fresh process by `bench run`: plain diffusers as the model card
writes it, and zimage's Engine (load, first image, warm images, PNG writing beside the next job)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from zimage.bench.common import PROMPT, median, now, origin, peak

# ------------------------------------------------------------------------------------------
# row: plain diffusers, as the model card writes it


def row_plain(args: argparse.Namespace) -> dict[str, Any]:
    t0_wall = origin()
    t_import = time.perf_counter()
    import torch
    from diffusers import ZImagePipeline

    import_s = time.perf_counter() - t_import
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    if args.cap_gib and cuda:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gib * 2**30 / total))
    t0 = time.perf_counter()
    kwargs: dict[str, Any] = {"torch_dtype": torch.bfloat16 if cuda else torch.float32}
    if args.variant == "compiled" and cuda:
        kwargs["device_map"] = "cuda"
    pipe = ZImagePipeline.from_pretrained(args.model, **kwargs)
    from_pretrained_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    if args.variant == "model-offload":
        pipe.enable_model_cpu_offload()
    elif args.variant == "group-offload":
        from diffusers.hooks import apply_group_offloading

        for module in (pipe.transformer, pipe.text_encoder):
            apply_group_offloading(
                module, onload_device=torch.device(device), offload_type="leaf_level", use_stream=cuda
            )
        pipe.vae.to(device)
    elif args.variant != "compiled":
        pipe.to(device)
    if args.variant == "compiled":
        pipe.transformer.compile_repeated_blocks(fullgraph=True)
    place_s = time.perf_counter() - t1
    pipe.set_progress_bar_config(disable=True)
    ready = now() - t0_wall

    def gen(steps: int):
        g = torch.Generator(device).manual_seed(42)
        t = time.perf_counter()
        image = pipe(
            PROMPT,
            height=args.size,
            width=args.size,
            num_inference_steps=steps,
            guidance_scale=0.0,
            generator=g,
        ).images[0]
        return time.perf_counter() - t, image

    first_s, _ = gen(args.steps)
    first_at = now() - t0_wall
    warm = [gen(args.steps)[0] for _ in range(args.runs)]
    out: dict[str, Any] = {
        "import_s": round(import_s, 3),
        "from_pretrained_s": round(from_pretrained_s, 3),
        "place_s": round(place_s, 3),
        "start_to_ready_s": round(ready, 3),
        "first_image_s": round(first_s, 4),
        "start_to_first_image_s": round(first_at, 3),
        "warm_s": [round(x, 4) for x in warm],
        "warm_median_s": median(warm),
    }
    if args.steps != 9 and args.also_nine and args.variant in (None, "", "compiled"):
        nine = [gen(9)[0] for _ in range(3)]
        out["warm_median_9_steps_s"] = median(nine)
    out["split"] = _plain_split(torch, pipe, gen, args.steps)
    out.update(peak(torch))
    return out


def _plain_split(torch, pipe, gen, steps: int) -> dict[str, float]:
    """Stage times of one extra plain run, from synchronised hooks (after the timed runs)."""
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    marks: dict[str, list[float]] = {"text_encoder": [], "transformer": [], "vae": []}
    starts: dict[str, float] = {}

    def pre(name):
        def hook(*_a, **_k):
            sync()
            starts[name] = time.perf_counter()

        return hook

    def post(name):
        def hook(*_a, **_k):
            sync()
            marks[name].append(time.perf_counter() - starts[name])

        return hook

    handles = []
    for name, mod in (("text_encoder", pipe.text_encoder), ("transformer", pipe.transformer)):
        handles.append(mod.register_forward_pre_hook(pre(name)))
        handles.append(mod.register_forward_hook(post(name)))
    original = pipe.vae.decode

    def decode(*a, **k):
        pre("vae")()
        out = original(*a, **k)
        post("vae")()
        return out

    pipe.vae.decode = decode
    try:
        total, _ = gen(steps)
    finally:
        pipe.vae.decode = original
        for h in handles:
            h.remove()
    return {
        "text_encoder_s": round(sum(marks["text_encoder"]), 4),
        "denoise_s": round(sum(marks["transformer"]), 4),
        "vae_decode_s": round(sum(marks["vae"]), 4),
        "total_s": round(total, 4),
    }


# ------------------------------------------------------------------------------------------
# row: zimage


def row_zimage(args: argparse.Namespace) -> dict[str, Any]:
    t0_wall = origin()
    from zimage.service.engine import Engine
    from zimage.service.request import GenerationRequest
    from zimage.settings import Settings

    extra = json.loads(args.settings or "{}")
    out_dir = Path(args.workdir) / "outputs"
    settings = Settings(
        model=args.model,
        outputs_dir=str(out_dir),
        compile_cache_dir=args.compile_cache,
        min_size=min(256, args.size),
        **extra,
    )
    if args.cap_gib:
        import torch

        if torch.cuda.is_available():
            total = torch.cuda.get_device_properties(0).total_memory
            settings = settings.replace(memory_fraction=min(1.0, args.cap_gib * 2**30 / total))
    engine = Engine(settings)
    engine.load()
    import torch

    ready = engine.timeline.ready_at
    req = GenerationRequest(PROMPT, width=args.size, height=args.size, steps=args.steps, seed=42)

    def gen(save: bool = False):
        t = time.perf_counter()
        result = engine.generate(req, save=save)
        return time.perf_counter() - t, result

    first_s, first = gen()
    first_at = now() - t0_wall
    full_speed_at = ready
    if engine.compiler is not None:  # warm images are the compiled path's: wait for the switch
        engine.compiler.wait(600)
        live = [st for st in engine.compiler.snapshot()["stages"] if st["name"] == "live"]
        full_speed_at = live[0]["at_s"] if live else None
    warm = [gen() for _ in range(args.runs)]
    warm_s = [w for w, _ in warm]
    timings = [r.timings for _, r in warm]

    # PNG writing beside the next job: back-to-back jobs with saving on.
    saved = []
    for _ in range(args.runs):
        t = time.perf_counter()
        result = engine.generate(req, save=True)
        decoded = time.perf_counter() - t
        saved.append((t, decoded, result))
    png_done = []
    for _t, _decoded, result in saved:
        result.wait_saved(120)
        png_done.append(result)
    # request -> PNG on disk, one job alone (nothing queued behind it)
    t = time.perf_counter()
    alone = engine.generate(req, save=True)
    alone.wait_saved(120)
    request_to_png_alone = time.perf_counter() - t

    out: dict[str, Any] = {
        "start_to_ready_s": round(ready, 3) if ready else None,
        "first_image_s": round(first_s, 4),
        "start_to_first_image_s": round(first_at, 3),
        "first_image_path": first.compute_path,
        "start_to_full_speed_s": full_speed_at,
        "compile": engine.speed_status(),
        "warm_paths": sorted({r.compute_path for _, r in warm}),
        "warm_s": [round(x, 4) for x in warm_s],
        "warm_median_s": median(warm_s),
        "split": {
            "text_encoder_s": median([t.text_encoder for t in timings]),
            "denoise_s": median([t.denoise for t in timings]),
            "step_s": median([s for t in timings for s in t.steps]),
            "vae_decode_s": median([t.vae_decode for t in timings]),
            "to_host_s": median([t.to_host for t in timings]),
            "engine_total_s": median([t.gpu_total for t in timings]),
        },
        "with_saving": {
            "decoded_s": [round(d, 4) for _, d, _ in saved],
            "decoded_median_s": median([d for _, d, _ in saved]),
            "png_encode_write_s": median([r.timings.png for r in png_done if r.timings.png]),
            "request_to_png_alone_s": round(request_to_png_alone, 4),
        },
        "memory_mode": engine.plan.mode if engine.plan else None,
        "memory_reason": engine.plan.reason if engine.plan else None,
        "notes": engine.notes,
        "load_timeline": engine.timeline.snapshot()["stages"],
    }
    out.update(peak(torch))
    engine.shutdown(5)
    return out
