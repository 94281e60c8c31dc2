"""Finding the model and building the pipeline once, each component placed where the memory plan says."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zimage.errors import ModelNotFound
from zimage.settings import DEFAULT_MODEL, Settings

log = logging.getLogger(__name__)

COMPONENTS = ("text_encoder", "transformer", "vae")
HUB_PATTERNS = [
    "model_index.json",
    "*/config.json",
    "*/*.safetensors",
    "*/*.safetensors.index.json",
    "scheduler/*",
    "tokenizer/*",
]


@dataclass(frozen=True)
class ModelSource:
    path: Path
    name: str  # what the user asked for: repo id, folder or "tiny"
    kind: str  # "hub", "local", "tiny"


def _advice() -> str:
    return (
        "Set ZIMAGE_MODEL (or --model) to a local folder holding the model in the diffusers "
        "layout (a downloaded snapshot of Tongyi-MAI/Z-Image-Turbo), run once with network "
        "access so it can be downloaded into the Hugging Face cache, or use --model tiny for "
        "the offline demo."
    )


def resolve_model(settings: Settings) -> ModelSource:
    """Where the model's files are: the tiny model (built on first use), a folder, or the hub cache."""
    model = settings.model
    if model == "tiny":
        from zimage.model.tiny import ensure_tiny

        return ModelSource(ensure_tiny(settings.tiny_dir), "tiny", "tiny")

    path = Path(model).expanduser()
    looks_like_path = model.startswith((".", "/", "~")) or os.sep in model.strip("/").split("/", 1)[-1]
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelNotFound(
                f"Folder {path} has no model_index.json, so it is not a model in the diffusers layout. " + _advice()
            )
        return ModelSource(path.resolve(), model, "local")
    if looks_like_path or path.exists():
        raise ModelNotFound(f"Model folder {path} does not exist. " + _advice())

    from huggingface_hub import constants, snapshot_download

    try:
        snapshot = snapshot_download(
            repo_id=model,
            revision=settings.revision,
            allow_patterns=HUB_PATTERNS,
        )
    except Exception as exc:  # noqa: BLE001 - every hub failure becomes one clear message
        offline = " (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else ""
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelNotFound(
            f"Model '{model}' is not in the Hugging Face cache at {constants.HF_HUB_CACHE} and could not "
            f"be downloaded{offline}: {reason[:300]}. " + _advice()
        ) from None
    path = Path(snapshot)
    if not (path / "model_index.json").is_file():
        raise ModelNotFound(f"The cached snapshot {path} of '{model}' has no model_index.json. " + _advice())
    return ModelSource(path, model, "hub")


def read_model_index(folder: Path) -> dict[str, Any]:
    index = json.loads((folder / "model_index.json").read_text())
    if index.get("_class_name") != "ZImagePipeline":
        raise ModelNotFound(
            f"{folder} holds a {index.get('_class_name')}, not a ZImagePipeline. zimage runs Z-Image models only."
        )
    return index


# ------------------------------------------------------------------------------------------
# sizes, known before anything is loaded


def footprint(source: ModelSource, trim_text_encoder: bool = True):
    """Bytes per component (read from the safetensors headers), for the memory policy."""
    from zimage.model.memory import Footprint
    from zimage.model.weights import index_folder

    sizes: dict[str, int] = {}
    block = layer = 0
    for comp in COMPONENTS:
        entries = index_folder(source.path / comp)
        if comp == "text_encoder":
            entries = _text_encoder_entries(entries, source.path / comp, trim_text_encoder)
            per_layer: dict[str, int] = {}
            for k, e in entries.items():
                if k.startswith("layers."):
                    per_layer[k.split(".")[1]] = per_layer.get(k.split(".")[1], 0) + e.nbytes
            layer = max(per_layer.values(), default=0)
        if comp == "transformer":
            per_block: dict[str, int] = {}
            for k, e in entries.items():
                if k.startswith("layers."):
                    per_block[k.split(".")[1]] = per_block.get(k.split(".")[1], 0) + e.nbytes
            block = max(per_block.values(), default=0)
        sizes[comp] = sum(e.nbytes for e in entries.values())
    # Activation headroom scales with the model width; the real model needs about 3 GiB at 1024px.
    big = sizes["transformer"] > 1 << 30
    activations = int(3.0 * (1 << 30)) if big else 64 << 20
    return Footprint(
        sizes["transformer"],
        sizes["text_encoder"],
        sizes["vae"],
        activations=activations,
        transformer_block=block,
        text_layer=layer,
    )


