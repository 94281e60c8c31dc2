"""What the live preview costs on the GPU: `python -m zimage bench preview --model DIR`.

Two measurements, both printed as one JSON line:
- the preview alone (service.preview.measure_cost): seconds per step of the projection, pooling,
  the uint8 picture and its non-blocking copy, with a frame forced at every step;
- the real pipeline at --size with --steps, alternating runs with and without the preview, so the
  median step time of each says what it adds to a step (the target: under 3 %).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any


def bench_preview(args: argparse.Namespace, engine: Any = None) -> dict[str, Any]:
    """One JSON row; `engine`: a loaded one to measure on (else --model is loaded, and shut down after)."""
    import torch

    from zimage.service.engine import Engine
    from zimage.service.preview import measure_cost
    from zimage.service.request import GenerationRequest
    from zimage.settings import Settings

    own = engine is None
    if own:
        settings = Settings(
            model=args.model,
            outputs_dir=str(Path(args.workdir) / "outputs"),
            compile_cache_dir=args.compile_cache,
            min_size=min(256, args.size),
        )
        engine = Engine(settings)
        engine.load()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    alone = measure_cost(device, args.size, args.size, args.steps, repeat=200)
    req = GenerationRequest(
        "a lighthouse on a basalt cliff at dusk", width=args.size, height=args.size, steps=args.steps, seed=42
    )
    steps: dict[bool, list[float]] = {False: [], True: []}
    frames = 0
    for i in range(2 * args.runs + 2):
        want = bool(i % 2)
        job = engine.new_job()
        job.want_preview = want
        result = engine.generate(req, job=job, save=False)
        if i >= 2:  # the first pair warms up both paths
            steps[want].extend(result.timings.steps)
            frames += want and job.preview is not None
    off, on = statistics.median(steps[False]), statistics.median(steps[True])
    if own:
        engine.shutdown(5)
    return {
        "device": device,
        "size": args.size,
        "steps": args.steps,
        "preview_alone": alone,
        "step_s_without_preview": round(off, 5),
        "step_s_with_preview": round(on, 5),
        "preview_share_of_step_pct": round(100.0 * (on - off) / off, 2),
        "preview_alone_share_of_step_pct": round(100.0 * alone["seconds_per_step"] / off, 3),
        "runs_with_frames": frames,
        "memory_mode": engine.plan.mode if engine.plan else None,
    }
