"""The LoRA library: the files in lora_dir, their hashes, reading and checking each file against the
loaded transformer, and switching LoRAs on the one loaded pipeline (no reload, no second copy).

Two ways to switch, chosen by the lora_mode setting:

- adapters (compile off): diffusers' multi-adapter API. Each file is loaded once as its own named
  adapter (kept for the next jobs, the least recently used unloaded past lora_cache); each job calls
  set_adapters(names, weights), and a job without LoRAs runs with the adapters disabled.
- hotswap (compile on): one adapter slot, created with enable_lora_hotswap(target_rank=lora_max_rank)
  before the first compiled run and covering every Linear layer of the transformer. A job's LoRAs are
  merged into one low-rank update (A rows stacked with weight and alpha/rank folded in, B columns
  stacked: sum_i w_i s_i B_i A_i) and hot-swapped into the slot in place, so the compiled graphs stay
  valid: switching LoRAs recompiles nothing. Without LoRAs the slot holds zeros.

Every file is read and checked (safetensors, LoRA keys this transformer has, shapes, finite values)
before the model is touched, so a bad file is refused with its name and the reason, and the base
weights stay as they were.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zimage.errors import BadLora

log = logging.getLogger(__name__)

SLOT = "zimage_slot"  # the hotswap adapter's name
SUFFIX = ".safetensors"


@dataclass
class LoraWeights:
    """One file, read and checked: per layer (A, B, alpha/rank scale), in diffusers' key layout."""

    name: str
    path: Path
    sha256: str
    layers: dict[str, tuple[Any, Any, float]]
    metadata: dict[str, Any] | None
    ignored: int = 0  # keys for other components than the transformer

    @property
    def rank(self) -> int:
        return max((a.shape[0] for a, _b, _s in self.layers.values()), default=0)

    def state_dict(self) -> dict[str, Any]:
        out = {}
        for module, (a, b, _s) in self.layers.items():
            out[f"transformer.{module}.lora_A.weight"] = a
            out[f"transformer.{module}.lora_B.weight"] = b
        return out


@dataclass
class Applied:
    """What a job ran with: for the metadata, the page and the log."""

    loras: list[dict[str, Any]] = field(default_factory=list)  # name, weight, sha256
    notes: list[str] = field(default_factory=list)


