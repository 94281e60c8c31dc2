"""One frozen Settings dataclass, read once: command line > environment > YAML file > defaults.

Every field is a setting. Its command-line flag is ``--field-name``, its environment
variable ``ZIMAGE_FIELD_NAME`` and its YAML key ``field_name``. This module imports
neither torch nor diffusers, so ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_origin

from zimage.errors import SettingsError
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


# ------------------------------------------------------------------------------------------
# parsing


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
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _coerce(name: str, value: Any, source: str) -> Any:
    tp = FIELD_TYPES[name]
    try:
        if value is None:
            return None
        if tp is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in _TRUE:
                return True
            if text in _FALSE:
                return False
            raise ValueError
        if tp is tuple:
            if isinstance(value, str):
                return tuple(v.strip() for v in value.split(",") if v.strip())
            return tuple(str(v) for v in value)
        if tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if tp is float:
            return float(value)
        if isinstance(value, bool):  # YAML reads a bare off/on/no/yes as a boolean
            return "on" if value else "off"
        return str(value)
    except (TypeError, ValueError):
        kind = {bool: "true or false", int: "a whole number", float: "a number"}.get(tp, "text")
        raise SettingsError(f"Setting '{name}' from {source} must be {kind} (got {value!r}).") from None


DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
# Settings naming a folder or a file: never empty (an empty path would mean the working folder).
PATH_SETTINGS = ("tiny_dir", "compile_cache_dir", "outputs_dir", "gradio_cache_dir")


def _number_problem(value: float, bounds: tuple[float | None, float | None]) -> str | None:
    """What is wrong with a number, or None: NaN and infinities never work; bounds are inclusive."""
    if isinstance(value, float) and not math.isfinite(value):
        return "a finite number"
    lo, hi = bounds
    if lo is not None and hi is not None and not lo <= value <= hi:
        return f"within {_plain(lo)}..{_plain(hi)}"
    if lo is not None and value < lo:
        return f"at least {_plain(lo)}"
    if hi is not None and value > hi:
        return f"at most {_plain(hi)}"
    return None


def _plain(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _check(s: Settings) -> Settings:
    """Every setting, checked once at start: the first problem raises one SettingsError line."""
    for f in fields(Settings):
        value = getattr(s, f.name)
        choices = f.metadata.get("choices")
        if choices and value not in choices:
            raise SettingsError(f"Setting '{f.name}' must be one of {', '.join(choices)} (got {value!r}).")
        if FIELD_TYPES[f.name] in (int, float) and value is not None:
            problem = _number_problem(value, f.metadata.get("bounds", (0, None)))
            if problem:
                raise SettingsError(f"Setting '{f.name}' must be {problem} (got {value!r}).")
    for name in ("model", "host", *PATH_SETTINGS):
        if not str(getattr(s, name) or "").strip():
            raise SettingsError(f"Setting '{name}' must not be empty.")
    if not DEVICE.fullmatch(s.device):
        raise SettingsError(f"Setting 'device' must be auto, cpu, cuda or cuda:N (got {s.device!r}).")
    for name in ("min_size", "max_size", "default_width", "default_height"):
        value = getattr(s, name)
        if value % 16:
            raise SettingsError(f"Setting '{name}' must be a multiple of 16 (got {value}).")
    if s.min_size > s.max_size:
        raise SettingsError(f"Setting 'min_size' must be at most max_size ({s.max_size}) (got {s.min_size}).")
    for name in ("default_width", "default_height"):
        value = getattr(s, name)
        if value and not s.min_size <= value <= s.max_size:
            raise SettingsError(
                f"Setting '{name}' must be 0 (the preset's) or within min_size..max_size "
                f"({s.min_size}..{s.max_size}) (got {value})."
            )
    if s.default_steps > s.max_steps:
        raise SettingsError(
            f"Setting 'default_steps' must be within 1..max_steps ({s.max_steps}) (got {s.default_steps})."
        )
    if s.root_path and not s.root_path.startswith("/"):
        raise SettingsError(f"Setting 'root_path' must be empty or start with '/' (got {s.root_path!r}).")
    for part in (p.strip() for p in s.warmup_sizes.split(",")):
        if not part:
            continue
        w, sep, h = part.lower().replace("×", "x").partition("x")
        if not (sep and w.isdigit() and h.isdigit()):
            raise SettingsError(f"Setting 'warmup_sizes' must list sizes such as 1024x768 (got {part!r}).")
        for side in (int(w), int(h)):
            if side % 16 or not s.min_size <= side <= s.max_size:
                raise SettingsError(
                    f"Setting 'warmup_sizes': {part} must have sides that are multiples of 16 within "
                    f"min_size..max_size ({s.min_size}..{s.max_size})."
                )
    if s.lora_max_rank < 1 or s.lora_cache < 1 or s.max_loras < 0:
        raise SettingsError(
            "Settings 'lora_max_rank' and 'lora_cache' must be at least 1, 'max_loras' at least 0 "
            f"(got {s.lora_max_rank}, {s.lora_cache}, {s.max_loras})."
        )
    if s.gpu_max_memory:
        from zimage.model.memory import parse_max_memory

        try:
            parse_max_memory(s.gpu_max_memory)
        except ValueError as exc:
            raise SettingsError(f"Setting 'gpu_max_memory': {exc}") from None
    for entry in s.auth:
        parse_user(entry, "--auth")
    _check_access(s)
    _check_gpus(s)
    _check_ray(s)
    return s


def _check_access(s: Settings) -> None:
    """The per-user limits (users themselves are checked by the web server, which reads the auth file)."""
    for name in ("max_jobs_per_user", "max_upload_mb"):
        if getattr(s, name) < 1:
            raise SettingsError(f"Setting '{name}' must be at least 1 (got {getattr(s, name)}).")
    for name in ("upload_quota_mb", "upload_quota_files"):
        if getattr(s, name) < 0:
            raise SettingsError(f"Setting '{name}' must be 0 (no limit) or more (got {getattr(s, name)}).")
    if not 0.0 <= s.login_max_delay_s <= 86400.0:  # also refuses NaN
        raise SettingsError(f"Setting 'login_max_delay_s' must be within 0..86400 seconds (got {s.login_max_delay_s}).")


def _check_gpus(s: Settings) -> None:
    if s.replicas != "auto" and not (s.replicas.isdigit() and int(s.replicas) >= 1):
        raise SettingsError(f"Setting 'replicas' must be auto or a whole number of at least 1 (got {s.replicas!r}).")
    indices = parse_gpus(s.gpus)
    if len(set(indices)) != len(indices):
        raise SettingsError(f"Setting 'gpus' names a GPU twice (got {s.gpus!r}); list each index once, e.g. 0,1.")
    if s.replicas != "auto" and indices and int(s.replicas) > len(indices):
        raise SettingsError(
            f"Setting 'replicas' is {s.replicas} but 'gpus' selects only {len(indices)} GPU(s) ({s.gpus}); "
            "one replica needs a GPU of its own."
        )
    if indices and s.device.startswith("cuda:"):
        raise SettingsError(f"Settings 'gpus' ({s.gpus}) and 'device' ({s.device}) both pick GPUs; set only one.")
    if s.replicas not in ("auto", "1") and s.memory_mode == "multi-gpu":
        raise SettingsError(
            f"Setting 'replicas' is {s.replicas} but memory_mode multi-gpu splits one pipeline over the GPUs; "
            "use one or the other."
        )
    # only in use when load_aware_queue is on: its default (4) must not refuse max_steps 1 otherwise
    if s.load_aware_min_steps < 1 or (s.load_aware_queue and s.load_aware_min_steps > s.max_steps):
        raise SettingsError(
            f"Setting 'load_aware_min_steps' must be within 1..max_steps (got {s.load_aware_min_steps})."
        )


def parse_gpus(text: str) -> list[int]:
    """'0,1' -> [0, 1]; SettingsError names what is wrong."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        if not part.isdigit():
            raise SettingsError(f"Setting 'gpus' must be GPU indices separated by commas, e.g. 0,1 (got {text!r}).")
        out.append(int(part))
    return out


