"""Compile artifacts that load in a second instead of a re-compile (torch's Mega-Cache).

After the compiled blocks first ran, `torch.compiler.save_cache_artifacts()` gives one blob with
every Inductor graph, AOTAutograd entry and Triton kernel the compile made; at the next start,
`torch.compiler.load_cache_artifacts(blob)` puts them back before anything compiles, so the
compile finds all of them in its caches. The blob is only valid for the same torch, CUDA, GPU,
model code and compile options, so it lives in a folder of zimage's own, named by a key made of
exactly those:

    <compile_cache_dir>/zimage-artifacts/<key digest>/megacache.bin   the blob
                                                     /key.json        the key, the blob's sha256,
                                                                      seconds the compile took

A different key is a different folder (so a torch upgrade or another model builds its own); a
folder whose key.json does not match what we expect ("foreign") or whose blob fails its checksum
or torch's own check ("corrupt") is ignored with one log line and rebuilt by a clean compile.
`python -m zimage warmup` builds them ahead (an image build can run it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import zimage

log = logging.getLogger(__name__)

FOLDER = "zimage-artifacts"
BLOB = "megacache.bin"
KEY_FILE = "key.json"
FORMAT = 1


@dataclass(frozen=True)
class ArtifactKey:
    """Everything a compiled artifact depends on; two starts with equal keys can share one."""

    torch: str
    cuda: str  # torch.version.cuda, or "none"
    device: str  # GPU name (e.g. "NVIDIA H200") or "cpu"
    capability: str  # e.g. "9.0"; "" on CPU
    model: str  # digest of the model's config files and weight shard sizes
    compile_mode: str  # e.g. "regional"
    options: str  # what else changes the graphs: dtype, attention backend, compiled parts
    diffusers: str  # the traced code is diffusers' model code
    zimage: str
    format: int = FORMAT

    def digest(self) -> str:
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:20]


def model_identity(folder: Path) -> str:
    """A digest of the model's configuration files and its weight shards' names and sizes
    (reading 19 GiB to hash it would cost more than the compile it saves)."""
    h = hashlib.sha256()
    folder = Path(folder)
    for path in sorted(folder.rglob("*")):
        if not path.is_file():
            continue
        rel = path.relative_to(folder).as_posix()
        if path.suffix == ".json":
            h.update(f"{rel}\n".encode())
            h.update(path.read_bytes())
        elif path.suffix == ".safetensors":
            h.update(f"{rel} {path.stat().st_size}\n".encode())
    return h.hexdigest()[:20]


def current_key(model_folder: Path, compile_mode: str, options: str, device: Any = None) -> ArtifactKey:
    """The key of this process: torch, CUDA, the GPU that runs the blocks, the model, the options."""
    import torch

    try:
        import diffusers

        diffusers_version = diffusers.__version__
    except ImportError:  # pragma: no cover - diffusers is a requirement
        diffusers_version = "none"
    name, capability = "cpu", ""
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cuda" and torch.cuda.is_available():
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        name = torch.cuda.get_device_name(index)
        major, minor = torch.cuda.get_device_capability(index)
        capability = f"{major}.{minor}"
    return ArtifactKey(
        torch=torch.__version__,
        cuda=str(torch.version.cuda or "none"),
        device=name,
        capability=capability,
        model=model_identity(model_folder),
        compile_mode=compile_mode,
        options=options,
        diffusers=diffusers_version,
        zimage=zimage.__version__,
    )


def folder_for(cache_dir: str | Path, key: ArtifactKey) -> Path:
    return Path(os.path.expanduser(str(cache_dir))) / FOLDER / key.digest()


@dataclass
class Loaded:
    """What `load` found: status is loaded, missing, foreign or corrupt."""

    status: str
    detail: str = ""
    compile_seconds: float | None = None  # what the compile took when these artifacts were made
    cached_seconds: float | None = None  # what a compile from these artifacts took last time
    nbytes: int = 0


def read_record(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / KEY_FILE).read_text())
    except (OSError, ValueError):
        return None


def load(cache_dir: str | Path, key: ArtifactKey) -> Loaded:
    """Put the saved artifacts of this key into torch's compile caches, when they are sound."""
    folder = folder_for(cache_dir, key)
    blob = folder / BLOB
    if not blob.is_file():
        return Loaded("missing", f"no compile artifacts in {folder}")
    record = read_record(folder)
    if record is None or record.get("key") != asdict(key):
        return _reject(folder, "foreign", "its key.json does not match this torch, GPU, model and compile mode")
    data = blob.read_bytes()
    if hashlib.sha256(data).hexdigest() != record.get("sha256"):
        return _reject(folder, "corrupt", f"its checksum does not match ({len(data)} bytes)")
    try:
        import torch

        info = torch.compiler.load_cache_artifacts(data)
    except Exception as exc:  # noqa: BLE001 - any failure means: compile afresh
        return _reject(folder, "corrupt", f"torch could not load it ({type(exc).__name__}: {str(exc)[:120]})")
    if info is None:
        return _reject(folder, "corrupt", "torch could not read it")
    kinds = {k: len(v) for k, v in getattr(info, "artifacts", {}).items()}
    seconds = record.get("compile_seconds")
    return Loaded("loaded", f"{len(data) / 2**20:.1f} MiB, {kinds}", seconds, record.get("cached_seconds"), len(data))


def record_cached_seconds(cache_dir: str | Path, key: ArtifactKey, seconds: float) -> None:
    """Note what a compile from these artifacts took (the next start's estimate of full speed)."""
    folder = folder_for(cache_dir, key)
    record = read_record(folder)
    if record is None or record.get("key") != asdict(key):
        return
    record["cached_seconds"] = round(seconds, 2)
    try:
        _atomic_write(folder / KEY_FILE, json.dumps(record, indent=1).encode())
    except OSError as exc:
        log.debug("could not note the compile time: %s", exc)


def _reject(folder: Path, status: str, why: str) -> Loaded:
    log.warning("compile artifacts in %s are %s (%s): ignoring them and compiling afresh", folder, status, why)
    shutil.rmtree(folder, ignore_errors=True)
    return Loaded(status, why)


def save(cache_dir: str | Path, key: ArtifactKey, compile_seconds: float, data: bytes | None = None) -> Path | None:
    """Write this process's compile artifacts (or `data`) under the key; None when there are none."""
    if data is None:
        import torch

        out = torch.compiler.save_cache_artifacts()
        data = out[0] if out else None
    if not data:
        log.info("no compile artifacts to save (the compile backend made none)")
        return None
    folder = folder_for(cache_dir, key)
    folder.mkdir(parents=True, exist_ok=True)
    record = {
        "key": asdict(key),
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
        "compile_seconds": round(compile_seconds, 2),
        "written": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    _atomic_write(folder / BLOB, data)
    _atomic_write(folder / KEY_FILE, json.dumps(record, indent=1).encode())
    log.info("compile artifacts saved: %s (%.1f MiB)", folder / BLOB, len(data) / 2**20)
    return folder / BLOB


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