class LoraLibrary:
    def __init__(self, folder: str | Path, mode: str = "auto", max_rank: int = 64, cache: int = 8):
        self.folder = Path(folder).expanduser()
        self.requested_mode = mode
        self.max_rank = max_rank
        self.cache_size = cache
        self.mode = "adapters" if mode == "auto" else mode  # attach() settles auto
        self.extra: dict[str, Path] = {}  # files outside the folder (settings.lora_files)
        self._hashes: dict[tuple[str, int, int], str] = {}
        self._read: OrderedDict[tuple[str, int, int, bool], LoraWeights] = OrderedDict()
        self._lock = threading.Lock()
        self._layers: dict[str, tuple[int, int]] | None = None  # Linear layers: name -> (in, out)
        self._pipe: Any = None
        self._loaded: OrderedDict[str, str] = OrderedDict()  # adapters mode: adapter name -> sha256
        self._slot = False
        self._slot_key: tuple = ()
        self._compiled = False

    @property
    def attached(self) -> bool:
        return self._pipe is not None

    @classmethod
    def from_settings(cls, s: Any) -> LoraLibrary:
        library = cls(s.lora_dir, s.lora_mode, s.lora_max_rank, s.lora_cache)
        for path in s.lora_files:  # every replica's library knows them, in any process
            library.add_file(path)
        return library

    # --- the files -------------------------------------------------------------------------

    def names(self) -> list[str]:
        """The LoRA files one may pick: the folder's .safetensors files (and command-line ones)."""
        found = set(self.extra)
        if self.folder.is_dir():
            found.update(p.name for p in self.folder.iterdir() if p.suffix == SUFFIX and p.is_file())
        return sorted(found, key=str.lower)

    def add_file(self, path: str | Path) -> str:
        """Make a file outside the folder usable by its file name (the CLI's --lora FILE)."""
        p = Path(path).expanduser()
        if not p.is_file():
            raise BadLora(str(path), "the file does not exist.")
        self.extra[p.name] = p.resolve()
        return p.name

    def resolve(self, name: str) -> Path:
        if name in self.extra:
            return self.extra[name]
        if "/" in name or "\\" in name or name.startswith("."):
            raise BadLora(name, "give a file name from the LoRA folder, without folders.")
        for candidate in (name, name + SUFFIX):
            path = self.folder / candidate
            if path.is_file():
                return path
        listed = ", ".join(self.names()[:8]) or "none"
        raise BadLora(name, f"there is no such file in {self.folder} (files there: {listed}).")

    def sha256(self, path: Path) -> str:
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
        if key not in self._hashes:
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 22), b""):
                    h.update(chunk)
            self._hashes[key] = h.hexdigest()
        return self._hashes[key]

    def find_hash(self, sha256: str) -> str | None:
        """The name of a file in the library with this content, if any."""
        for name in self.names():
            try:
                if self.sha256(self.resolve(name)) == sha256:
                    return name
            except (OSError, BadLora):
                continue
        return None

    def restore(self, entries: Any) -> tuple[list[tuple[str, float]], list[str]]:
        """LoRAs recorded in a PNG's metadata -> those present here (by name, else by hash), with notes."""
        found: list[tuple[str, float]] = []
        notes: list[str] = []
        for entry in entries or []:
            if not isinstance(entry, dict) or "name" not in entry:
                continue
            name, weight, sha = str(entry["name"]), float(entry.get("weight", 1.0)), entry.get("sha256")
            try:
                here = self.resolve(name)
                if sha and self.sha256(here) != sha:
                    notes.append(f"LoRA {name!r} is here but its file changed since (hash differs); restored anyway.")
                found.append((name, weight))
            except (BadLora, OSError):
                other = self.find_hash(sha) if sha else None
                if other:
                    found.append((other, weight))
                    notes.append(f"LoRA {name!r} restored as {other!r} (same file).")
                else:
                    notes.append(f"LoRA {name!r} (weight {weight:g}) is not in {self.folder}; left out.")
        return found, notes

    # --- reading and checking --------------------------------------------------------------

    def read(self, name: str) -> LoraWeights:
        """Read and check one file (cached by path, size and modification time)."""
        path = self.resolve(name)
        st = path.stat()
        # checked against the model's layers or not yet (a request may arrive while the model loads)
        key = (str(path), st.st_size, st.st_mtime_ns, self._layers is not None)
        with self._lock:
            if key in self._read:
                self._read.move_to_end(key)
                return self._read[key]
        weights = self._load_file(name, path)
        with self._lock:
            self._read[key] = weights
            while len(self._read) > self.cache_size:
                self._read.popitem(last=False)
        return weights

    def check(self, loras: tuple[tuple[str, float], ...]) -> None:
        """Read and check a request's LoRAs before it waits for the GPU (refuses with BadLora)."""
        for name, _weight in loras:
            self.read(name)

    def _load_file(self, name: str, path: Path) -> LoraWeights:
        import torch
        from diffusers import ZImagePipeline
        from safetensors import safe_open

        if path.suffix != SUFFIX:
            raise BadLora(name, f"only {SUFFIX} files are read (pickled .ckpt/.pt files can run code).")
        try:
            with safe_open(str(path), framework="pt") as f:
                f.keys()
        except Exception as exc:  # noqa: BLE001 - any parse failure: the file is not safetensors
            raise BadLora(name, f"it is not a readable safetensors file ({_short(exc)}).") from None
        try:
            sd, metadata = ZImagePipeline.lora_state_dict(
                str(path.parent), weight_name=path.name, return_lora_metadata=True, local_files_only=True
            )
        except Exception as exc:  # noqa: BLE001 - diffusers' converters raise anything on odd keys
            raise BadLora(name, f"its keys are not a LoRA layout diffusers can read ({_short(exc)}).") from None
        if any(".lokr_" in k for k in sd):
            raise BadLora(name, "it is a LoKr adapter; zimage loads LoRA adapters only.")
        ignored = [k for k in sd if not k.startswith("transformer.")]
        pairs: dict[str, dict[str, Any]] = {}
        for key, value in sd.items():
            if not key.startswith("transformer."):
                continue
            module, _, kind = key[len("transformer.") :].rpartition(".lora_")
            if kind not in ("A.weight", "B.weight"):
                raise BadLora(name, f"key {key!r} is not a LoRA weight (lora_A/lora_B); other layouts are not read.")
            pairs.setdefault(module, {})[kind[0]] = value
        if not pairs:
            raise BadLora(name, "it holds no LoRA weights for the Z-Image transformer.")
        own = {k[len("transformer.") :]: v for k, v in (metadata or {}).items() if k.startswith("transformer.")}
        scales = _scales(own, list(pairs))
        layers: dict[str, tuple[Any, Any, float]] = {}
        table = self._layers
        for module, ab in pairs.items():
            if set(ab) != {"A", "B"}:
                raise BadLora(name, f"layer {module!r} has lora_{'A' if 'A' in ab else 'B'} without its partner.")
            a, b = ab["A"], ab["B"]
            if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
                raise BadLora(
                    name, f"layer {module!r} has shapes {tuple(a.shape)} and {tuple(b.shape)}, not a LoRA pair."
                )
            if table is not None:
                if module not in table:
                    raise BadLora(
                        name,
                        f"it targets layer {module!r}, which this model does not have (made for another model?).",
                    )
                fan_in, fan_out = table[module]
                if a.shape[1] != fan_in or b.shape[0] != fan_out:
                    raise BadLora(
                        name,
                        f"layer {module!r} is {fan_in}->{fan_out} here but the LoRA's is "
                        f"{a.shape[1]}->{b.shape[0]} (made for another model size?).",
                    )
            if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
                raise BadLora(name, f"layer {module!r} holds NaN or infinite values.")
            layers[module] = (a, b, scales.get(module, 1.0))
        sha = self.sha256(path)
        return LoraWeights(name, path, sha, layers, metadata, len(ignored))

    # --- the loaded pipeline ---------------------------------------------------------------

    def attach(self, pipe: Any, compiled: bool) -> list[str]:
        """Remember the pipeline and its layers; in hotswap mode with LoRA files present, create the
        slot now, before the first compiled run, so no later switch recompiles. Returns notes."""
        self._pipe = pipe
        self._compiled = compiled
        if self.requested_mode == "auto":
            self.mode = "hotswap" if compiled else "adapters"
        self._layers = linear_layers(pipe.transformer)
        if self.mode == "hotswap" and self.names():
            self._create_slot()
            return [f"LoRA hotswap slot of rank {self.max_rank} ready (switching LoRAs recompiles nothing)"]
        return [f"LoRAs: {self.mode} mode"]

    def _create_slot(self) -> None:
        import torch

        pipe = self._pipe
        dtype = pipe.transformer.dtype
        r = self.max_rank
        zeros = {}
        for module, (fan_in, fan_out) in self._layers.items():
            zeros[f"transformer.{module}.lora_A.weight"] = torch.zeros(r, fan_in, dtype=dtype)
            zeros[f"transformer.{module}.lora_B.weight"] = torch.zeros(fan_out, r, dtype=dtype)
        pipe.enable_lora_hotswap(target_rank=r, check_compiled="warn")
        pipe.load_lora_into_transformer(zeros, transformer=pipe.transformer, adapter_name=SLOT, _pipeline=pipe)
        self._slot = True
        self._slot_key = ()

    def apply(self, loras: tuple[tuple[str, float], ...]) -> Applied:
        """Put this job's LoRAs in effect on the pipeline (weight 0 = left out)."""
        applied = Applied()
        chosen = []
        for name, weight in loras:
            lw = self.read(name)
            applied.loras.append({"name": name, "weight": weight, "sha256": lw.sha256})
            if lw.ignored:
                applied.notes.append(f"LoRA {name!r}: {lw.ignored} keys for other parts than the transformer ignored.")
            if weight != 0:
                chosen.append((lw, weight))
        if self.mode == "hotswap":
            self._apply_hotswap(chosen, applied)
        else:
            self._apply_adapters(chosen)
        return applied

    def _apply_adapters(self, chosen: list[tuple[LoraWeights, float]]) -> None:
        pipe = self._pipe
        names = []
        for lw, _w in chosen:
            adapter = "z" + lw.sha256[:16]
            if adapter in self._loaded:
                self._loaded.move_to_end(adapter)
            else:
                self._evict(keep={"z" + x.sha256[:16] for x, _ in chosen})
                with warnings.catch_warnings():  # several adapters at once is the point here
                    warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                    pipe.load_lora_into_transformer(
                        lw.state_dict(),
                        transformer=pipe.transformer,
                        adapter_name=adapter,
                        metadata=_peft_metadata(lw),
                        _pipeline=pipe,
                    )
                self._loaded[adapter] = lw.sha256
            names.append(adapter)
        if names:
            pipe.enable_lora()
            pipe.set_adapters(names, [w for _lw, w in chosen])
        elif self._loaded:
            pipe.disable_lora()

    def _evict(self, keep: set[str]) -> None:
        while len(self._loaded) >= self.cache_size:
            old = next((a for a in self._loaded if a not in keep), None)
            if old is None:
                return
            self._loaded.pop(old)
            self._pipe.delete_adapters([old])
            _reapply_group_offloading(self._pipe.transformer)

    def _apply_hotswap(self, chosen: list[tuple[LoraWeights, float]], applied: Applied) -> None:
        import torch

        key = tuple((lw.sha256, w) for lw, w in chosen)
        if key == self._slot_key:
            return
        if not self._slot:
            if not chosen:
                return
            self._create_slot()
            if self._compiled:
                applied.notes.append(
                    "First LoRA since start: the transformer recompiled once for the LoRA slot; later switches do not."
                )
        merged: dict[str, list[tuple[Any, Any]]] = {}
        for lw, weight in chosen:
            for module, (a, b, scale) in lw.layers.items():
                merged.setdefault(module, []).append((a.float() * (weight * scale), b.float()))
        # One rank for every layer (zero-padded): mixed ranks would give the swapped-in config a rank
        # pattern, and peft refuses to hot-swap configs whose alpha patterns differ from the slot's.
        rank = max((sum(a.shape[0] for a, _b in parts) for parts in merged.values()), default=0)
        if rank > self.max_rank:
            names = " + ".join(f"{lw.name} (rank {lw.rank})" for lw, _ in chosen)
            raise BadLora(
                ", ".join(lw.name for lw, _ in chosen),
                f"{names} need rank {rank} together, more than the LoRA slot holds "
                f"(lora_max_rank={self.max_rank}); use fewer LoRAs or raise lora_max_rank.",
            )
        state = {}
        for module, parts in merged.items():
            fan_in, fan_out = self._layers[module]
            a_all = torch.zeros(rank, fan_in)
            b_all = torch.zeros(fan_out, rank)
            row = 0
            for a, b in parts:
                a_all[row : row + a.shape[0]] = a
                b_all[:, row : row + a.shape[0]] = b
                row += a.shape[0]
            state[f"transformer.{module}.lora_A.weight"] = a_all
            state[f"transformer.{module}.lora_B.weight"] = b_all
        transformer = self._pipe.transformer
        if state:
            self._pipe.load_lora_into_transformer(
                state, transformer=transformer, adapter_name=SLOT, _pipeline=self._pipe, hotswap=True
            )
        else:
            with torch.no_grad():
                for name, p in transformer.named_parameters():
                    if f".{SLOT}." in name and ".lora_" in name:
                        p.zero_()
        self._slot_key = key