def _check_ray(s: Settings) -> None:
    """--ray: a usable address, a replica count, and Ray installed (looked up, not imported)."""
    if not s.ray:
        return
    address = s.ray.strip()
    if address not in ("auto", "local") and not address.startswith("ray://"):
        host, sep, port = address.rpartition(":")
        if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise SettingsError(
                f"Setting 'ray' must be auto, local, HOST:PORT (the head box's `ray start --head` address, "
                f"e.g. 10.0.0.5:6379) or ray://HOST:PORT (got {s.ray!r})."
            )
    if s.ray_replicas != "auto" and not (s.ray_replicas.isdigit() and int(s.ray_replicas) >= 1):
        raise SettingsError(
            f"Setting 'ray_replicas' must be auto or a whole number of at least 1 (got {s.ray_replicas!r})."
        )
    if s.ray_max_replicas < 1:
        raise SettingsError(f"Setting 'ray_max_replicas' must be at least 1 (got {s.ray_max_replicas}).")
    if s.memory_mode == "multi-gpu":
        raise SettingsError(
            "Settings 'ray' and memory_mode multi-gpu do not go together: each Ray replica has one GPU. "
            "Leave memory_mode at auto."
        )
    if s.replicas != "auto" or s.gpus:
        raise SettingsError(
            "Settings 'replicas' and 'gpus' choose local GPUs; with 'ray' Ray places the replicas on the "
            "cluster's GPUs: use --ray-replicas instead (and CUDA_VISIBLE_DEVICES on `ray start` to hide GPUs)."
        )
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        raise SettingsError(
            "Setting 'ray' needs Ray Serve, which is not installed: pip install 'ray[serve]' "
            "(or pip install -e '.[ray]')."
        )


