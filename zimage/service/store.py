"""Output files: PNGs with their parameters embedded, written atomically off the GPU's path.

With logins each user has a folder of their own under the outputs folder (`outputs/<user>/`);
without logins everyone shares the outputs folder itself. `OutputStore.history(owner)` lists one
space, or every space for an admin. Reading parameters back (pngmeta.py) is importable from here too.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import re
import shutil
import stat
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from zimage.errors import NoSpace
from zimage.service.pngmeta import (  # noqa: F401 - reading parameters back lives there; imported from here too
    JSON_KEY,
    TEXT_KEY,
    clean_parameters,
    read_parameters,
    read_parameters_checked,
    read_png_text,
)
from zimage.units import human_bytes

log = logging.getLogger(__name__)

TMP_PREFIX = ".tmp-"
# The temp file of a write in progress: .tmp-<final name>.<pid>.<thread id> (and .tmp-probe.<pid>.<tid>).
TMP_NAME = re.compile(r"\.tmp-(.+)\.(\d+)\.(\d+)")
MiB = 1 << 20


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


def is_temp_name(name: str) -> bool:
    """A temp file this store writes and renames; one left behind means its writer died (kill -9)."""
    return TMP_NAME.fullmatch(name) is not None


def temp_writer_pid(name: str) -> int | None:
    m = TMP_NAME.fullmatch(name)
    return int(m.group(2)) if m else None


def _temp_path(path: Path) -> Path:
    return path.parent / f"{TMP_PREFIX}{path.name}.{os.getpid()}.{threading.get_ident()}"


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


def encode_png(image, meta: dict[str, Any] | None, compress_level: int = 4) -> bytes:
    """The PNG file's bytes, parameters embedded (in memory: a failed write still has them)."""
    from PIL.PngImagePlugin import PngInfo

    info = None
    if meta is not None:
        info = PngInfo()
        info.add_text(TEXT_KEY, parameters_text(meta))
        info.add_itxt(JSON_KEY, json.dumps(meta, ensure_ascii=False, sort_keys=True))
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info, compress_level=compress_level)
    return buf.getvalue()


def write_atomic(data: bytes, path: Path) -> Path:
    """Write atomically: a hidden temp file in the same folder, fsync, then rename. On any error
    the temp file is removed (a kill -9 leaves it: the purge sweeps those)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path)
    try:
        with open(tmp, "xb") as f:  # x: never through a link or file planted under the temp name
            f.write(data)
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


def write_png(image, path: Path, meta: dict[str, Any] | None, compress_level: int = 4) -> Path:
    """Encode, then write atomically."""
    return write_atomic(encode_png(image, meta, compress_level), Path(path))


_WHY = {
    errno.ENOSPC: "the disk is full (no space left on the device)",
    errno.EDQUOT: "the disk quota is used up",
    errno.EROFS: "the folder is on a read-only file system",
    errno.EACCES: "zimage may not write there (permission denied)",
    errno.EPERM: "zimage may not write there (operation not permitted)",
    errno.EFBIG: "the file would be larger than the system allows",
    errno.EIO: "the disk reported an input/output error",
    errno.ENOENT: "the folder does not exist",
    errno.ENOTDIR: "the outputs path is not a folder",
    errno.EEXIST: "a file stands where the folder should be",
}


def write_problem(exc: BaseException) -> str:
    """Why a write failed, in words (no paths, no exception text): for the user's message."""
    if isinstance(exc, OSError) and exc.errno in _WHY:
        return _WHY[exc.errno]
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return "an unexpected error (see the server log)"


@dataclass
class UnsavedImage:
    """An image whose PNG could not be written: its encoded bytes, for the page to hand over."""

    index: int  # position among the request's images
    seed: int
    name: str  # the file name it would have had
    data: bytes


@dataclass
class SaveReport:
    """What one save did: the files written, the images that could not be, and the first error."""

    paths: list[str] = field(default_factory=list)
    seconds: float = 0.0
    unsaved: list[UnsavedImage] = field(default_factory=list)
    error: BaseException | None = None


@dataclass(frozen=True)
class StorageState:
    """Whether outputs can be saved now: enough free space, a writable folder, the last save fine."""

    ok: bool
    free_bytes: int | None
    reason: str | None = None  # one sentence when not ok


