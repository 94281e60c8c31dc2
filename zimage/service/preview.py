"""Live previews: the picture forming at each denoising step, without the VAE.

Z-Image-Turbo uses the 16-channel Flux VAE. A fixed 16x3 linear map of its latent channels
(the one ComfyUI calibrated for Flux latents, `comfy/latent_formats.py`) gives a rough RGB
picture straight from the latents: no extra weights, a few hundred kFLOP per step.

After step i the pipeline holds the noisy latents x(σ_next). A preview of those is mostly
noise in the first steps, so the preview shows the denoised estimate instead: for flow
matching x(σ) = (1-σ)·x0 + σ·ε, and the Euler step x_next = x + (σ_next - σ)·v gives
x0 = x_next - σ_next·v with v from two consecutive latents. Everything here is linear, so it
runs on the projected, pooled 3-channel picture of each step, never on the full latents twice.

Cost on the GPU per step: one average pool over the latents, one 16->3 einsum on the pooled
map, a few element-wise kernels on a (3, ≤64, ≤64) tensor, and, when a frame is due (at
most every `every_s`), a non-blocking copy of ≤12 KB to pinned host memory. The copy is
collected at the next step (by then the runner has waited on the previous step anyway), so
the preview never adds a host-device synchronisation. `measure_cost()` times it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# Flux VAE latent channel -> (R, G, B), and the bias; applied to latents in the pipeline's scaled
# space ((z - shift_factor) * scaling_factor), output in [-1, 1].
FLUX_LATENT_RGB = (
    (-0.0346, 0.0244, 0.0681),
    (0.0034, 0.0210, 0.0687),
    (0.0275, -0.0668, -0.0433),
    (-0.0174, 0.0160, 0.0617),
    (0.0859, 0.0721, 0.0329),
    (0.0004, 0.0383, 0.0115),
    (0.0405, 0.0861, 0.0915),
    (-0.0236, -0.0185, -0.0259),
    (-0.0245, 0.0250, 0.1180),
    (0.1008, 0.0755, -0.0421),
    (-0.0515, 0.0201, 0.0011),
    (0.0428, -0.0012, -0.0036),
    (0.0817, 0.0765, 0.0749),
    (-0.1264, -0.0522, -0.1103),
    (-0.0280, -0.0881, -0.0499),
    (-0.1262, -0.0982, -0.0778),
)
FLUX_LATENT_RGB_BIAS = (-0.0329, -0.0718, -0.0851)
LATENT_CHANNELS = len(FLUX_LATENT_RGB)

PREVIEW_MAX_SIDE = 64  # latent pixels kept per side (1/8 of the image is 128 at 1024 px: pooled 2x)
PREVIEW_EVERY_S = 0.2  # at most five frames a second leave the device


@dataclass(frozen=True)
class Frame:
    """One preview picture: after `step` of `total` steps, RGB uint8 (h, w, 3) on the host."""

    step: int
    total: int
    rgb: Any  # numpy.ndarray


def supported(pipe: Any) -> bool:
    """The map is calibrated for 16-channel Flux-style latents only."""
    vae = getattr(pipe, "vae", None)
    return getattr(getattr(vae, "config", None), "latent_channels", None) == LATENT_CHANNELS


def flow_sigmas(steps: int, shift: float) -> list[float]:
    """The sigmas ZImagePipeline uses (linspace(1, 1/n, n), statically shifted, then 0), computed on
    the host so the preview never reads the scheduler's device tensor."""
    base = [1.0 - i * (1.0 - 1.0 / steps) / max(steps - 1, 1) for i in range(steps)] if steps > 1 else [1.0]
    return [shift * s / (1 + (shift - 1) * s) for s in base] + [0.0]


def scheduler_sigmas(scheduler: Any, steps: int) -> list[float] | None:
    """Host sigmas for this scheduler, or None when its config shifts in a way flow_sigmas does not
    reproduce (then the caller reads the scheduler's own tensor once)."""
    cfg = getattr(scheduler, "config", {})
    special = ("use_dynamic_shifting", "shift_terminal", "use_karras_sigmas", "use_exponential_sigmas")
    special += ("use_beta_sigmas", "invert_sigmas")
    if any(cfg.get(k) for k in special):
        return None
    return flow_sigmas(steps, float(getattr(scheduler, "shift", cfg.get("shift", 1.0))))