def parse_user(entry: str, where: str) -> tuple[str, str]:
    """'user:password' -> (user, password); the one parser of logins (flags, env, auth file)."""
    user, sep, password = entry.partition(":")
    if not sep or not user.strip():
        raise SettingsError(f"Auth entries must look like user:password (got {entry[:40]!r} in {where}).")
    if not password:
        raise SettingsError(f"Auth user {user.strip()!r} has an empty password ({where}); give one.")
    return user.strip(), password


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise SettingsError(f"Cannot read settings file {path}: {exc.strerror or exc}.") from None
    except UnicodeDecodeError as exc:
        raise SettingsError(
            f"Settings file {path} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); "
            "save it as UTF-8."
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise SettingsError(f"Settings file {path} is not valid YAML{where}: {problem}.") from None
    if not isinstance(data, dict):
        raise SettingsError(f"Settings file {path} must be a mapping of setting: value.")
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in FIELD_TYPES:
            raise SettingsError(f"Unknown setting '{key}' in {path}. Run --help for the list.")
        out[name] = _coerce(name, value, str(path))
    return out


def _read_env(environ: dict[str, str]) -> dict[str, Any]:
    out = {}
    for name in FIELD_TYPES:
        key = ENV_PREFIX + name.upper()
        if key in environ:
            out[name] = _coerce(name, environ[key], key)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per setting; unset flags are left out of the namespace."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in fields(Settings):
        group_name = f.metadata.get("group", "general")
        if group_name not in groups:
            groups[group_name] = parser.add_argument_group(f"{group_name} settings")
        group = groups[group_name]
        flag = "--" + f.name.replace("_", "-")
        tp = FIELD_TYPES[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        env = ENV_PREFIX + f.name.upper()
        help_text = f"{f.metadata.get('help', '')} [env {env}; default {default!r}]"
        kw: dict[str, Any] = {"default": argparse.SUPPRESS, "help": help_text, "dest": f.name}
        if tp is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif tp is tuple:
            group.add_argument(flag, action="append", metavar="VALUE", **kw)
        else:
            choices = f.metadata.get("choices")
            group.add_argument(flag, type=str, choices=choices, metavar=None if choices else "VALUE", **kw)


def from_sources(
    cli: dict[str, Any] | None = None,
    environ: dict[str, str] | None = None,
    config_path: str | None = None,
) -> Settings:
    """Build Settings: CLI values > environment > YAML file > defaults."""
    cli = {k: v for k, v in (cli or {}).items() if k in FIELD_TYPES}
    environ = dict(os.environ if environ is None else environ)
    env_values = _read_env(environ)
    path = cli.get("config") or config_path or env_values.get("config")
    values: dict[str, Any] = {}
    if path:
        if not Path(path).is_file():
            raise SettingsError(f"Settings file {path} does not exist.")
        values.update(_read_yaml(Path(path)))
        values["config"] = str(path)
    elif Path("zimage.yaml").is_file():
        values.update(_read_yaml(Path("zimage.yaml")))
        values["config"] = "zimage.yaml"
    if "gradio_cache_dir" not in env_values and environ.get("GRADIO_TEMP_DIR"):
        # Gradio's own variable names zimage's cache folder too, below ZIMAGE_GRADIO_CACHE_DIR
        env_values["gradio_cache_dir"] = environ["GRADIO_TEMP_DIR"]
    values.update(env_values)
    for name, value in cli.items():
        values[name] = _coerce(name, value, "--" + name.replace("_", "-"))
    return _check(Settings(**values))


def from_namespace(ns: argparse.Namespace) -> Settings:
    return from_sources(cli=vars(ns))


def describe(s: Settings) -> list[tuple[str, Any, str]]:
    """(name, value, help) rows, for `zimage doctor` and the docs."""
    return [(f.name, getattr(s, f.name), f.metadata.get("help", "")) for f in fields(Settings)]
