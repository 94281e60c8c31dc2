"""How many replicas, on which devices: decided before the model loads (the page's concurrency
needs the number), from the settings and a look at the GPUs that creates no CUDA context.

- one GPU, or none, or `--replicas 1`: one replica in this process, exactly the single-GPU path;
- `--replicas auto` with two or more selected GPUs that each hold the whole model: one replica
  per such GPU, each in a child process (zimage.service.worker);
- `--replicas N`: N child processes on the first N selected GPUs (on a CPU-only box, N
  CPU replicas: how the tests cover routing and failure without a GPU).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from zimage.errors import SettingsError
from zimage.model.memory import GPUInfo, Hardware, parse_max_memory
from zimage.settings import parse_gpus

if TYPE_CHECKING:  # pragma: no cover
    from zimage.service.replicas import Replica
    from zimage.settings import Settings

log = logging.getLogger(__name__)

GiB = 1 << 30
# What one replica of Z-Image-Turbo needs on its GPU (weights 20.4 GiB in bfloat16 with the
# trimmed text encoder, plus the 1024px activation headroom) when the weights are not on disk
# yet to read the exact number from their headers.
DEFAULT_NEED = 24 * GiB


@dataclass(frozen=True)
class ReplicaPlan:
    devices: tuple[str, ...]  # one per replica: "cpu", "cuda", "cuda:3"
    processes: bool  # each replica in a child process of its own (several), or one in this process
    reason: str

    @property
    def size(self) -> int:
        return len(self.devices)

    def describe(self) -> str:
        where = "child processes" if self.processes else "this process"
        return f"{self.size} replica(s) in {where} on {', '.join(self.devices)} ({self.reason})"


def probe_gpus() -> Hardware:
    """The GPUs and their free memory as nvidia-smi reports them: no CUDA context is created in
    this process, so the web process of a replica pool leaves every GPU to its worker. Empty when
    nvidia-smi is missing (then the single in-process replica probes with torch as always)."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return Hardware()
    try:
        out = subprocess.run(
            [exe, "--query-gpu=index,name,memory.total,memory.free", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("nvidia-smi failed (%s); planning one replica", exc)
        return Hardware()
    gpus = []
    for line in out.strip().splitlines():
        index, name, total, free = (p.strip() for p in line.split(","))
        gpus.append(GPUInfo(int(index), name, int(float(total)) << 20, int(float(free)) << 20))
    visible = visible_devices()
    if visible is not None:  # CUDA's index i is the i-th visible device
        by_index = {str(g.index): g for g in gpus}
        gpus = [GPUInfo(i, by_index[v].name, by_index[v].total, by_index[v].free) for i, v in enumerate(visible)]
    return Hardware(tuple(gpus))


def visible_devices() -> list[str] | None:
    """CUDA_VISIBLE_DEVICES as a list of physical indices, None when unset (or not plain indices)."""
    text = os.environ.get("CUDA_VISIBLE_DEVICES")
    if text is None:
        return None
    parts = [p.strip() for p in text.split(",") if p.strip()]
    return parts if all(p.isdigit() for p in parts) else None


def replica_need(settings: Settings) -> tuple[int, str]:
    """Bytes one replica needs on its GPU in `gpu` mode, and where the number comes from."""
    from zimage.model.loading import ModelSource, footprint

    model = settings.model
    path = None
    if model == "tiny":
        from zimage.model.tiny import ensure_tiny

        path = ensure_tiny(settings.tiny_dir)
    elif os.path.isdir(os.path.expanduser(model)):
        path = os.path.expanduser(model)
    else:
        try:
            from huggingface_hub import snapshot_download

            path = snapshot_download(repo_id=model, revision=settings.revision, local_files_only=True)
        except Exception:  # noqa: BLE001 - not downloaded yet: the known size
            return DEFAULT_NEED, "Z-Image-Turbo's size (weights not downloaded yet)"
    from pathlib import Path

    fp = footprint(ModelSource(Path(path), model, "local"), settings.trim_text_encoder)
    return fp.total + fp.activations, "read from the weights' headers"


def plan_replicas(settings: Settings, hw: Hardware | None = None, need: int | None = None) -> ReplicaPlan:
    want = settings.replicas
    count = None if want == "auto" else int(want)
    if settings.device == "cpu":
        n = count or 1
        return ReplicaPlan(("cpu",) * n, n > 1, "device cpu")
    if settings.device.startswith("cuda:"):  # one GPU named
        if count not in (None, 1):
            raise SettingsError(f"Setting 'replicas' is {want} but device {settings.device} names one GPU; use --gpus.")
        return ReplicaPlan((settings.device,), False, f"device {settings.device}")
    if count == 1:
        return ReplicaPlan((_single_device(settings),), False, "replicas=1")
    hw = probe_gpus() if hw is None else hw
    selected = parse_gpus(settings.gpus)
    gpus = list(hw.gpus)
    if selected and gpus:
        known = {g.index for g in gpus}
        missing = [i for i in selected if i not in known]
        if missing:
            raise SettingsError(
                f"Setting 'gpus' names GPU {missing[0]}, which does not exist; "
                f"this machine has {', '.join(str(i) for i in sorted(known))}."
            )
        gpus = [g for g in gpus if g.index in selected]
    if count is not None:
        if len(gpus) < count:
            raise SettingsError(
                f"Setting 'replicas' is {count} but {len(gpus)} GPU(s) are available"
                f"{' in --gpus' if selected else ''}; one replica needs a GPU of its own."
            )
        return ReplicaPlan(tuple(f"cuda:{g.index}" for g in gpus[:count]), True, f"replicas={count}")
    if len(gpus) < 2 or settings.memory_mode == "multi-gpu":
        why = "memory_mode multi-gpu" if len(gpus) >= 2 else f"{len(gpus) or 'no'} GPU(s) seen"
        return ReplicaPlan((_single_device(settings),), False, why)
    if need is None:
        need, source = replica_need(settings)
    else:
        source = "given"
    fits = [g for g in gpus if g.free >= need]
    if len(fits) >= 2:
        return ReplicaPlan(
            tuple(f"cuda:{g.index}" for g in fits),
            True,
            f"the model ({need / GiB:.1f} GiB, {source}) fits on each of {len(fits)} GPUs",
        )
    return ReplicaPlan(
        (_single_device(settings),),
        False,
        f"the model ({need / GiB:.1f} GiB, {source}) fits on {len(fits)} of {len(gpus)} GPUs",
    )


def _single_device(settings: Settings) -> str:
    selected = parse_gpus(settings.gpus)
    if len(selected) == 1:
        return f"cuda:{selected[0]}"
    return settings.device


def build_replicas(settings: Settings, plan: ReplicaPlan, metrics: Any, timeline: Any, on_change: Any) -> list[Replica]:
    """The replicas a plan asks for. One in-process replica, or one child process per device."""
    from zimage.service.replicas import LocalReplica

    if not plan.processes:
        device = plan.devices[0]
        local_settings = settings if device == settings.device else settings.replace(device=device, gpus="")
        return [LocalReplica("gpu0" if device.startswith("cuda") else "cpu0", local_settings, metrics, timeline)]
    from zimage.service.worker import ProcessReplica

    visible = visible_devices()
    replicas: list[Replica] = []
    for i, device in enumerate(plan.devices):
        if device == "cpu":
            replicas.append(ProcessReplica(f"cpu{i}", settings.replace(replicas="1"), None, on_change))
            continue
        index = int(device.split(":", 1)[1])
        physical = visible[index] if visible is not None else str(index)
        caps = parse_max_memory(settings.gpu_max_memory)
        cap = f"0={caps[index]}" if index in caps else ""  # the child sees its GPU as cuda:0
        child = settings.replace(device="cuda:0", gpus="", replicas="1", gpu_max_memory=cap)
        replicas.append(ProcessReplica(f"gpu{index}", child, physical, on_change, device=device))
    return replicas
