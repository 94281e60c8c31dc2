"""Live previews and the time shift, on the tiny model (CPU): the x0 estimate, the sigmas the preview
computes on the host, frames arriving in the job, the cost per step, and the shift reaching the
scheduler."""

from __future__ import annotations

import numpy as np
import pytest

from zimage.errors import InvalidRequest
from zimage.service.preview import (
    FLUX_LATENT_RGB,
    FLUX_LATENT_RGB_BIAS,
    LatentPreview,
    flow_sigmas,
    measure_cost,
    scheduler_sigmas,
)
from zimage.service.request import GenerationRequest, Limits, validate

from .support import pixels


def _rgb(x0):
    """The reference projection of clean latents, as ComfyUI's latent2rgb previewer does it."""
    import torch

    w = torch.tensor(FLUX_LATENT_RGB)
    b = torch.tensor(FLUX_LATENT_RGB_BIAS)
    img = torch.nn.functional.linear(x0[0].movedim(0, -1), w.t(), b)
    return ((img + 1.0) * 127.5).clamp(0, 255).to(torch.uint8).numpy()


def test_the_preview_shows_the_denoised_estimate_not_the_noise():
    import torch

    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 16, 24, 24, generator=g) * 2
    eps = torch.randn(1, 16, 24, 24, generator=g)
    sigmas = flow_sigmas(6, 3.0)
    frames = []
    prev = LatentPreview(eps, sigmas, frames.append, every_s=0.0)  # x(σ=1) is pure noise
    for i in range(6):
        s = sigmas[i + 1]
        prev.step(i, (1 - s) * x0 + s * eps)
    assert [f.step for f in frames] == [1, 2, 3, 4, 5]  # not after the last: the real decode follows
    want = _rgb(x0)
    for f in frames:
        assert f.rgb.dtype == np.uint8 and f.rgb.shape == (24, 24, 3)
        assert np.abs(f.rgb.astype(int) - want.astype(int)).max() <= 1  # x0 exactly, up to rounding
    # the noisy latents themselves would look different: the estimate is what makes step 1 useful
    noisy = _rgb((1 - sigmas[1]) * x0 + sigmas[1] * eps)
    assert np.abs(noisy.astype(int) - want.astype(int)).mean() > 5


def test_frames_are_pooled_to_a_small_picture_and_throttled():
    import torch

    lat = torch.randn(1, 16, 128, 128)  # a 1024x1024 image
    frames = []
    prev = LatentPreview(lat, flow_sigmas(8, 3.0), frames.append, every_s=3600)
    for i in range(7):
        prev.step(i, lat)
    assert len(frames) == 1 and frames[0].rgb.shape == (64, 64, 3)  # the first step, then throttled


def test_host_sigmas_match_the_scheduler_of_the_pipeline(engine):
    sched = engine.pipe.scheduler
    for steps, shift in ((8, 3.0), (5, 7.0), (1, 3.0)):
        sched.set_shift(shift)
        sched.set_timesteps(sigmas=flow_sigmas(steps, 1.0)[:-1], device="cpu")  # as ZImagePipeline calls it
        assert scheduler_sigmas(sched, steps) == pytest.approx(sched.sigmas.tolist(), abs=1e-6)
    sched.set_shift(3.0)


def test_a_job_that_wants_previews_gets_frames_and_the_same_image(engine):
    req = engine.default_request("a lighthouse", width=128, height=128, steps=6, seed=5)
    plain = engine.generate(req, save=False)
    job = engine.new_job()
    job.want_preview = True
    seen = []

    def progress(phase, done, total):
        if phase == "denoise" and job.preview is not None:
            seen.append(job.preview)

    with_preview = engine.generate(req, job=job, progress=progress, save=False)
    assert seen, "no preview frame reached the job"
    frame = seen[0]
    assert frame.total == 6 and 1 <= frame.step < 6
    assert frame.rgb.shape == (16, 16, 3) and frame.rgb.dtype == np.uint8
    assert (pixels(with_preview.images[0]) == pixels(plain.images[0])).all()  # the preview changes nothing


def test_the_time_shift_reaches_the_scheduler_and_is_restored(engine):
    req = engine.default_request("a red bicycle", width=128, height=128, steps=4, seed=11)
    base = engine.generate(req, save=False).images[0]
    same = engine.generate(GenerationRequest(**{**req.__dict__, "shift": 3.0}), save=False).images[0]
    other = engine.generate(GenerationRequest(**{**req.__dict__, "shift": 8.0}), save=False)
    assert (pixels(same) == pixels(base)).all()  # 3 is the model's own shift
    assert (pixels(other.images[0]) != pixels(base)).any()
    assert other.metadata(other.seeds[0])["shift"] == 8.0
    assert engine.pipe.scheduler.shift == 3.0  # the next request gets the model's own again


def test_a_shift_out_of_range_is_a_clear_message():
    with pytest.raises(InvalidRequest, match=r"Time shift must be a number from 1 to 10 .* \(got 0\.5\)"):
        validate(GenerationRequest(prompt="a cat", shift=0.5), Limits())
    assert validate(GenerationRequest(prompt="a cat", shift="4"), Limits()).shift == 4.0
    assert validate(GenerationRequest(prompt="a cat"), Limits()).shift is None


def test_the_preview_costs_a_few_hundred_kflop_per_step():
    cost = measure_cost("cpu", 1024, 1024, repeat=10)
    print(f"preview cost per step on this CPU at 1024x1024: {cost}")
    assert cost["preview_px"] == [64, 64]
    assert cost["kflop_per_step"] < 700  # the denoising step itself is ~10^10 kFLOP at this size
    assert cost["frames"] > 0


def test_bench_preview_measures_steps_with_and_without_the_preview(engine, tmp_path):
    import argparse

    from zimage.bench.preview import bench_preview

    args = argparse.Namespace(model="tiny", size=128, steps=4, runs=2, workdir=str(tmp_path), compile_cache="")
    out = bench_preview(args, engine)
    assert out["device"] == "cpu" and out["runs_with_frames"] == 2
    assert out["step_s_without_preview"] > 0 and out["step_s_with_preview"] > 0
    assert out["preview_alone"]["preview_px"] == [16, 16] and out["preview_alone"]["frames"] > 0
