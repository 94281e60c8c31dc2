"""Reading safetensors shards straight into device tensors.

The seed article's four layers, measured and kept where they pay:
- parallel reads: several threads read large byte ranges of the shards at once;
- pinned staging: on GPU each thread reads into page-locked host buffers, so the copy to the
  GPU runs at DMA speed (pageable memory copies several times slower);
- async transfer: each thread issues its copies on its own CUDA stream and reads the next
  range while the previous copy runs (two staging buffers per thread);
- mmap: optional, safetensors' own memory-mapped reader, for hosts short of RAM.

The safetensors format is simple enough that we parse its header ourselves: 8 bytes of
header length, a JSON header of name -> dtype, shape, byte offsets, then the raw data.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import struct
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

DTYPES = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class TensorEntry:
    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: Path) -> list[TensorEntry]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    base = 8 + n
    out = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = DTYPES.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"{path.name}: tensor {name} has unsupported dtype {info['dtype']}")
        s, e = info["data_offsets"]
        out.append(TensorEntry(name, path, dtype, tuple(info["shape"]), base + s, base + e))
    return out


def component_files(folder: Path) -> list[Path]:
    """The safetensors files of one component folder (sharded or single)."""
    files = sorted(p for p in folder.glob("*.safetensors") if not p.name.startswith("."))
    if not files:
        raise FileNotFoundError(f"No .safetensors weights in {folder}")
    return files


def index_folder(folder: Path) -> dict[str, TensorEntry]:
    entries: dict[str, TensorEntry] = {}
    for path in component_files(folder):
        for e in read_header(path):
            entries[e.name] = e
    return entries


@dataclass
class _Target:
    entry: TensorEntry
    dest: torch.Tensor  # raw bytes of the destination (stored dtype), flat uint8 view


@dataclass
class _Chunk:
    file: Path
    start: int
    end: int
    parts: list[tuple[_Target, int, int]]  # (target, offset in target, offset in chunk); length derived


class WeightReader:
    """Reads many tensors from safetensors files into preallocated device tensors."""

    def __init__(
        self,
        device: torch.device,
        threads: int = 8,
        staging_bytes: int = 64 << 20,
        pinned: bool = True,
        streams: bool = True,
        use_mmap: bool = False,
        progress: Callable[[int, int], None] | None = None,
    ):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.threads = max(1, threads)
        self.staging_bytes = staging_bytes
        self.pinned = pinned and self.cuda
        self.streams = streams and self.cuda
        self.use_mmap = use_mmap
        self.progress = progress
        self._done_bytes = 0
        self._total_bytes = 0
        self._lock = threading.Lock()

    # -- public --------------------------------------------------------------------------
    def read(
        self,
        entries: Iterable[TensorEntry],
        devices: dict[str, torch.device] | None = None,
    ) -> dict[str, torch.Tensor]:
        """name -> new tensor on its device (stored dtype). Returns when every copy has landed."""
        by_name = {e.name: e for e in entries}
        devices = devices or {}
        out = {
            name: torch.empty(e.shape, dtype=e.dtype, device=torch.device(devices.get(name, self.device)))
            for name, e in by_name.items()
        }
        self._fill(by_name, out)
        return out

    def read_into(self, entries: dict[str, TensorEntry], dest: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Fill preallocated tensors (same keys as entries, stored dtype and shape)."""
        self._fill(entries, dest)
        return dest

    def _fill(self, entries: dict[str, TensorEntry], dest: dict[str, torch.Tensor]) -> None:
        targets = []
        for key, e in entries.items():
            t = dest[key]
            if t.dtype != e.dtype or tuple(t.shape) != e.shape:
                raise ValueError(f"{e.name}: destination {t.dtype}{tuple(t.shape)} != stored {e.dtype}{e.shape}")
            if e.nbytes:
                targets.append(_Target(e, t.reshape(-1).view(torch.uint8)))
        self._total_bytes = sum(t.entry.nbytes for t in targets)
        if self.use_mmap:
            self._read_mmap(targets)
        else:
            self._read_chunks(targets)

    # -- implementations -----------------------------------------------------------------
    def _read_mmap(self, targets: list[_Target]) -> None:
        from safetensors import safe_open

        by_file: dict[Path, list[_Target]] = {}
        for t in targets:
            by_file.setdefault(t.entry.file, []).append(t)
        for path, items in by_file.items():
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for t in items:
                    src = f.get_tensor(t.entry.name).reshape(-1).view(torch.uint8)
                    t.dest.copy_(src, non_blocking=False)
                    self._advance(t.entry.nbytes)

    def _plan(self, targets: list[_Target]) -> list[_Chunk]:
        """Cut each file's tensors into byte ranges of about staging_bytes."""
        chunks: list[_Chunk] = []
        by_file: dict[Path, list[_Target]] = {}
        for t in targets:
            by_file.setdefault(t.entry.file, []).append(t)
        size = self.staging_bytes
        for path, items in by_file.items():
            items.sort(key=lambda t: t.entry.start)
            cur: _Chunk | None = None
            for t in items:
                pos = t.entry.start
                while pos < t.entry.end:
                    if cur is None or cur.end - cur.start >= size or pos != cur.end:
                        if cur is not None:
                            chunks.append(cur)
                        cur = _Chunk(path, pos, pos, [])
                    take = min(t.entry.end - pos, size - (cur.end - cur.start))
                    cur.parts.append((t, pos - t.entry.start, pos - cur.start))
                    cur.end = pos + take
                    pos += take
            if cur is not None:
                chunks.append(cur)
        return chunks

    def _read_chunks(self, targets: list[_Target]) -> None:
        chunks = self._plan(targets)
        if not chunks:
            return
        work: queue.Queue[_Chunk | None] = queue.Queue()
        for c in chunks:
            work.put(c)
        n_threads = min(self.threads, len(chunks))
        for _ in range(n_threads):
            work.put(None)
        fds = {p: os.open(p, os.O_RDONLY) for p in {c.file for c in chunks}}
        for fd in fds.values():
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        errors: list[BaseException] = []
        try:
            workers = [
                threading.Thread(target=self._worker, args=(work, fds, errors), name=f"weights-{i}", daemon=True)
                for i in range(n_threads)
            ]
            for w in workers:
                w.start()
            for w in workers:
                w.join()
        finally:
            for fd in fds.values():
                os.close(fd)
        if errors:
            raise errors[0]

    def _worker(self, work: queue.Queue, fds: dict[Path, int], errors: list[BaseException]) -> None:
        try:
            n_buf = 2 if self.streams else 1
            staging = [torch.empty(self.staging_bytes, dtype=torch.uint8, pin_memory=self.pinned) for _ in range(n_buf)]
            events: list[torch.cuda.Event | None] = [None] * n_buf
            stream = torch.cuda.Stream(device=self.device) if self.streams else None
            k = 0
            while not errors:
                chunk = work.get()
                if chunk is None:
                    break
                buf = staging[k]
                if events[k] is not None:
                    events[k].synchronize()  # the copy out of this buffer has finished
                n = chunk.end - chunk.start
                view = memoryview(buf.numpy()).cast("B")[:n]
                got = 0
                while got < n:
                    r = os.preadv(fds[chunk.file], [view[got:]], chunk.start + got)
                    if r <= 0:
                        raise OSError(f"short read in {chunk.file} at {chunk.start + got}")
                    got += r
                if stream is not None:
                    with torch.cuda.stream(stream):
                        self._scatter(chunk, buf)
                        events[k] = torch.cuda.Event()
                        events[k].record(stream)
                else:
                    self._scatter(chunk, buf)
                    if self.cuda:  # the copy may still read the buffer: wait before reuse
                        events[k] = torch.cuda.Event()
                        events[k].record()
                self._advance(n)
                k = (k + 1) % n_buf
            for ev in events:
                if ev is not None:
                    ev.synchronize()
        except BaseException as exc:  # noqa: BLE001 - surfaced by _read_chunks
            errors.append(exc)

    @staticmethod
    def _scatter(chunk: _Chunk, buf: torch.Tensor) -> None:
        size = chunk.end - chunk.start
        parts = chunk.parts
        for i, (target, t_off, c_off) in enumerate(parts):
            c_end = parts[i + 1][2] if i + 1 < len(parts) else size
            length = c_end - c_off
            target.dest[t_off : t_off + length].copy_(buf[c_off : c_off + length], non_blocking=True)

    def _advance(self, n: int) -> None:
        with self._lock:
            self._done_bytes += n
            done, total = self._done_bytes, self._total_bytes
        if self.progress:
            self.progress(done, total)


def drop_page_cache(paths: Iterable[Path]) -> None:
    """Ask the kernel to forget cached pages of these files (for cold-start benchmarks)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