class OutputStore:
    """Writes PNGs on a background thread so the next job's GPU work never waits for zlib.

    `owner` is a logged-in user name ('' = the shared space): their files go to `folder_for(owner)`.
    A write that fails (disk full, read-only, no permission) loses nothing: the encoded PNG is
    kept in the SaveReport for the page to hand over, and the failure is remembered until a
    write (or a probe) works again."""

    def __init__(
        self,
        folder: str | Path,
        metadata: bool = True,
        compress_level: int = 4,
        workers: int = 2,
        min_free_bytes: int = 0,
    ):
        self.folder = Path(folder).expanduser()
        # every path the store hands out lies under this real (symlink-free) folder
        self.root = self.folder.resolve()
        self.metadata = metadata
        self.compress_level = compress_level
        self.min_free_bytes = max(0, int(min_free_bytes))
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="png")
        self._names_lock = threading.Lock()
        self._reserved: set[str] = set()
        self._pending = 0
        self._pending_lock = threading.Lock()
        self.last_failure: str | None = None  # why the last write failed; None once one works

    # --- space and health -----------------------------------------------------------------

    def _existing(self) -> Path:
        """The outputs folder, or its nearest existing parent while it is not made yet."""
        p = self.folder.absolute()
        while not p.exists() and p != p.parent:
            p = p.parent
        return p

    def free_bytes(self) -> int | None:
        try:
            return shutil.disk_usage(self._existing()).free
        except OSError:
            return None

    def check_space(self) -> None:
        """Raise NoSpace while the disk has less free space than min_free_bytes (the job is refused)."""
        if not self.min_free_bytes:
            return
        free = self.free_bytes()
        if free is not None and free < self.min_free_bytes:
            raise NoSpace(
                f"Not enough free disk space to save images: the outputs folder {self.folder} has "
                f"{human_bytes(free, 1)} free, below the {self.min_free_bytes // MiB} MiB zimage keeps free "
                "(setting min_free_mib). Ask the admin to free some space, then try again."
            )

    def state(self) -> StorageState:
        """Checked live (cheap: a statvfs, an access(); a probe write only after a failed save)."""
        free = self.free_bytes()
        folder = self._existing()
        if self.min_free_bytes and free is not None and free < self.min_free_bytes:
            return StorageState(
                False,
                free,
                f"outputs folder {self.folder}: {human_bytes(free, 1)} free, below min_free_mib "
                f"({self.min_free_bytes // MiB} MiB); new jobs are refused",
            )
        if not os.access(folder, os.W_OK):
            why = "read-only file system" if _read_only(folder) else "no write permission"
            return StorageState(False, free, f"outputs folder {self.folder} cannot be written ({why})")
        if self.last_failure is not None:
            problem = self.probe()
            if problem is not None:
                return StorageState(False, free, f"outputs folder {self.folder}: saving fails ({problem})")
        return StorageState(True, free)

    def probe(self) -> str | None:
        """Write, fsync and remove a tiny temp file; None when that works (and the failure is
        forgotten), else why not."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp = _temp_path(self.folder / "probe")
            try:
                with open(tmp, "xb") as f:
                    f.write(b"zimage")
                    f.flush()
                    os.fsync(f.fileno())
            finally:
                try:
                    tmp.unlink()
                except OSError:
                    pass
        except OSError as exc:
            return write_problem(exc)
        self.last_failure = None
        return None

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

    def write(self, images: list, metas: list[dict[str, Any]], owner: str = "") -> SaveReport:
        """Encode and write each image into owner's space; one that cannot be written stays in the
        report, encoded. Never raises for a failed write (disk full, read-only...)."""
        t0 = time.perf_counter()
        report = SaveReport()
        for index, (image, meta) in enumerate(zip(images, metas)):
            seed = int(meta.get("seed", 0))
            data = None
            path = None
            try:
                data = encode_png(image, meta if self.metadata else None, self.compress_level)
                path = self._unique_path(seed, owner)  # makes the user's folder: may fail too
                write_atomic(data, path)
                report.paths.append(str(path))
            except OSError as exc:
                if data is None:  # the encoder itself failed: nothing to hand over
                    raise
                name = path.name if path is not None else output_name(seed)
                report.unsaved.append(UnsavedImage(index, seed, name, data))
                report.error = report.error or exc
            finally:
                if path is not None:
                    with self._names_lock:
                        self._reserved.discard(str(path))
        report.seconds = time.perf_counter() - t0
        if report.error is not None:
            self.last_failure = write_problem(report.error)
            log.warning(
                "could not save %d of %d image(s) to %s: %s",
                len(report.unsaved),
                len(images),
                self.folder_for(owner),
                report.error,
            )
        elif report.paths:
            self.last_failure = None
        return report

    def save(self, images: list, metas: list[dict[str, Any]], owner: str = "") -> tuple[list[str], float]:
        """Write now; returns (paths, seconds spent encoding and writing); raises the first write error."""
        report = self.write(images, metas, owner)
        if report.error is not None:
            raise report.error
        return report.paths, report.seconds

    def save_async(self, images: list, metas: list[dict[str, Any]], on_done=None, owner: str = "") -> Future:
        """Future of the paths written; on_done(report) runs on the writer thread before it resolves."""
        with self._pending_lock:
            self._pending += 1

        def job():
            try:
                report = self.write(images, metas, owner)
                if on_done:
                    on_done(report)
                return report.paths
            finally:
                with self._pending_lock:
                    self._pending -= 1

        try:
            return self._pool.submit(job)
        except RuntimeError:  # closed (shutting down): write here and now rather than lose the images
            done: Future = Future()
            try:
                done.set_result(job())
            except BaseException as exc:  # noqa: BLE001 - handed to the waiter, as the pool would
                done.set_exception(exc)
            return done

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


def _read_only(folder: Path) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        return False
