"""The settings themselves: one frozen dataclass, one field per setting, with its help text,
choices, group and bounds (``opt``). How they are read is in zimage.settings.sources, how they
are checked in zimage.settings.checks."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_origin

from zimage.model.memory import MemoryMode

ENV_PREFIX = "ZIMAGE_"
DEFAULT_MODEL = "Tongyi-MAI/Z-Image-Turbo"
MEMORY_MODES = ("auto", *(m.value for m in MemoryMode))
COMPILE_MODES = ("auto", "off", "regional", "regional-max-autotune")
ATTENTION_BACKENDS = ("auto", "native", "_native_cudnn", "_native_flash", "_native_efficient", "flash", "_flash_3")


def _cache_home() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "zimage"


def opt(
    default: Any = None,
    help: str = "",
    choices: tuple | None = None,
    group: str = "general",
    bounds: tuple[float | None, float | None] = (0, None),
    **kw: Any,
):
    """A setting. bounds: the least and most a number may be (None: no bound); every number is
    also refused when it is NaN or infinite."""
    meta = {"help": help, "choices": choices, "group": group, "bounds": bounds}
    if callable(default) and not isinstance(default, (str, int, float, bool)):
        return field(default_factory=default, metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


@dataclass(frozen=True)
class Settings:
    # --- model -------------------------------------------------------------------------
    model: str = opt(
        DEFAULT_MODEL,
        "Model: a Hugging Face repo id (default Tongyi-MAI/Z-Image-Turbo, resolved through the "
        "local cache; honours HF_HOME and HF_HUB_OFFLINE), a local directory in the diffusers "
        "layout, or 'tiny' for the built-in random-weight test model.",
        group="model",
    )
    revision: str | None = opt(None, "Hub revision (branch, tag or commit) of the model.", group="model")
    tiny_dir: str = opt(
        lambda: str(_cache_home() / "tiny"),
        "Folder where the tiny test model is written once and loaded from afterwards.",
        group="model",
    )
    device: str = opt("auto", "Device: auto, cpu, cuda or cuda:N.", group="model")
    dtype: str = opt(
        "auto",
        "Compute dtype: auto (bfloat16 on GPU, float32 on CPU), bfloat16, float16 or float32.",
        choices=("auto", "bfloat16", "float16", "float32"),
        group="model",
    )

    # --- loading and speed ------------------------------------------------------------
    loader: str = opt(
        "fast",
        "How weights are loaded: 'fast' reads safetensors shards in parallel straight to the "
        "device; 'diffusers' uses from_pretrained(device_map=...).",
        choices=("fast", "diffusers"),
        group="speed",
    )
    parallel_loading: bool = opt(True, "Read shards and components on several threads at once.", group="speed")
    load_threads: int = opt(8, "Reader threads for the fast loader.", group="speed", bounds=(1, 256))
    mmap: bool = opt(
        False,
        "Read weights through a memory map (safetensors' own reader) instead of chunked reads "
        "into staging buffers. Chunked reads are faster on GPU; mmap uses less host memory.",
        group="speed",
    )
    async_transfer: bool = opt(
        True,
        "GPU only: stage reads in pinned host buffers and copy on side CUDA streams, so disk "
        "reads overlap host-to-GPU copies.",
        group="speed",
    )
    staging_mb: int = opt(
        16,
        "Size of each pinned staging buffer of the fast loader, MiB (16 read fastest on an H100 box).",
        group="speed",
        bounds=(1, 4096),
    )
    compile: str = opt(
        "auto",
        "torch.compile of the transformer blocks: auto (regional on GPU, off on CPU), off, "
        "regional, regional-max-autotune.",
        choices=COMPILE_MODES,
        group="speed",
    )
    compile_vae: bool = opt(
        False,
        "GPU only: torch.compile the VAE decoder (channels_last): 0.05 s instead of 0.09 s per 1024px decode "
        "on an H100, but it recompiles for every new image size and adds to start-up.",
        group="speed",
    )
    compile_text_encoder: bool = opt(
        False,
        "GPU only: torch.compile each text-encoder layer (fewer kernel launches for short prompts).",
        group="speed",
    )
    compile_cache_dir: str = opt(
        lambda: str(_cache_home() / "inductor"),
        "Persistent compile cache (TORCHINDUCTOR_CACHE_DIR) so a restart skips compiling.",
        group="speed",
    )
    warmup: bool = opt(True, "Run one generation at start-up so the first request is fast.", group="speed")
    warmup_sizes: str = opt(
        "",
        "Comma-separated WxH sizes to warm up (default: the preset's default size).",
        group="speed",
    )
    attention_backend: str = opt(
        "auto",
        "diffusers attention backend for the transformer (auto picks the fastest present).",
        choices=ATTENTION_BACKENDS,
        group="speed",
    )
    real_length_prompt: bool = opt(
        True,
        "Encode the prompt at its real token length instead of padding it to 512 tokens "
        "(the transformer sees the same embeddings either way).",
        group="speed",
    )
    trim_text_encoder: bool = opt(
        True,
        "Drop the text encoder's last layer and final norm, whose output the pipeline never "
        "uses (it reads hidden_states[-2]): less memory and load time, same embeddings.",
        group="speed",
    )

    # --- memory -------------------------------------------------------------------------
    memory_mode: str = opt(
        "auto",
        "Memory mode: auto (chosen from the hardware), gpu, balanced (16 GB cards), lowvram "
        "(8 GB cards), multi-gpu, model-offload, sequential-offload or cpu.",
        choices=MEMORY_MODES,
        group="memory",
    )
    vae_tiling: bool = opt(False, "Decode the VAE in tiles (less memory at large sizes).", group="memory")
    vae_slicing: bool = opt(False, "Decode a batch one image at a time (less memory).", group="memory")
    attention_slicing: bool = opt(
        False,
        "Has no effect for Z-Image: no component supports set_attention_slice and SDPA is "
        "already memory-linear. Accepted for compatibility; use vae_tiling/vae_slicing.",
        group="memory",
    )
    cuda_alloc_conf: str = opt(
        "expandable_segments:True",
        "PYTORCH_CUDA_ALLOC_CONF applied before CUDA starts (empty: leave as is).",
        group="memory",
    )
    memory_fraction: float = opt(
        0.0,
        "torch.cuda.set_per_process_memory_fraction (0 = no cap). Mimics a smaller card.",
        group="memory",
        bounds=(0, 1),
    )
    gpu_max_memory: str = opt(
        "",
        "Most memory the policy may plan on each GPU, as accelerate's max_memory: e.g. '0=20GiB,1=70GiB' "
        "(empty = all free memory). Components are placed whole, each on one GPU.",
        group="memory",
    )

    # --- several GPUs ---------------------------------------------------------------------
    replicas: str = opt(
        "auto",
        "Pipelines serving one shared queue, one per GPU: auto (one per selected GPU when the model fits on "
        "each of two or more, else one), or a number. Several replicas run in child processes, one per GPU.",
        group="gpus",
    )
    gpus: str = opt("", "Comma-separated GPU indices to use, e.g. 0,1 (empty = every visible GPU).", group="gpus")
    load_aware_queue: int = opt(
        0,
        "Load-aware steps: when more than this many jobs wait, new jobs run with fewer steps "
        "(load_aware_min_steps); the page, the PNG and /metrics say so (0 = off).",
        group="gpus",
    )
    load_aware_min_steps: int = opt(
        4, "Load-aware steps: the fewest steps a job is reduced to when the queue is long.", group="gpus"
    )

    # --- several boxes: Ray Serve ------------------------------------------------------
    ray: str = opt(
        "",
        "Run the replicas as Ray Serve deployments (one GPU each) on a Ray cluster: auto (the cluster this "
        "box joined with `ray start`), an address such as 10.0.0.5:6379, or local (a private Ray of this "
        "process). Empty = off: no Ray at all. Needs `pip install 'ray[serve]'`.",
        group="ray",
    )
    ray_replicas: str = opt(
        "auto",
        "With --ray: a fixed number of replicas, or auto: one per GPU in the cluster at start (at least 1), "
        "and Ray Serve adds replicas up to --ray-max-replicas while jobs wait and GPUs are free "
        "(e.g. on a box that joined later).",
        group="ray",
    )
    ray_max_replicas: int = opt(16, "With --ray and --ray-replicas auto: the most replicas Serve may run.", group="ray")

    # --- request limits and defaults --------------------------------------------------
    min_size: int = opt(256, "Smallest width/height in pixels (multiple of 16).", group="limits", bounds=(16, 16384))
    max_size: int = opt(2048, "Largest width/height in pixels (multiple of 16).", group="limits", bounds=(16, 16384))
    max_prompt_chars: int = opt(2000, "Longest prompt accepted, in characters.", group="limits", bounds=(1, 1_000_000))
    max_steps: int = opt(50, "Most denoising steps a request may ask for.", group="limits", bounds=(1, 1000))
    max_count: int = opt(8, "Most images one request may ask for.", group="limits", bounds=(1, 256))
    default_steps: int = opt(8, "Denoising steps when a request does not say.", group="limits", bounds=(1, 1000))
    default_width: int = opt(0, "Default width (0 = the model preset's).", group="limits", bounds=(0, 16384))
    default_height: int = opt(0, "Default height (0 = the model preset's).", group="limits", bounds=(0, 16384))

    # --- image to image, inpainting and LoRAs -------------------------------------------
    lora_dir: str = opt(
        "loras", "Folder of LoRA files (.safetensors) the page, the API and the CLI pick from.", group="toolbox"
    )
    lora_mode: str = opt(
        "auto",
        "How LoRAs are switched between jobs: auto (hotswap when the transformer is compiled, else adapters); "
        "hotswap (one LoRA slot of rank lora_max_rank, swapped in place: no recompile); adapters (each LoRA "
        "loaded once as its own adapter, kept in a cache of lora_cache).",
        choices=("auto", "hotswap", "adapters"),
        group="toolbox",
    )
    lora_max_rank: int = opt(
        64,
        "Hotswap slot rank: the ranks of the LoRAs one request uses together must add up to at most this "
        "(a larger slot costs memory and time on every image).",
        group="toolbox",
    )
    lora_files: tuple[str, ...] = opt(
        tuple,
        "LoRA files outside lora_dir, offered by their file name (repeatable; `generate --lora PATH` adds its file).",
        group="toolbox",
    )
    max_loras: int = opt(4, "Most LoRAs one request may use together.", group="toolbox")
    lora_cache: int = opt(8, "LoRAs kept read (and, in adapters mode, loaded) for the next job.", group="toolbox")

    # --- outputs ------------------------------------------------------------------------
    outputs_dir: str = opt("outputs", "Folder for generated PNG files.", group="outputs")
    png_metadata: bool = opt(
        True,
        "Embed the generation parameters in each PNG (turn off for privacy).",
        group="outputs",
    )
    png_compress_level: int = opt(
        4, "zlib level for PNG files (0-9; lower is faster, larger).", group="outputs", bounds=(0, 9)
    )
    min_free_mib: int = opt(
        256,
        "Refuse new jobs, with a message naming the folder and its free space, while the disk of the outputs "
        "folder has less free space than this, MiB (0 = no check). /ready answers 503 meanwhile.",
        group="outputs",
        bounds=(0, 1 << 30),
    )
    gradio_cache_dir: str = opt(
        lambda: str(_cache_home() / "gradio"),
        "zimage's own folder for Gradio's cache (the images a page shows, uploads), set as GRADIO_TEMP_DIR "
        "before Gradio starts; GRADIO_TEMP_DIR is read when this is not given. Never the shared "
        "/tmp/gradio: the purge cleans this folder.",
        group="outputs",
    )
    purge_every_minutes: float = opt(
        30.0, "How often the purge thread runs (0 = never).", group="outputs", bounds=(0, 525_600)
    )
    purge_max_age_hours: float = opt(
        24.0 * 7, "Delete outputs older than this (0 = no age limit).", group="outputs", bounds=(0, 876_000)
    )
    purge_max_count: int = opt(5000, "Keep at most this many outputs (0 = no limit).", group="outputs")
    purge_max_gib: float = opt(
        20.0, "Keep the outputs folder under this size in GiB (0 = no limit).", group="outputs", bounds=(0, 1e6)
    )

    # --- server -------------------------------------------------------------------------
    host: str = opt("0.0.0.0", "Address the web server listens on.", group="server")
    port: int = opt(7860, "Port the web server listens on.", group="server", bounds=(1, 65535))
    queue_size: int = opt(
        16, "Most requests waiting for the GPU; more are refused at once.", group="server", bounds=(1, 100_000)
    )
    auth: tuple[str, ...] = opt(
        tuple,
        "user:password that may log in (repeatable; ZIMAGE_AUTH takes a comma-separated list).",
        group="server",
    )
    auth_file: str | None = opt(None, "File with one user:password per line.", group="server")
    admins: tuple[str, ...] = opt(
        tuple,
        "Logged-in users who see every user's outputs and history (comma-separated in ZIMAGE_ADMINS).",
        group="server",
    )
    max_jobs_per_user: int = opt(
        4,
        "Most jobs one user (one address without logins) may have queued or running; more are refused "
        "at once, and everyone else keeps their place.",
        group="server",
    )
    max_upload_mb: int = opt(16, "Largest file one upload may be, in MB.", group="server")
    upload_quota_mb: int = opt(200, "Most MB one user (or address) may upload per hour (0 = no limit).", group="server")
    upload_quota_files: int = opt(
        60, "Most files one user (or address) may upload per hour (0 = no limit).", group="server"
    )
    login_max_delay_s: float = opt(
        30.0,
        "Failed logins: after 5 in a row for one user name or from one address, the next attempt must wait "
        "1 s, then 2 s, 4 s, ... up to this many seconds (0 = no throttle).",
        group="server",
    )
    share: bool = opt(False, "Ask Gradio for a public share link (needs auth).", group="server")
    share_without_auth: bool = opt(False, "Allow --share without auth, on purpose.", group="server")
    root_path: str = opt("", "URL prefix when served behind a reverse proxy.", group="server")
    shutdown_grace_s: float = opt(
        60.0,
        "On SIGTERM/SIGINT: how long the running job may take before it is cancelled.",
        group="server",
        bounds=(0, 86_400),
    )
    watchdog_reserved_gib: float = opt(
        0.0,
        "Exit (for Supervisor to restart) when reserved VRAM stays above this after a job (0 = off).",
        group="server",
        bounds=(0, 100_000),
    )
    watchdog_strikes: int = opt(
        3, "Consecutive jobs over the threshold before the watchdog acts.", group="server", bounds=(1, 10_000)
    )
    log_level: str = opt(
        "INFO",
        "Log level.",
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        group="server",
    )
    config: str | None = opt(
        None,
        "YAML settings file (default: ./zimage.yaml when it exists; ZIMAGE_CONFIG).",
        group="general",
    )

    # ------------------------------------------------------------------------------------
    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


def _base_type(tp: Any) -> type:
    """bool/int/float/str/tuple from an annotation string such as 'str | None'."""
    if isinstance(tp, str):
        name = tp.replace(" ", "").split("|")[0]
        return {"bool": bool, "int": int, "float": float, "str": str}.get(name.split("[")[0], tuple)
    origin = get_origin(tp)
    if origin is tuple:
        return tuple
    args = [a for a in get_args(tp) if a is not type(None)]
    return args[0] if args else tp


FIELD_TYPES: dict[str, type] = {f.name: _base_type(f.type) for f in fields(Settings)}