def _text_encoder_num_layers(folder: Path) -> int:
    return int(json.loads((folder / "config.json").read_text())["num_hidden_layers"])


def _text_encoder_entries(entries: dict, folder: Path, trim: bool) -> dict:
    """Checkpoint keys -> Qwen3Model keys; without the last layer and norm when trimming."""
    out = {}
    last = _text_encoder_num_layers(folder) - 1
    for name, e in entries.items():
        key = name[len("model.") :] if name.startswith("model.") else name
        if key.startswith("lm_head."):
            continue
        if trim and (key.startswith(f"layers.{last}.") or key.startswith("norm.")):
            continue
        out[key] = e
    return out


# ------------------------------------------------------------------------------------------
# building components


def _component_class(index: dict[str, Any], comp: str):
    from zimage.model.imports import import_class

    library, class_name = index[comp]
    return import_class(library, class_name)


def _empty_component(cls, folder: Path):
    from accelerate import init_empty_weights

    if hasattr(cls, "load_config"):  # diffusers model
        config = cls.load_config(folder)
        with init_empty_weights():
            return cls.from_config(config)
    config_class = getattr(cls, "config_class", None)
    if config_class is None:  # not a transformers PreTrainedModel we know: ask the auto mapping
        from transformers import AutoConfig

        config_class = AutoConfig
    config = config_class.from_pretrained(folder)
    with init_empty_weights():
        return cls(config)


def load_tokenizer(folder: Path):
    """The tokenizer class its tokenizer_config.json names, from its own module when known."""
    from zimage.model.imports import MODULES, import_class

    try:
        name = json.loads((folder / "tokenizer_config.json").read_text()).get("tokenizer_class")
    except (OSError, ValueError):
        name = None
    if name and ("transformers", name) in MODULES:
        return import_class("transformers", name).from_pretrained(folder)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def trim_text_encoder(module) -> None:
    """Drop the last decoder layer and the final norm: the pipeline reads hidden_states[-2],
    which is exactly the output of the layer before them, so the embeddings do not change."""
    import torch

    del module.layers[-1]
    module.config.num_hidden_layers = len(module.layers)
    module.norm = torch.nn.Identity()
    module._zimage_trimmed = True


def _finish(module, dtype, device):
    import torch

    module.eval()
    module.requires_grad_(False)
    # buffers made at construction (e.g. rotary inv_freq) still sit on the CPU
    for mod in module.modules():
        for name, buf in list(mod._buffers.items()):
            if buf is not None and buf.device != torch.device(device) and device != "cpu":
                mod._buffers[name] = buf.to(device)
    return module


def _pinned_like(entries: dict, dtype) -> dict:
    """One pinned host buffer carved into 64-byte aligned tensors (no per-tensor rounding waste)."""
    import torch

    offsets, total = {}, 0
    for name, e in entries.items():
        n = e.nbytes if dtype in (None, e.dtype) else _numel(e.shape) * torch.empty((), dtype=dtype).element_size()
        total = (total + 63) // 64 * 64
        offsets[name] = (total, n)
        total += n
    buf = torch.empty(max(total, 1), dtype=torch.uint8, pin_memory=True)
    out = {}
    for name, e in entries.items():
        off, n = offsets[name]
        out[name] = buf[off : off + n].view(dtype or e.dtype).view(e.shape)
    return out


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


@dataclass
class LoadOptions:
    dtype: Any  # torch.dtype
    loader: str = "fast"
    threads: int = 8
    staging_mb: int = 64
    pinned: bool = True
    streams: bool = True
    mmap: bool = False
    parallel: bool = True
    trim: bool = True

    @classmethod
    def from_settings(cls, s: Settings, dtype) -> LoadOptions:
        return cls(
            dtype=dtype,
            loader=s.loader,
            threads=s.load_threads if s.parallel_loading else 1,
            staging_mb=s.staging_mb,
            pinned=s.async_transfer,
            streams=s.async_transfer,
            mmap=s.mmap,
            parallel=s.parallel_loading,
            trim=s.trim_text_encoder,
        )