class LatentPreview:
    """Follows one job's latents step by step; hands finished frames to `on_frame` (Frame).

    Previews the first image of a batch. Not thread-safe: called from the denoising callback."""

    def __init__(
        self,
        latents: Any,
        sigmas: list[float],
        on_frame: Callable[[Frame], None],
        every_s: float = PREVIEW_EVERY_S,
        max_side: int = PREVIEW_MAX_SIDE,
    ):
        import torch

        self.torch = torch
        dev = latents.device
        self.cuda = dev.type == "cuda"
        self.weight = torch.tensor(FLUX_LATENT_RGB, dtype=torch.float32, device=dev).t().contiguous()  # (3, 16)
        self.bias = torch.tensor(FLUX_LATENT_RGB_BIAS, dtype=torch.float32, device=dev).view(1, 3, 1, 1)
        h, w = latents.shape[-2:]
        self.pool = max(1, math.ceil(max(h, w) / max_side))
        self.sigmas = sigmas
        self.total = len(sigmas) - 1
        self.on_frame = on_frame
        self.every_s = every_s
        self.last_sent = -math.inf
        self.prev = self._project(latents)
        self.pending: tuple[int, Any, Any] | None = None  # (step, host tensor, CUDA event)
        self._host: Any = None

    def _project(self, latents: Any) -> Any:
        """(1, 3, h/pool, w/pool) without the bias: pooling first is exact (both maps are linear)."""
        x = latents[:1].float()
        if self.pool > 1:
            x = self.torch.nn.functional.avg_pool2d(x, self.pool, ceil_mode=True)
        return self.torch.einsum("bchw,kc->bkhw", x, self.weight)

    def step(self, i: int, latents: Any) -> None:
        """After step i (0-based): update the x0 estimate; send a frame when one is due."""
        self.collect()
        cur = self._project(latents)
        s_t, s_next = self.sigmas[i], self.sigmas[i + 1]
        x0 = cur if s_next == 0 or s_next == s_t else cur - s_next * (cur - self.prev) / (s_next - s_t)
        self.prev = cur
        now = time.monotonic()
        if now - self.last_sent < self.every_s or i + 1 >= self.total:
            return  # the last step is followed by the real decode at once
        self.last_sent = now
        rgb = ((x0 + self.bias + 1.0) * 127.5).clamp(0, 255).to(self.torch.uint8)[0].permute(1, 2, 0)
        if self.cuda:
            if self._host is None or self._host.shape != rgb.shape:
                self._host = self.torch.empty(rgb.shape, dtype=self.torch.uint8, pin_memory=True)
            self._host.copy_(rgb, non_blocking=True)
            event = self.torch.cuda.Event()
            event.record()
            self.pending = (i + 1, self._host, event)
        else:
            self.pending = (i + 1, rgb, None)
            self.collect()

    def collect(self) -> None:
        """Publish the pending frame once its copy has landed (never waits for it)."""
        if self.pending is None:
            return
        step, host, event = self.pending
        if event is not None and not event.query():
            return
        self.pending = None
        self.on_frame(Frame(step, self.total, host.numpy().copy()))


def measure_cost(device: str = "cpu", width: int = 1024, height: int = 1024, steps: int = 8, repeat: int = 20):
    """Seconds one preview step takes on `device` (frames forced on every step): what the preview
    adds to each denoising step. Used by the tests (CPU) and `python -m zimage bench` (GPU)."""
    import torch

    dev = torch.device(device)
    latents = torch.randn(1, LATENT_CHANNELS, height // 8, width // 8, device=dev)
    frames: list[Frame] = []
    prev = LatentPreview(latents, flow_sigmas(steps, 3.0), frames.append, every_s=0.0)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    for _ in range(3):  # warm-up: allocations, pinned buffer
        prev.step(0, latents)
    sync()
    t0 = time.perf_counter()
    for _ in range(repeat):
        prev.step(0, latents)
    sync()
    prev.collect()
    pooled_px = math.ceil(height / 8 / prev.pool) * math.ceil(width / 8 / prev.pool)
    return {
        "seconds_per_step": (time.perf_counter() - t0) / repeat,
        "preview_px": [math.ceil(height / 8 / prev.pool), math.ceil(width / 8 / prev.pool)],
        # pool adds over every latent value; the map is 16x3 multiply-adds per pooled pixel
        "kflop_per_step": round((LATENT_CHANNELS * (height // 8) * (width // 8) + 2 * 16 * 3 * pooled_px) / 1e3, 1),
        "frames": len(frames),
    }