def compiled(settings: Any, model: Any) -> bool:
    """Whether this loaded model's transformer blocks are compiled (hotswap is then the default)."""
    import torch

    from zimage.model.speed import compile_mode

    return compile_mode(settings, torch.device(model.device).type, model.plan.mode) != "off"


def linear_layers(transformer: Any) -> dict[str, tuple[int, int]]:
    """The transformer's Linear layers a LoRA may target: name -> (in, out), LoRA wrappers seen through."""
    import torch
    from peft.tuners.tuners_utils import BaseTunerLayer

    out = {}
    for name, m in transformer.named_modules():
        if isinstance(m, BaseTunerLayer):
            base = m.get_base_layer()
            if isinstance(base, torch.nn.Linear):
                out[name] = (base.in_features, base.out_features)
        elif isinstance(m, torch.nn.Linear) and ".lora_" not in name and not name.endswith(".base_layer"):
            out[name] = (m.in_features, m.out_features)
    return out


def _scales(metadata: dict[str, Any] | None, modules: list[str]) -> dict[str, float]:
    """alpha/rank per layer from a peft adapter config in the file's metadata (none: 1, as diffusers)."""
    if not metadata or "r" not in metadata:
        return {}
    import math

    r, alpha = metadata.get("r") or 1, metadata.get("lora_alpha") or metadata.get("r") or 1
    rank_pattern, alpha_pattern = metadata.get("rank_pattern") or {}, metadata.get("alpha_pattern") or {}
    out = {}
    for module in modules:
        rr = next((v for k, v in rank_pattern.items() if module.endswith(k.lstrip("^"))), r)
        aa = next((v for k, v in alpha_pattern.items() if module.endswith(k.lstrip("^"))), alpha)
        out[module] = aa / math.sqrt(rr) if metadata.get("use_rslora") else aa / rr
    return out


def _peft_metadata(lw: LoraWeights) -> dict[str, Any] | None:
    """The file's adapter config (its alphas) for diffusers' loader; None: the loader infers it."""
    return lw.metadata if lw.metadata and "transformer.r" in lw.metadata else None


def _reapply_group_offloading(module: Any) -> None:
    """Streaming modes: the group-offload hooks hold references to the layers' tensors; renew them."""
    from diffusers.hooks.group_offloading import _maybe_remove_and_reapply_group_offloading

    _maybe_remove_and_reapply_group_offloading(module)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:160]