class WeightLoad:
    """A model's weights being read in the background, straight to where the plan puts them.

    It needs only torch and the safetensors headers, so it starts before diffusers and
    transformers are imported: the imports and the disk overlap.
    """

    def __init__(
        self,
        source: ModelSource,
        placement: dict[str, str],
        opts: LoadOptions,
        progress: Callable[[str, float], None] | None = None,
        pin_offloaded: bool = False,
    ):
        from zimage.model.weights import index_folder

        self.source = source
        self.placement = placement
        self.opts = opts
        self.progress = progress
        self.pin_offloaded = pin_offloaded
        self.entries: dict[str, dict] = {}
        for comp in COMPONENTS:
            comp_entries = index_folder(source.path / comp)
            if comp == "text_encoder":
                comp_entries = _text_encoder_entries(comp_entries, source.path / comp, opts.trim)
            self.entries[comp] = comp_entries
        self.total = sum(e.nbytes for es in self.entries.values() for e in es.values())
        self.started = 0.0
        self.finished = 0.0
        self._done_by: dict[str, int] = {}
        self._states: dict[str, dict] | None = None
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> WeightLoad:
        self.started = time.perf_counter()
        self._thread = threading.Thread(target=self._run, name="weights", daemon=True)
        self._thread.start()
        return self

    def wait(self) -> dict[str, dict]:
        """component -> {key: tensor}; raises what the readers met."""
        if self._thread is None:
            self.start()
        assert self._thread is not None
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._states is not None
        return self._states

    @property
    def seconds(self) -> float:
        return max(0.0, self.finished - self.started)

    def _on_progress(self, comp: str):
        def cb(done: int, _total: int) -> None:
            self._done_by[comp] = done
            if self.progress:
                self.progress("weights", sum(self._done_by.values()) / max(self.total, 1))

        return cb

    def _read(self, comp: str) -> dict:
        import torch

        from zimage.model.weights import WeightReader

        opts = self.opts
        dev = self.placement[comp]
        comp_entries = self.entries[comp]
        gpu_exec = any(d.startswith("cuda") for d in self.placement.values())
        if dev == "cpu" and self.pin_offloaded and gpu_exec and torch.cuda.is_available():
            # streamed later: pinned host memory, so every onload is a DMA copy
            dest = _pinned_like(comp_entries, None)
            reader = WeightReader("cpu", opts.threads, opts.staging_mb << 20, False, False, opts.mmap)
            reader.progress = self._on_progress(comp)
            return reader.read_into(comp_entries, dest)
        reader = WeightReader(dev, opts.threads, opts.staging_mb << 20, opts.pinned, opts.streams, opts.mmap)
        reader.progress = self._on_progress(comp)
        tensors = reader.read(comp_entries.values())
        return {k: tensors[e.name] for k, e in comp_entries.items()}

    def _run(self) -> None:
        try:
            # The text encoder runs first, so it is read first; one component's readers already
            # keep the disk busy with many requests in flight.
            order = ("text_encoder", "transformer", "vae")
            if self.opts.parallel:
                from concurrent.futures import ThreadPoolExecutor

                with ThreadPoolExecutor(max_workers=len(order), thread_name_prefix="load") as pool:
                    futures = {comp: pool.submit(self._read, comp) for comp in order}
                    self._states = {comp: f.result() for comp, f in futures.items()}
            else:
                self._states = {comp: self._read(comp) for comp in order}
        except BaseException as exc:  # noqa: BLE001 - re-raised by wait()
            self._error = exc
        finally:
            self.finished = time.perf_counter()


