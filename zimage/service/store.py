"""Output files: PNGs with their parameters embedded, written atomically off the GPU's path."""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import IO, Any

log = logging.getLogger(__name__)

TMP_PREFIX = ".tmp-"
JSON_KEY = "zimage"
TEXT_KEY = "parameters"


# The one owner of the output file-name format: the purge and the history read names through these.
OUTPUT_NAME = re.compile(r"\d{8}-\d{6}-\d{6}-seed(\d+)(?:~\d+)?\.png")


def is_output_name(name: str) -> bool:
    """A name this store writes (temp files and other programs' files are not)."""
    return OUTPUT_NAME.fullmatch(name) is not None


def seed_in_name(name: str) -> int | None:
    m = OUTPUT_NAME.fullmatch(name)
    return int(m.group(1)) if m else None


def output_name(seed: int, when: datetime | None = None) -> str:
    """A file name that sorts by time and carries the seed: 20261121-174501-123456-seed42.png."""
    when = when or datetime.now()
    return f"{when:%Y%m%d-%H%M%S}-{when.microsecond:06d}-seed{seed}.png"


def parameters_text(meta: dict[str, Any]) -> str:
    """The human-readable summary most image tools show (A1111's 'parameters' layout)."""
    lines = [str(meta.get("prompt", ""))]
    if meta.get("negative_prompt"):
        lines.append(f"Negative prompt: {meta['negative_prompt']}")
    fields = [
        ("Steps", meta.get("steps")),
        ("Sampler", "FlowMatch Euler"),
        ("CFG scale", meta.get("guidance")),
        ("Shift", meta.get("shift")),
        ("Seed", meta.get("seed")),
        ("Size", f"{meta.get('width')}x{meta.get('height')}"),
        ("Model", meta.get("model")),
        ("Memory mode", meta.get("memory_mode")),
    ]
    timings = meta.get("timings") or {}
    if timings:
        fields.append(("Time", f"{timings.get('total_s')}s"))
    lines.append(", ".join(f"{k}: {v}" for k, v in fields if v is not None))
    return "\n".join(lines)


def write_png(image, path: Path, meta: dict[str, Any] | None, compress_level: int = 4) -> Path:
    """Encode and write atomically: a hidden temp file in the same folder, fsync, then rename."""
    from PIL.PngImagePlugin import PngInfo

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = None
    if meta is not None:
        info = PngInfo()
        info.add_text(TEXT_KEY, parameters_text(meta))
        info.add_itxt(JSON_KEY, json.dumps(meta, ensure_ascii=False, sort_keys=True))
    tmp = path.parent / f"{TMP_PREFIX}{path.name}.{os.getpid()}.{threading.get_ident()}"
    try:
        with open(tmp, "wb") as f:
            image.save(f, format="PNG", pnginfo=info, compress_level=compress_level)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    return path


def read_parameters(source: str | Path | IO[bytes]) -> dict[str, Any]:
    """The parameters a PNG carries: zimage's own JSON, else the A1111-style `parameters` text that
    other tools write (see parse_a1111); {} when it carries neither."""
    from PIL import Image

    with Image.open(source) as im:
        text = getattr(im, "text", None) or im.info
        raw = text.get(JSON_KEY)
        if raw:
            try:
                data = json.loads(raw)
                if isinstance(data, dict):
                    return data
            except ValueError:
                pass
        summary = text.get(TEXT_KEY)
        return parse_a1111(summary) if summary else {}


# One "Key: value" of A1111's last line; a value with commas is quoted ("a: 1, b: 2").
_A1111_PARAM = re.compile(r'\s*([\w][\w \-/]*):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_NEGATIVE = "Negative prompt:"


def parse_a1111(text: str) -> dict[str, Any]:
    """Our fields from the `parameters` text that AUTOMATIC1111, Forge, Fooocus (A1111 mode) and zimage
    write: prompt lines, "Negative prompt: ..." lines, then one "Steps: 20, Sampler: ..., Seed: 1" line.
    Keys we have no field for (sampler, model hash, LoRA hashes...) are left out; {} for empty text."""
    lines = text.strip().splitlines()
    if not lines:
        return {}
    out: dict[str, Any] = {}
    params = dict(_A1111_PARAM.findall(lines[-1]))
    if len(params) >= 3:  # A1111's own test: a real parameters line has at least three pairs
        lines = lines[:-1]
    else:
        params = {}
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith(_NEGATIVE):
            in_negative = True
            line = line[len(_NEGATIVE) :].strip()
        (negative if in_negative else prompt).append(line)
    out["prompt"] = "\n".join(prompt).strip()
    if negative:
        out["negative_prompt"] = "\n".join(negative).strip()
    fields = {k.strip().lower(): v.strip().strip('"') for k, v in params.items()}
    for key, name, kind in (
        ("steps", "steps", int),
        ("cfg scale", "guidance", float),
        ("seed", "seed", int),
        ("shift", "shift", float),
        ("model", "model", str),
    ):
        if key in fields:
            try:
                out[name] = kind(fields[key])
            except ValueError:
                pass
    w, _, h = fields.get("size", "").partition("x")
    if w.strip().isdigit() and h.strip().isdigit():
        out["width"], out["height"] = int(w), int(h)
    return out


class OutputStore:
    """Writes PNGs on a background thread so the next job's GPU work never waits for zlib."""

    def __init__(self, folder: str | Path, metadata: bool = True, compress_level: int = 4, workers: int = 2):
        self.folder = Path(folder)
        self.metadata = metadata
        self.compress_level = compress_level
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="png")
        self._names_lock = threading.Lock()
        self._reserved: set[str] = set()
        self._pending = 0
        self._pending_lock = threading.Lock()

    def _unique_path(self, seed: int) -> Path:
        # Names are reserved in-process until written, so two jobs in one microsecond with the
        # same seed still get different files.
        with self._names_lock:
            path = self.folder / output_name(seed)
            stem, n = path.stem, 2
            while path.name in self._reserved or path.exists():
                path = self.folder / f"{stem}~{n}.png"
                n += 1
            self._reserved.add(path.name)
            return path

    def save(self, images: list, metas: list[dict[str, Any]]) -> tuple[list[str], float]:
        """Write now; returns (paths, seconds spent encoding and writing)."""
        t0 = time.perf_counter()
        paths = []
        for image, meta in zip(images, metas):
            path = self._unique_path(int(meta.get("seed", 0)))
            try:
                write_png(image, path, meta if self.metadata else None, self.compress_level)
            finally:
                with self._names_lock:
                    self._reserved.discard(path.name)
            paths.append(str(path))
        return paths, time.perf_counter() - t0

    def save_async(self, images: list, metas: list[dict[str, Any]], on_done=None) -> Future:
        """Future of the paths; on_done(paths, seconds) runs on the writer thread."""
        with self._pending_lock:
            self._pending += 1

        def job():
            try:
                paths, seconds = self.save(images, metas)
                if on_done:
                    on_done(paths, seconds)
                return paths
            finally:
                with self._pending_lock:
                    self._pending -= 1

        return self._pool.submit(job)

    @property
    def pending(self) -> int:
        return self._pending

    def history(self, limit: int = 100) -> list[Path]:
        """Saved outputs, newest first (names sort by time)."""
        if not self.folder.is_dir():
            return []
        files = [p for p in self.folder.iterdir() if is_output_name(p.name) and not p.is_symlink() and p.is_file()]
        files.sort(key=lambda p: p.name, reverse=True)
        return files[:limit]

    def close(self, wait: bool = True) -> None:
        """Finish writing what was queued (shutdown)."""
        self._pool.shutdown(wait=wait)
