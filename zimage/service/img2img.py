"""What an image-to-image or inpainting run adds to the text-to-image run, on diffusers'
ZImageImg2ImgPipeline and ZImageInpaintPipeline made with `from_pipe` (they share the loaded
components: no copy, no reload).

The runner keeps its structure (prompt encoded at its real length, noise from one CPU generator
per seed, latents out, our own decode); this module supplies, using the pipelines' own methods:
- the source encoded once by the VAE (its mean: the seed only drives the noise, so image i of a
  batch equals a single image with seed s+i), timed as its own stage;
- the timesteps from strength (`retrieve_timesteps` + the pipeline's `get_timesteps`) and the noised
  start latents from the pipeline's `prepare_latents`, given the encoded latents and our per-seed CPU
  generators (a 16-channel input is not encoded again);
- for inpainting, the inpaint pipeline's per-step blend (unmasked latents reset to the source at the
  next noise level) in the step callback, and at the end the source laid back over the unmasked
  area through a feathered mask (`apply_overlay`). The img2img pipeline's loop is the inpaint
  pipeline's loop without that blend; calling it instead of the inpaint pipeline's __call__ avoids
  two more VAE encodes per job, and the inpaint __call__ samples its blend target with the first
  seed's generator, which would tie every image of a batch to that seed.
"""

from __future__ import annotations

import weakref
from typing import Any

from zimage.service.request import GenerationRequest

_PIPES: weakref.WeakKeyDictionary[Any, tuple[Any, Any]] = weakref.WeakKeyDictionary()


def source_pipelines(pipe: Any) -> tuple[Any, Any]:
    """The img2img and inpaint pipelines on the loaded components (made once per pipeline)."""
    if pipe not in _PIPES:
        from diffusers import ZImageImg2ImgPipeline, ZImageInpaintPipeline

        # Not from_pipe: it ends with .to(dtype=torch_dtype or float32), which casts the shared
        # bf16 weights to float32 (measured on an H200: 9.1 s instead of 0.89 s per text-to-image
        # after the first image-to-image, twice the memory). The constructor registers the same
        # module objects and moves nothing.
        from zimage.model.memory import execute_on_transformer

        made = tuple(cls(**pipe.components) for cls in (ZImageImg2ImgPipeline, ZImageInpaintPipeline))
        for p in made:
            execute_on_transformer(p)  # the split mode's device rule holds for these pipelines too
            p.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {"disable": True}))
        _PIPES[pipe] = made
    return _PIPES[pipe]


class SourceRun:
    def __init__(self, pipe: Any, req: GenerationRequest, seeds: list[int]):
        self.pipe = pipe
        self.req = req
        self.seeds = seeds
        self.i2i, self.inpaint = source_pipelines(pipe)
        self.timesteps: Any = None
        self._noise = self._image_latents = self._mask = None

    @property
    def pipeline(self) -> Any:
        """The pipeline whose __call__ runs the denoising loop."""
        return self.i2i

    def encode(self, vae_device: Any, device: Any) -> Any:
        """The source's latents (1, 16, h, w) on the transformer's device."""
        from diffusers.pipelines.z_image.pipeline_z_image_img2img import retrieve_latents

        req, vae = self.req, self.pipe.vae
        pixels = self.i2i.image_processor.preprocess(req.source.image, height=req.height, width=req.width)
        latents = retrieve_latents(vae.encode(pixels.to(vae_device, vae.dtype)), sample_mode="argmax")
        latents = (latents - vae.config.shift_factor) * vae.config.scaling_factor
        return latents.to(device)

    def start_latents(self, image_latents: Any, dtype: Any, device: Any) -> Any:
        """Timesteps from strength and the noised start latents, as the pipelines compute them."""
        import torch
        from diffusers.pipelines.z_image.pipeline_z_image_img2img import (
            calculate_shift,
            get_default_z_image_sigmas,
            retrieve_timesteps,
        )

        req, i2i = self.req, self.i2i
        sched = i2i.scheduler
        lh, lw = 2 * (req.height // 16), 2 * (req.width // 16)
        mu = calculate_shift(
            (lh // 2) * (lw // 2),
            sched.config.get("base_image_seq_len", 256),
            sched.config.get("max_image_seq_len", 4096),
            sched.config.get("base_shift", 0.5),
            sched.config.get("max_shift", 1.15),
        )
        exec_device = i2i._execution_device
        sigmas = get_default_z_image_sigmas(req.steps)
        retrieve_timesteps(sched, req.steps, exec_device, sigmas=sigmas, mu=mu)
        self.timesteps, _n = i2i.get_timesteps(req.steps, req.strength, exec_device)
        n = len(self.seeds)
        first = self.timesteps[:1].repeat(n)
        generators = [torch.Generator("cpu").manual_seed(s) for s in self.seeds]
        channels = self.pipe.transformer.config.in_channels
        args = (image_latents, first, n, channels, req.height, req.width, dtype, device, generators)
        if req.source.mask is None:
            return i2i.prepare_latents(*args)
        latents, self._noise, self._image_latents = self.inpaint.prepare_latents(*args)
        mask = self.inpaint.mask_processor.preprocess(req.source.mask, height=req.height, width=req.width)
        self._mask = torch.nn.functional.interpolate(mask, size=(lh, lw), mode="nearest").to(device, dtype)
        return latents

    def blend(self, i: int, latents: Any) -> Any:
        """Inpainting, after step i: the inpaint pipeline's blend (keep the source outside the mask)."""
        import torch

        if self._mask is None:
            return latents
        init = self._image_latents
        if i < len(self.timesteps) - 1:
            init = self.i2i.scheduler.scale_noise(init, torch.tensor([self.timesteps[i + 1]]), self._noise)
        return (1 - self._mask) * init + self._mask * latents

    def finish(self, images: list[Any]) -> list[Any]:
        """Inpainting: the source laid back over the unmasked area, through the feathered mask."""
        source = self.req.source
        if source.mask is None:
            return images
        mask = source.mask
        if self.req.feather:
            from PIL import ImageFilter

            # diffusers' VaeImageProcessor.blur is the same filter but returns None in 0.42.1
            mask = mask.filter(ImageFilter.GaussianBlur(self.req.feather))
        return [self.i2i.image_processor.apply_overlay(mask, source.image, image) for image in images]
