"""What one job produced: the images, the seeds used, the time of each stage, and the one
projection of it that the PNG metadata, the page, the API and the CLI all use."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from zimage.service.request import GenerationRequest

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image


@dataclass
class StageTimings:
    """Seconds per stage of one job, measured with CUDA events on GPU and perf_counter on CPU."""

    queue_wait: float = 0.0
    text_encoder: float = 0.0
    steps: list[float] = field(default_factory=list)
    vae_decode: float = 0.0
    to_host: float = 0.0
    gpu_total: float = 0.0  # request start (lock taken) to decoded RGB pixels in host memory
    png: float | None = None  # encode and write, measured beside the next job
    vae_encode: float = 0.0  # image to image and inpainting: the source through the VAE encoder
    lora: float = 0.0  # putting the job's LoRAs in effect (reading a new file, loading or swapping)

    @property
    def denoise(self) -> float:
        return sum(self.steps)

    @property
    def it_per_s(self) -> float:
        return len(self.steps) / self.denoise if self.denoise > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "queue_wait_s": round(self.queue_wait, 4),
            "text_encoder_s": round(self.text_encoder, 4),
            "denoise_s": round(self.denoise, 4),
            "steps_s": [round(s, 4) for s in self.steps],
            "it_per_s": round(self.it_per_s, 3),
            "vae_decode_s": round(self.vae_decode, 4),
            "to_host_s": round(self.to_host, 4),
            "total_s": round(self.gpu_total, 4),
            "png_s": None if self.png is None else round(self.png, 4),
            "vae_encode_s": round(self.vae_encode, 4),
            "lora_s": round(self.lora, 4),
        }

    def summary(self) -> str:
        png = "pending" if self.png is None else f"{self.png:.3f}s"
        return (
            f"queue {self.queue_wait:.3f}s, text {self.text_encoder:.3f}s, {len(self.steps)} steps {self.denoise:.3f}s "
            f"({self.it_per_s:.2f} it/s), vae {self.vae_decode:.3f}s, total {self.gpu_total:.3f}s, png {png}"
        )


@dataclass
class GenerationResult:
    request: GenerationRequest  # seed resolved
    images: list[Image.Image]
    seeds: list[int]
    timings: StageTimings
    model: str
    memory_mode: str
    device: str
    job_id: str
    started_at: float = 0.0  # wall clock when the job got the GPU (its date in history and metadata)
    replica: str = ""  # the replica (GPU worker) that ran it
    steps_asked: int | None = None  # set when load-aware steps ran fewer steps than asked
    paths: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # e.g. "retried with VAE tiling after OOM"
    compute_path: str = "eager"  # "eager" or "compiled" (blocks), as zimage.model.compiler routed it
    # Images made but not written (disk full, read-only...): store.UnsavedImage, PNG bytes kept
    unsaved: list[Any] = field(default_factory=list)
    save_error: str | None = None  # the sentence that tells the user why they were not saved
    loras: list[dict[str, Any]] = field(default_factory=list)  # name, weight, sha256 of each LoRA used
    _saved: Any = None  # concurrent.futures.Future[list[str]] while the PNGs are written

    def wait_saved(self, timeout: float | None = None) -> list[str]:
        """Block until the PNG files are on disk; returns their paths."""
        if self._saved is not None:
            self.paths = list(self._saved.result(timeout))
        return self.paths

    def metadata(self, seed: int) -> dict[str, Any]:
        """The parameters embedded in the PNG of the image made with this seed."""
        r = self.request
        return {
            "prompt": r.prompt,
            "negative_prompt": r.negative_prompt,
            "seed": seed,
            "width": r.width,
            "height": r.height,
            "steps": r.steps,
            "guidance": r.guidance,
            **({"shift": r.shift} if r.shift is not None else {}),
            "model": self.model,
            "memory_mode": str(self.memory_mode),
            "device": self.device,
            "timings": self.timings.as_dict(),
            "created": _iso(self.started_at),
            "batch_seed": r.seed,
            "batch_count": r.count,
            "generator": "zimage",
            **self.toolbox(),
            **self._load_aware(),
        }

    def _load_aware(self) -> dict[str, Any]:
        """Said wherever the parameters go, so nobody mistakes a faster, rougher picture for the usual."""
        if self.steps_asked is None:
            return {}
        return {"steps_asked": self.steps_asked, "load_aware_steps": True}

    def toolbox(self) -> dict[str, Any]:
        """Image to image, inpainting and LoRAs: what the PNG records and a loaded PNG restores."""
        r = self.request
        out: dict[str, Any] = {}
        if r.source is not None:
            out.update(
                mode=r.mode,
                strength=r.strength,
                source_sha256=r.source.sha256,
                source_size=list(r.source.given_size),
                mask=r.source.mask is not None,
                feather=r.feather,
                outpaint=list(r.outpaint),
            )
        if self.loras:
            out["loras"] = [dict(entry) for entry in self.loras]
        return out

    def summary(self) -> dict[str, Any]:
        """The short record the profiler's "Last run" card shows (no prompt: the panel is shared)."""
        return {
            "job": self.job_id,
            "when": time.time(),
            "size": f"{self.request.width}x{self.request.height}",
            "count": self.request.count,
            "steps": self.request.steps,
            "seeds": list(self.seeds),
            "timings": self.timings,
            "notes": list(self.notes),
        }

    def details(self) -> dict[str, Any]:
        """What the page and the API return about a finished run (the PNG file names, not paths)."""
        r = self.request
        return {
            "seed": self.seeds[0],
            "seeds": list(self.seeds),
            "width": r.width,
            "height": r.height,
            "steps": r.steps,
            "guidance": r.guidance,
            "shift": r.shift,
            "count": r.count,
            "prompt": r.prompt,
            "negative_prompt": r.negative_prompt,
            "files": [Path(p).name for p in self.paths],
            "saved": not self.unsaved,
            "unsaved": [u.name for u in self.unsaved],
            "save_error": self.save_error,
            "model": self.model,
            "memory_mode": str(self.memory_mode),
            "device": self.device,
            "notes": list(self.notes),
            "timings": self.timings.as_dict(),
            "started_at": self.started_at,
            "job": self.job_id,
            **self.toolbox(),
            "replica": self.replica,
            "compute_path": self.compute_path,
            **self._load_aware(),
        }


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(ts)) if ts else ""
