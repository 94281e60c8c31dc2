"""What a process starts in its first moment, on side threads, while Python imports run.

- The library files the last start read (an import manifest: shared libraries and the Python
  modules' files) are handed to the kernel's readahead at once, so a cold disk serves imports
  from the page cache instead of one small random read at a time; on a first start, torch's and
  the NVIDIA wheels' shared libraries stand in for it.
- torch's CUDA library (and, through its run path, cuBLAS, cuDNN, NCCL ...) is loaded with
  ctypes, which lets go of the GIL while the dynamic loader maps and relocates it, so the work
  overlaps the Python imports on other threads; `import torch` then finds it loaded.
- The CUDA driver is initialised and the GPU's primary context made through the driver API
  (again without the GIL); torch's runtime later attaches to that same context.
- Once torch is imported, `warm_cuda` makes the cuBLAS, cuDNN and attention kernels' first
  calls on a side thread while diffusers and transformers import.

Nothing here is needed for correctness: each step that fails is skipped (logged at debug level).
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MANIFEST_PREFIX = "imports-"
FALLBACK_BUDGET = 8 << 30  # bytes of shared libraries read ahead on a first start


class Early:
    """The side threads' results, for the load timeline."""

    def __init__(self) -> None:
        self.started = 0.0
        self.libraries_read = threading.Event()  # readahead of library files issued
        self.torch_loaded = threading.Event()  # torch's CUDA library mapped (or skipped)
        self.context_ready = threading.Event()
        self.marks: dict[str, float] = {}
        self.readahead_files = 0
        self.readahead_bytes = 0
        self.manifest: str | None = None  # the manifest read ahead (None: none yet, or the fallback)
        self.manifest_file: Path | None = None  # where this process's manifest goes

    def mark(self, name: str, since: float) -> None:
        self.marks[name] = round(time.perf_counter() - since, 3)

    def summary(self) -> str:
        if not self.started:
            return "not started"
        parts = [f"{k} {v:.2f}s" for k, v in self.marks.items()]
        src = "manifest" if self.manifest else "fallback list"
        parts.append(f"readahead {self.readahead_files} files, {self.readahead_bytes / 2**30:.2f} GiB ({src})")
        return "; ".join(parts)


_early: Early | None = None
_lock = threading.Lock()
_ident: str | None = None  # this interpreter and its module path at the first ask


def state() -> Early | None:
    return _early


def start(settings: Any) -> Early:
    """Start the side threads once per process (later calls return the first one's state)."""
    global _early
    with _lock:
        if _early is not None:
            return _early
        _early = early = Early()
    early.started = time.perf_counter()
    wants_cuda = settings.device != "cpu"
    manifest = early.manifest_file = manifest_path(settings.compile_cache_dir)
    threading.Thread(target=_readahead, args=(early, manifest, wants_cuda), name="readahead-libs", daemon=True).start()
    if wants_cuda:
        threading.Thread(target=_load_torch_cuda, args=(early,), name="load-libcuda", daemon=True).start()
        threading.Thread(target=_cuda_context, args=(early, settings.device), name="cuda-context", daemon=True).start()
    else:
        early.torch_loaded.set()
        early.context_ready.set()
    return early


def wait_torch_libraries(timeout: float = 30.0) -> None:
    """Block (without the GIL) until the early thread mapped torch's CUDA library: an `import torch`
    that started meanwhile would wait for the loader lock while holding the GIL."""
    early = _early
    if early is not None:
        early.torch_loaded.wait(timeout)


# ------------------------------------------------------------------------------------------
# readahead of library files


def manifest_path(cache_dir: str) -> Path:
    """One manifest per interpreter and module search path (another venv reads other files),
    named from the path as it is when the process starts (imports may add to it later)."""
    global _ident
    if _ident is None:
        _ident = hashlib.sha256(("\n".join([sys.executable, *sys.path])).encode()).hexdigest()[:16]
    from zimage.model.artifacts import FOLDER

    return Path(os.path.expanduser(cache_dir)) / FOLDER / f"{MANIFEST_PREFIX}{_ident}.txt"


def loaded_files() -> list[str]:
    """The shared libraries mapped into this process and the files of its imported modules."""
    libs: list[str] = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(maxsplit=5)
                path = parts[5].strip() if len(parts) == 6 else ""
                if ".so" in path and path.startswith("/") and path not in libs:
                    libs.append(path)
    except OSError:
        pass
    modules: list[str] = []
    for module in list(sys.modules.values()):
        origin = getattr(module, "__file__", None)
        if not origin:
            continue
        modules.append(origin)
        if origin.endswith(".py"):
            try:
                modules.append(importlib.util.cache_from_source(origin))
            except (NotImplementedError, ValueError):
                pass
    return libs + [m for m in modules if m not in libs]


def write_manifest(cache_dir: str) -> Path | None:
    """Record what this process read to import its libraries (the next start reads it ahead)."""
    path = manifest_path(cache_dir)
    try:
        files = [f for f in loaded_files() if os.path.isfile(f)]
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text("\n".join(files) + "\n")
        os.replace(tmp, path)
        return path
    except OSError as exc:
        log.debug("import manifest not written: %s", exc)
        return None


def fallback_files() -> list[str]:
    """A first start's guess: torch's shared libraries, then the NVIDIA wheels' (biggest first)."""
    out: list[str] = []
    spec = importlib.util.find_spec("torch")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return out
    torch_dir = Path(next(iter(spec.submodule_search_locations)))
    site = torch_dir.parent
    libs = sorted((torch_dir / "lib").glob("*.so*"), key=lambda p: -p.stat().st_size)
    nvidia = sorted(site.glob("nvidia/*/lib/*.so*"), key=lambda p: -p.stat().st_size)
    total = 0
    for path in [*libs, *nvidia]:
        size = path.stat().st_size
        if total + size > FALLBACK_BUDGET:
            continue
        total += size
        out.append(str(path))
    return out