def load_components(
    source: ModelSource,
    placement: dict[str, str],
    opts: LoadOptions,
    progress: Callable[[str, float], None] | None = None,
    pin_offloaded: bool = False,
    pending: WeightLoad | None = None,
    marks: dict[str, float] | None = None,
) -> dict[str, Any]:
    """transformer, text_encoder, vae, tokenizer, scheduler: weights where `placement` says.

    Components placed on "cpu" while a GPU exists are to be streamed or offloaded; with
    pin_offloaded their weights land in pinned host memory so that copies run at DMA speed.
    `pending` is a WeightLoad already started (to overlap reading with imports). `marks` gets
    the seconds of each step (tokenizer, empty modules, waiting for the reads, assigning).
    """
    marks = {} if marks is None else marks
    t = time.perf_counter()
    index = read_model_index(source.path)
    import torch

    folder = source.path
    tokenizer = load_tokenizer(folder / "tokenizer")
    scheduler = _component_class(index, "scheduler").from_pretrained(folder / "scheduler")
    marks["tokenizer+scheduler"] = time.perf_counter() - t
    modules: dict[str, Any] = {}

    if opts.loader == "fast":
        try:
            pending = pending or WeightLoad(source, placement, opts, progress, pin_offloaded).start()
            modules = _assemble_fast(index, folder, pending, placement, opts, marks)
        except Exception as exc:  # noqa: BLE001 - fall back to the library loader, loudly
            log.warning("fast loader failed (%s: %s); falling back to from_pretrained", type(exc).__name__, exc)
            modules = {}
    if not modules:
        for comp in COMPONENTS:
            cls = _component_class(index, comp)
            dev = placement[comp]
            kwargs: dict[str, Any] = {"dtype": opts.dtype}
            if dev != "cpu":
                kwargs["device_map"] = dev
            m = cls.from_pretrained(folder / comp, **kwargs)
            if comp == "text_encoder" and opts.trim:
                trim_text_encoder(m)
            modules[comp] = _finish(m, opts.dtype, dev)
            if progress:
                progress(comp, 1.0)
        if pin_offloaded and torch.cuda.is_available():
            for comp, dev in placement.items():
                if dev == "cpu":
                    for p in modules[comp].parameters():
                        p.data = p.data.pin_memory()
    modules["tokenizer"] = tokenizer
    modules["scheduler"] = scheduler
    return modules


def _assemble_fast(
    index, folder: Path, pending: WeightLoad, placement, opts: LoadOptions, marks: dict[str, float]
) -> dict[str, Any]:
    """Build each component empty (meta weights) while the reads run, then hand it the tensors."""
    t = time.perf_counter()
    empties: dict[str, Any] = {}
    for comp in COMPONENTS:
        module = _empty_component(_component_class(index, comp), folder / comp)
        if comp == "text_encoder" and opts.trim:
            trim_text_encoder(module)
        empties[comp] = module
    marks["empty modules"] = time.perf_counter() - t
    t = time.perf_counter()
    states = dict(pending.wait())
    marks["wait for reads"] = time.perf_counter() - t
    t = time.perf_counter()
    out = {}
    for comp in COMPONENTS:
        module = empties[comp]
        state = states.pop(comp)
        state = {
            k: (v if v.dtype == opts.dtype or not v.is_floating_point() else v.to(opts.dtype)) for k, v in state.items()
        }
        missing, unexpected = module.load_state_dict(state, strict=False, assign=True)
        # non-persistent buffers are never in a checkpoint
        persistent_missing = [k for k in missing if k in dict(module.named_parameters())]
        if persistent_missing or unexpected:
            raise RuntimeError(
                f"{comp}: checkpoint does not match the model "
                f"(missing {persistent_missing[:3]}, unexpected {unexpected[:3]})"
            )
        out[comp] = _finish(module, opts.dtype, placement[comp])
    marks["assign"] = time.perf_counter() - t
    return out


def assemble(modules: dict[str, Any]):
    from zimage.model.imports import import_class

    ZImagePipeline = import_class("diffusers", "ZImagePipeline")  # noqa: N806 - a class

    pipe = ZImagePipeline(
        scheduler=modules["scheduler"],
        vae=modules["vae"],
        text_encoder=modules["text_encoder"],
        tokenizer=modules["tokenizer"],
        transformer=modules["transformer"],
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


__all__ = [
    "COMPONENTS",
    "DEFAULT_MODEL",
    "LoadOptions",
    "ModelNotFound",
    "WeightLoad",
    "ModelSource",
    "assemble",
    "footprint",
    "load_components",
    "resolve_model",
]
