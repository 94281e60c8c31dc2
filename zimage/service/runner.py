"""The GPU math of one job, and the out-of-memory ladder around it (the caller holds the GPU).

`Runner.run` drives the diffusers ZImagePipeline's own denoising loop, around which it does three
things itself, each checked against the plain pipeline by the tests:
- the prompt is encoded at its real length (the pipeline pads to 512 tokens, then throws
  the padding away: causal attention means the real tokens never saw it);
- the initial noise is drawn on the CPU from one generator per image (seed s, s+1, ...),
  exactly as the pipeline does with a list of CPU generators, so a seed gives the same
  picture on any device and image i of a batch equals a single image with seed s+i;
- the VAE output is turned into 8-bit RGB on the device, the same arithmetic as the
  pipeline's post-processing, so only 3 bytes per pixel cross to the host.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from zimage.errors import BadLora, Cancelled, OutOfMemory
from zimage.model.decode import available_for_decode, decode_strategy
from zimage.model.lora import LoraLibrary
from zimage.model.memory import HOOKED_MODES, SINGLE_STREAM_MODES, downgrade, free_memory, host_embedding, is_oom
from zimage.model.pipeline import LoadedModel
from zimage.ops.metrics import EngineMetrics
from zimage.ops.profiler import StageTimer
from zimage.service.img2img import SourceRun
from zimage.service.jobs import Job
from zimage.service.preview import LatentPreview, scheduler_sigmas
from zimage.service.preview import supported as preview_supported
from zimage.service.request import GenerationRequest
from zimage.service.result import GenerationResult, StageTimings

log = logging.getLogger(__name__)

ProgressFn = Callable[[str, int, int], None]  # (phase, done, total)


class StageFailed(Exception):
    """Carries the stage a run failed in (text_encoder, denoise, vae_decode, to_host) to the ladder."""

    def __init__(self, stage: str, error: BaseException):
        super().__init__(f"{stage}: {error}")
        self.stage = stage
        self.error = error


def module_device(module) -> Any:
    import torch

    for p in module.parameters():
        return p.device
    return torch.device("cpu")


class Runner:
    """Runs requests on one loaded pipeline. Not thread-safe: the caller holds the GPU lock."""

    def __init__(
        self,
        model: LoadedModel,
        metrics: EngineMetrics,
        real_length_prompt: bool = True,
        loras: LoraLibrary | None = None,
    ):
        self.model = model
        self.metrics = metrics
        self.real_length_prompt = real_length_prompt
        self.loras = loras

    @property
    def pipe(self) -> Any:
        return self.model.pipe

    def device_for(self, module) -> Any:
        """Where tensors for this module must be made: the execution device when hooks move the
        weights there as they run, else the device its weights live on."""
        import torch

        if self.model.plan.mode in HOOKED_MODES:
            return torch.device(self.model.plan.execution_device)
        return module_device(module)

    # --- the three stages the engine does itself -------------------------------------------

    def encode(self, prompt: str, real_length: bool | None = None):
        """Prompt embeddings (tokens, dim) on the transformer's device, as the pipeline computes them."""
        import torch

        pipe = self.pipe
        if real_length is None:
            real_length = self.real_length_prompt
        tok = pipe.tokenizer
        te = pipe.text_encoder
        text = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True, enable_thinking=True
        )
        if real_length:
            enc = tok([text], padding=False, truncation=True, max_length=512, return_tensors="pt")
        else:
            enc = tok([text], padding="max_length", max_length=512, truncation=True, return_tensors="pt")
        te_dev = self.device_for(te)
        mask = enc.attention_mask.to(te_dev).bool()
        kwargs: dict[str, Any] = {"attention_mask": mask, "use_cache": False}
        embed = host_embedding(te)
        if embed is not None:
            kwargs["inputs_embeds"] = embed(enc.input_ids).to(te_dev, non_blocking=True)
        else:
            kwargs["input_ids"] = enc.input_ids.to(te_dev)
        if isinstance(te.norm, torch.nn.Identity):  # trimmed: the last layer's output is hidden_states[-2]
            hidden = te(**kwargs).last_hidden_state
        else:
            hidden = te(**kwargs, output_hidden_states=True).hidden_states[-2]
        emb = hidden[0] if real_length else hidden[0][mask[0]]
        return emb.to(self.device_for(pipe.transformer), non_blocking=True)

    def noise(self, seeds: list[int], width: int, height: int):
        """Initial latents: one CPU generator per image, as the pipeline's randn_tensor draws them."""
        import torch

        channels = self.pipe.transformer.config.in_channels
        lh, lw = 2 * (height // 16), 2 * (width // 16)
        parts = [
            torch.randn((1, channels, lh, lw), generator=torch.Generator("cpu").manual_seed(s), dtype=torch.float32)
            for s in seeds
        ]
        return torch.cat(parts).to(self.device_for(self.pipe.transformer))

    def decode(self, latents, notes: list[str] | None = None, how: str | None = None):
        """Latents -> uint8 RGB (n, H, W, 3) on the device, matching VaeImageProcessor.postprocess.

        The whole batch at once when the free memory holds it, else one image at a time (exact),
        else in tiles (approximate: only when even one image does not fit; noted)."""
        import torch

        vae = self.pipe.vae
        dev = self.device_for(vae)
        lat = latents.to(dev, vae.dtype)  # multi-gpu: the VAE may sit on another GPU
        lat = lat / vae.config.scaling_factor + vae.config.shift_factor
        n, _, lh, lw = lat.shape
        scale = 2 ** (len(vae.config.block_out_channels) - 1)
        if how is None:
            how = decode_strategy(n, lh * scale, lw * scale, lat.element_size(), available_for_decode(dev))
        if how == "tiles" and not vae.use_tiling:
            vae.enable_tiling()
            try:
                image = vae.decode(lat, return_dict=False)[0]
            finally:
                vae.disable_tiling()
            if notes is not None:
                notes.append("The VAE decoded in tiles: the free GPU memory did not hold a whole image's decode.")
        elif how == "slices":
            image = torch.cat([vae.decode(one, return_dict=False)[0] for one in lat.split(1)])
        else:
            image = vae.decode(lat, return_dict=False)[0]
        image = (image / 2 + 0.5).clamp(0, 1)
        image = image.float().mul(255).round().to(torch.uint8)
        return image.permute(0, 2, 3, 1)

    # --- one run, and the ladder around it -----------------------------------------------

    def run_with_fallback(self, req: GenerationRequest, job: Job, progress: ProgressFn | None) -> GenerationResult:
        """Run; on CUDA out-of-memory free memory and retry once, one rung lower."""
        try:
            return self.run(req, job, progress)
        except StageFailed as failed:
            if not is_oom(failed.error):
                raise failed.error from None
            stage = failed.stage
        self.metrics.oom.inc()
        log.warning("out of GPU memory during %s (%s x%d); retrying", stage, f"{req.width}x{req.height}", req.count)
        free_memory()
        note = self._fallback(stage)
        try:
            result = self.run(req, job, progress)
        except StageFailed as again:
            if is_oom(again.error):
                self.metrics.oom.inc()
                free_memory()
                raise OutOfMemory(
                    f"Out of GPU memory at {req.width}x{req.height} with {req.count} image(s), even after "
                    f"{note}. Try a smaller size or fewer images; the server is fine and the next request "
                    "will work."
                ) from None
            raise again.error from None
        result.notes.append(f"Ran out of GPU memory during {stage}; freed memory and retried with {note}.")
        return result

    def _fallback(self, stage: str) -> str:
        """Make the next attempt lighter: VAE tiling for the decode, else the next lower memory mode."""
        model = self.model
        vae = self.pipe.vae
        if stage == "vae_decode" and not getattr(vae, "use_tiling", False):
            vae.enable_tiling()
            model.notes.append("VAE tiling (after an out-of-memory error)")
            return "VAE tiling"
        lower = downgrade(self.pipe, model.plan)
        if lower is not None:
            model.plan = lower
            self.metrics.mode.clear()
            self.metrics.mode.labels(lower.mode).set(1)
            model.notes.append(f"memory mode {lower.mode} (after an out-of-memory error)")
            return f"memory mode {lower.mode}"
        if not getattr(vae, "use_tiling", False):
            vae.enable_tiling()
            return "VAE tiling"
        return "freed memory"

    def _preview(self, latents, job: Job, steps: int) -> LatentPreview | None:
        """The live preview of this job (frames land in job.preview); None for a scheduler whose
        sigmas the preview cannot compute on the host."""
        sigmas = scheduler_sigmas(self.pipe.scheduler, steps)
        if sigmas is None:
            log.debug("no live preview: the scheduler shifts its sigmas dynamically")
            return None
        return LatentPreview(latents, sigmas, lambda frame: setattr(job, "preview", frame))

    @staticmethod
    def _denoise(pipe, req: GenerationRequest, pos, neg, latents, step_done, run_kwargs: dict[str, Any]):
        n = req.count
        return pipe(
            prompt=None,
            prompt_embeds=[pos] * n,
            negative_prompt_embeds=[neg] * n if neg is not None else None,
            height=req.height,
            width=req.width,
            num_inference_steps=req.steps,
            guidance_scale=req.guidance,
            latents=latents,
            output_type="latent",
            callback_on_step_end=step_done,
            return_dict=False,
            **run_kwargs,
        )[0]

    def run(self, req: GenerationRequest, job: Job, progress: ProgressFn | None) -> GenerationResult:
        """One run; any failure comes out as StageFailed naming the stage (Cancelled as itself)."""
        import torch
        from PIL import Image

        seeds = req.seeds()
        pipe = self.pipe
        exec_dev = self.device_for(pipe.transformer)
        cuda = exec_dev.type == "cuda"
        # One device: CUDA events. Several, or offload hooks moving weights: synchronise per stage.
        single_stream = cuda and self.model.plan.mode in SINGLE_STREAM_MODES
        timer = StageTimer(exec_dev if single_stream else None)
        sync = (lambda: _sync_all(self.model.plan)) if cuda and not single_stream else (lambda: None)
        notes: list[str] = list(req.notes)  # what this run did differently (a tiled decode), and validation's notes
        total = req.denoise_steps
        stage = "lora"
        preview: LatentPreview | None = None
        source = SourceRun(pipe, req, seeds) if req.source is not None else None

        def step_done(_pipe, i, _t, kwargs):
            out = {"latents": source.blend(i, kwargs["latents"])} if source is not None else {}
            sync()
            timer.mark(f"step{i}")
            if preview is not None and "latents" in kwargs:
                preview.step(i, kwargs["latents"])
            if single_stream and i >= 1:
                timer.wait_previous()  # keep one step in flight: honest progress, prompt cancel
                done = i
            else:
                done = i + 1
            job.step = done
            if progress:
                progress("denoise", done, total)
            if job.cancelled:
                raise Cancelled("Cancelled.")
            return out

        try:
            with torch.no_grad():
                timer.mark("start")
                applied = self.loras.apply(req.loras) if self.loras is not None and self.loras.attached else None
                if applied is not None:
                    timer.mark("lora")
                stage = "text_encoder"
                if progress:
                    progress("text", 0, total)
                pos = self.encode(req.prompt)
                neg = self.encode(req.negative_prompt) if req.guidance > 0 else None
                sync()
                timer.mark("text_encoder")
                if job.cancelled:
                    raise Cancelled("Cancelled.")
                stage = "denoise"
                scheduler = pipe.scheduler
                own_shift = getattr(scheduler, "shift", None)
                if req.shift is not None and own_shift is not None:
                    scheduler.set_shift(req.shift)  # the caller holds the GPU: no one else uses it now
                run_kwargs: dict[str, Any] = {}
                if source is None:
                    latents = self.noise(seeds, req.width, req.height)
                else:
                    stage = "vae_encode"
                    encoded = source.encode(self.device_for(pipe.vae), exec_dev)
                    latents = source.start_latents(encoded, pos.dtype, exec_dev)
                    sync()
                    timer.mark("vae_encode")
                    stage = "denoise"
                    run_kwargs = {"image": req.source.image, "strength": req.strength}
                if job.want_preview and preview_supported(pipe):
                    preview = self._preview(latents, job, total)
                try:
                    latents = self._denoise(
                        source.pipeline if source is not None else pipe, req, pos, neg, latents, step_done, run_kwargs
                    )
                finally:
                    if req.shift is not None and own_shift is not None:
                        scheduler.set_shift(own_shift)
                stage = "vae_decode"
                if progress:
                    progress("decode", total, total)
                pixels = self.decode(latents, notes)
                sync()
                timer.mark("vae_decode")
                stage = "to_host"
                host = pixels.cpu()
                timer.mark("to_host")
        except (Cancelled, BadLora):
            raise
        except Exception as exc:
            raise StageFailed(stage, exc) from exc
        timings = _timings(timer.resolve())
        images = [Image.fromarray(a) for a in host.numpy()]
        if source is not None:
            images = source.finish(images)
        result = GenerationResult(
            request=req,
            images=images,
            seeds=seeds,
            timings=timings,
            model=self.model.source.name,
            memory_mode=self.model.plan.mode,
            device=self.model.device_name,
            job_id=job.id,
            notes=notes,
        )
        if applied is not None:
            result.loras = applied.loras
            result.notes += applied.notes
        return result


def _sync_all(plan) -> None:
    """Wait for every GPU the plan uses (multi-gpu spreads the stages over several)."""
    import torch

    for dev in {d for d in (*plan.placement.values(), plan.execution_device) if d.startswith("cuda")}:
        torch.cuda.synchronize(dev)


def _timings(marks: list[tuple[str, float]]) -> StageTimings:
    timings = StageTimings()
    for name, dt in marks:
        if name == "text_encoder":
            timings.text_encoder = dt
        elif name.startswith("step"):
            timings.steps.append(dt)
        elif name == "vae_decode":
            timings.vae_decode = dt
        elif name == "to_host":
            timings.to_host = dt
        elif name == "vae_encode":
            timings.vae_encode = dt
        elif name == "lora":
            timings.lora = dt
    timings.gpu_total = sum(dt for _, dt in marks)
    return timings
