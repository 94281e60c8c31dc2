"""Output files: PNGs with their parameters embedded, written atomically off the GPU's path.

With logins each user has a folder of their own under the outputs folder (`outputs/<user>/`);
without logins everyone shares the outputs folder itself. `OutputStore.history(owner)` lists one
space, or every space for an admin. Reading parameters back (pngmeta.py) is importable from here too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import stat
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

from zimage.service.pngmeta import (  # noqa: F401 - reading parameters back lives there; imported from here too
    JSON_KEY,
    TEXT_KEY,
    clean_parameters,
    read_parameters,
    read_parameters_checked,
    read_png_text,
)

log = logging.getLogger(__name__)

TMP_PREFIX = ".tmp-"


# The one owner of the output file-name format: the purge and the history read names through these.
OUTPUT_NAME = re.compile(r"\d{8}-\d{6}-\d{6}-seed(\d+)(?:~\d+)?\.png")


# A user's folder: the user name itself when it is a plain one, else a readable part and a hash.
USER_FOLDER = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def user_folder_name(user: str) -> str:
    """The outputs subfolder of a logged-in user (never '', '.', '..', a path or an output name)."""
    # lower case only, so two users never share a folder on a case-insensitive file system
    if USER_FOLDER.fullmatch(user) and user == user.lower() and not user.endswith(".png") and ".." not in user:
        return user
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", user).strip("._-")[:40] or "user"
    return f"{slug}-{hashlib.sha256(user.encode('utf-8')).hexdigest()[:10]}"


def is_user_folder_name(name: str) -> bool:
    return USER_FOLDER.fullmatch(name) is not None


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


class OutputStore:
    """Writes PNGs on a background thread so the next job's GPU work never waits for zlib.

    `owner` is a logged-in user name ('' = the shared space): their files go to `folder_for(owner)`."""

    def __init__(self, folder: str | Path, metadata: bool = True, compress_level: int = 4, workers: int = 2):
        self.folder = Path(folder).expanduser()
        # every path the store hands out lies under this real (symlink-free) folder
        self.root = self.folder.resolve()
        self.metadata = metadata
        self.compress_level = compress_level
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="png")
        self._names_lock = threading.Lock()
        self._reserved: set[str] = set()
        self._pending = 0
        self._pending_lock = threading.Lock()

    # --- spaces: one folder per user --------------------------------------------------------

    def folder_for(self, owner: str = "") -> Path:
        """The folder of `owner`'s outputs: the outputs folder itself for '' (no logins)."""
        return self.root / user_folder_name(owner) if owner else self.root

    def space_of(self, path: Path) -> str | None:
        """The folder name of the space a real path under the root lies in ('' = the shared space);
        None when it is not directly in a space (the root itself, deeper folders, elsewhere)."""
        try:
            parts = path.relative_to(self.root).parts
        except ValueError:
            return None
        if len(parts) == 1:
            return ""
        if len(parts) == 2 and is_user_folder_name(parts[0]):
            return parts[0]
        return None

    def space_name(self, owner: str) -> str:
        return user_folder_name(owner) if owner else ""

    def _writable_folder(self, owner: str) -> Path:
        folder = self.folder_for(owner)
        self.root.mkdir(parents=True, exist_ok=True)
        if folder != self.root:
            try:
                folder.mkdir(exist_ok=True)
            except FileExistsError:
                pass
            if folder.is_symlink() or not folder.is_dir():
                raise OSError(f"{folder} is not a plain folder (a link?); outputs are never written through it")
        return folder

    def _unique_path(self, seed: int, owner: str = "") -> Path:
        # Names are reserved in-process until written, so two jobs in one microsecond with the
        # same seed still get different files.
        folder = self._writable_folder(owner)
        with self._names_lock:
            path = folder / output_name(seed)
            stem, n = path.stem, 2
            while str(path) in self._reserved or path.exists():
                path = folder / f"{stem}~{n}.png"
                n += 1
            self._reserved.add(str(path))
            return path

    def save(self, images: list, metas: list[dict[str, Any]], owner: str = "") -> tuple[list[str], float]:
        """Write now; returns (paths, seconds spent encoding and writing)."""
        t0 = time.perf_counter()
        paths = []
        for image, meta in zip(images, metas):
            path = self._unique_path(int(meta.get("seed", 0)), owner)
            try:
                write_png(image, path, meta if self.metadata else None, self.compress_level)
            finally:
                with self._names_lock:
                    self._reserved.discard(str(path))
            paths.append(str(path))
        return paths, time.perf_counter() - t0

    def save_async(self, images: list, metas: list[dict[str, Any]], on_done=None, owner: str = "") -> Future:
        """Future of the paths; on_done(paths, seconds) runs on the writer thread."""
        with self._pending_lock:
            self._pending += 1

        def job():
            try:
                paths, seconds = self.save(images, metas, owner)
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

    def history(self, limit: int = 100, owner: str | None = "") -> list[Path]:
        """Saved outputs of one space, newest first (names sort by time); owner None = every space
        (an admin's view). Links, temp files and other programs' files are never listed."""
        if owner is None:
            folders = [self.root, *self._user_folders()]
        else:
            folders = [self.folder_for(owner)]
        files: list[Path] = []
        for folder in folders:
            if folder.is_symlink() or not folder.is_dir():
                continue
            files += [p for p in folder.iterdir() if is_output_name(p.name) and _regular_file(p)]
        files.sort(key=lambda p: p.name, reverse=True)
        return files[:limit]

    def _user_folders(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return [p for p in self.root.iterdir() if is_user_folder_name(p.name) and not p.is_symlink() and p.is_dir()]

    def close(self, wait: bool = True) -> None:
        """Finish writing what was queued (shutdown)."""
        self._pool.shutdown(wait=wait)


def _regular_file(path: Path) -> bool:
    """A regular file, itself not a link (lstat: a link is never followed)."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False
