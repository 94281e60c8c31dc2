"""Every setting checked once at start (``check``): the first problem raises one SettingsError
line that names the setting, the value and the fix. Also the two parsers the web server and the
replica layout share: ``parse_gpus`` and ``parse_user``."""

from __future__ import annotations

import math
import re
from dataclasses import fields
from pathlib import Path

from zimage.errors import SettingsError
from zimage.settings.fields import FIELD_TYPES, Settings

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


def check(s: Settings) -> Settings:
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
    for path in s.lora_files:
        if not Path(path).expanduser().is_file():
            raise SettingsError(f"Setting 'lora_files': {path!r} is not a file.")
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