def _readahead(early: Early, manifest: Path, wants_cuda: bool) -> None:
    t0 = time.perf_counter()
    try:
        files: list[str] = []
        if manifest.is_file():
            files = [ln for ln in manifest.read_text().splitlines() if ln]
            early.manifest = str(manifest)
        elif wants_cuda:
            files = fallback_files()
        if not hasattr(os, "posix_fadvise"):
            return
        for path in files:
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue
            try:
                size = os.fstat(fd).st_size
                os.posix_fadvise(fd, 0, size, os.POSIX_FADV_WILLNEED)
                early.readahead_files += 1
                early.readahead_bytes += size
            except OSError:
                pass
            finally:
                os.close(fd)
    except Exception as exc:  # noqa: BLE001 - a hint only
        log.debug("library readahead skipped: %s", exc)
    finally:
        early.mark("readahead issued", t0)
        early.libraries_read.set()


AFTER_WAIT_S = 3.0  # the weights' readahead waits this long at most for the libraries' readahead


def prefetch_weights(
    source: Any, budget_fraction: float = 0.4, after: threading.Event | None = None
) -> threading.Thread | None:
    """Ask the kernel to start reading the weight files now (readahead), before torch is even
    imported, so a cold disk is busy from the first second. Budgeted to a share of free RAM so
    that the pages are still cached when the readers get to them. `after`: the libraries'
    readahead, which goes first (the imports wait on those small reads; the weights come
    later anyway), for at most AFTER_WAIT_S."""
    if not hasattr(os, "posix_fadvise"):
        return None
    try:
        import psutil

        budget = int(psutil.virtual_memory().available * budget_fraction)
    except Exception:  # noqa: BLE001
        budget = 8 << 30
    files = []
    for comp in ("text_encoder", "transformer", "vae"):  # the order the readers need them
        files += sorted((source.path / comp).glob("*.safetensors"))

    def run() -> None:
        if after is not None:
            after.wait(AFTER_WAIT_S)
        left = budget
        for path in files:
            if left <= 0:
                break
            try:
                size = path.stat().st_size
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, min(size, left), os.POSIX_FADV_WILLNEED)
                finally:
                    os.close(fd)
                left -= size
            except OSError:
                continue

    thread = threading.Thread(target=run, name="readahead", daemon=True)
    thread.start()
    return thread


# ------------------------------------------------------------------------------------------
# torch's CUDA library and the CUDA context, without the GIL


def _load_torch_cuda(early: Early) -> None:
    t0 = time.perf_counter()
    try:
        spec = importlib.util.find_spec("torch")
        if spec is None or not spec.submodule_search_locations:
            return
        lib = Path(next(iter(spec.submodule_search_locations))) / "lib" / "libtorch_cuda.so"
        if lib.is_file():
            # RTLD_LOCAL, as torch's own import loads it; only libraries that never call into
            # Python while loading (libtorch_python is left to the import)
            ctypes.CDLL(str(lib), mode=os.RTLD_LOCAL | os.RTLD_NOW)
            early.mark("libtorch_cuda mapped", t0)
    except OSError as exc:
        log.debug("torch CUDA library not preloaded: %s", exc)
    finally:
        early.torch_loaded.set()


def _cuda_context(early: Early, device: str) -> None:
    """cuInit and the primary context of the GPU we will use (when we know which one)."""
    t0 = time.perf_counter()
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
        if libcuda.cuInit(0) != 0:
            return
        count = ctypes.c_int(0)
        if libcuda.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value < 1:
            return
        if device.startswith("cuda:"):
            ordinal = int(device.split(":", 1)[1])
        elif count.value == 1:
            ordinal = 0
        else:  # several GPUs and the memory policy will choose: make no context on a guess
            early.mark("cuInit", t0)
            return
        dev = ctypes.c_int(0)
        ctx = ctypes.c_void_p()
        if libcuda.cuDeviceGet(ctypes.byref(dev), ordinal) == 0:
            # retained for the life of the process: torch's runtime uses this primary context
            if libcuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev) == 0:
                early.mark("CUDA context", t0)
    except (OSError, ValueError, AttributeError) as exc:
        log.debug("no early CUDA context: %s", exc)
    finally:
        early.context_ready.set()


def warm_cuda(device: Any) -> threading.Thread | None:
    """First calls of cuBLAS, cuDNN and the attention kernels on a side thread (torch imported)."""
    import torch

    dev = torch.device(device)
    if dev.type != "cuda":
        return None

    def run() -> None:
        t0 = time.perf_counter()
        try:
            with torch.no_grad():
                a = torch.randn(256, 256, device=dev, dtype=torch.bfloat16)
                (a @ a).float().sum().item()  # cuBLAS / cuBLASLt handles and workspace
                q = torch.randn(1, 4, 256, 128, device=dev, dtype=torch.bfloat16)
                torch.nn.functional.scaled_dot_product_attention(q, q, q)
                x = torch.randn(1, 16, 32, 32, device=dev, dtype=torch.bfloat16)
                w = torch.randn(16, 16, 3, 3, device=dev, dtype=torch.bfloat16)
                torch.nn.functional.conv2d(x, w, padding=1).sum().item()  # cuDNN
            early = _early
            if early is not None:
                early.mark("cuBLAS/cuDNN warmed", t0)
        except Exception as exc:  # noqa: BLE001 - a warm-up only
            log.debug("CUDA warm-up skipped: %s", exc)

    thread = threading.Thread(target=run, name="cuda-warm", daemon=True)
    thread.start()
    return thread
