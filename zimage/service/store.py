"""Output files: PNGs with their parameters embedded, written atomically off the GPU's path.

With logins each user has a folder of their own under the outputs folder (`outputs/<user>/`);
without logins everyone shares the outputs folder itself. `OutputStore.history(owner)` lists one
space, or every space for an admin. `read_parameters` walks a PNG's chunks without decoding a pixel.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import stat
import struct
import threading
import time
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from zimage.errors import UnreadableImage

log = logging.getLogger(__name__)

TMP_PREFIX = ".tmp-"
JSON_KEY = "zimage"
TEXT_KEY = "parameters"


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


# ------------------------------------------------------------------------------------------
# reading parameters back: the PNG's chunks are walked, no pixel is decoded

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_PNG_SIDE = 16384  # pixels; zimage makes at most max_size (2048 by default)
MAX_TEXT_CHUNK = 1 << 20  # a text chunk larger than 1 MiB is skipped, unread
MAX_CHUNKS = 100_000
_TEXT_CHUNKS = (b"tEXt", b"zTXt", b"iTXt")
_KEYS = (JSON_KEY, TEXT_KEY)


def read_png_text(source: str | Path | IO[bytes], keys: tuple[str, ...] = _KEYS) -> dict[str, str]:
    """The text chunks named `keys`, wherever they lie (before or after the pixel data), without
    decompressing the pixels: every other chunk is skipped by its length. Raises UnreadableImage
    when the file is not a PNG, or is one larger than MAX_PNG_SIDE on a side."""
    if isinstance(source, (str, Path)):
        with open(source, "rb") as f:
            return read_png_text(f, keys)
    f = source
    if f.read(8) != PNG_SIGNATURE:
        raise UnreadableImage("The file is not a PNG image.")
    head = f.read(8 + 13)
    if len(head) < 21 or head[4:8] != b"IHDR":
        raise UnreadableImage("The PNG image is damaged (it has no header chunk).")
    width, height = struct.unpack(">II", head[8:16])
    if not (0 < width <= MAX_PNG_SIDE and 0 < height <= MAX_PNG_SIDE):
        raise UnreadableImage(
            f"The PNG image is {width}x{height} pixels; the loader reads images of at most "
            f"{MAX_PNG_SIDE}x{MAX_PNG_SIDE}."
        )
    f.seek(4, os.SEEK_CUR)  # the header's CRC
    found: dict[str, str] = {}
    for _ in range(MAX_CHUNKS):
        header = f.read(8)
        if len(header) < 8:
            break
        length, kind = struct.unpack(">I4s", header)
        if kind == b"IEND":
            break
        if kind in _TEXT_CHUNKS and length <= MAX_TEXT_CHUNK:
            data = f.read(length)
            f.seek(4, os.SEEK_CUR)
            if len(data) < length:
                break
            item = _text_chunk(kind, data, keys)
            if item is not None and item[0] not in found:
                found[item[0]] = item[1]
        else:
            f.seek(length + 4, os.SEEK_CUR)  # pixel data and everything else: not read
    return found


def _text_chunk(kind: bytes, data: bytes, keys: tuple[str, ...]) -> tuple[str, str] | None:
    """(key, text) of one tEXt/zTXt/iTXt chunk when its key is wanted; None otherwise or when damaged."""
    key_bytes, sep, rest = data.partition(b"\0")
    if not sep:
        return None
    key = key_bytes.decode("latin-1")
    if key not in keys:
        return None
    try:
        if kind == b"tEXt":
            return key, rest.decode("latin-1")
        if kind == b"zTXt":
            return key, _inflate(rest[1:]).decode("latin-1")
        compressed, method = rest[0], rest[1]  # iTXt: flag, method, language\0, translated key\0, text
        _lang, _, rest = rest[2:].partition(b"\0")
        _translated, _, text = rest.partition(b"\0")
        if compressed:
            if method != 0:
                return None
            text = _inflate(text)
        return key, text.decode("utf-8")
    except (IndexError, UnicodeDecodeError, zlib.error, ValueError):
        return None


def _inflate(data: bytes) -> bytes:
    """zlib-decompress at most MAX_TEXT_CHUNK bytes (a small chunk can inflate to gigabytes)."""
    d = zlib.decompressobj()
    out = d.decompress(data, MAX_TEXT_CHUNK)
    if d.unconsumed_tail:
        raise ValueError("text chunk too large once decompressed")
    return out


def read_parameters(source: str | Path | IO[bytes]) -> dict[str, Any]:
    """The parameters a zimage PNG carries, checked and typed by `clean_parameters`; {} when it
    carries none. Raises UnreadableImage for a file that is not a PNG (or too large a one)."""
    return read_parameters_checked(source)[0]


def read_parameters_checked(source: str | Path | IO[bytes]) -> tuple[dict[str, Any], list[str]]:
    """(parameters, the fields left out because they were unusable, each as "name (value)")."""
    text = read_png_text(source)
    raw: Any = {}
    if text.get(JSON_KEY):
        try:
            raw = json.loads(text[JSON_KEY])
        except ValueError:
            raw = {}
    if not (isinstance(raw, dict) and raw) and text.get(TEXT_KEY):
        raw = _parse_parameters_text(text[TEXT_KEY])
    return clean_parameters(raw if isinstance(raw, dict) else {})


def _parse_parameters_text(text: str) -> dict[str, Any]:
    """A1111's layout back to fields; values stay text here (clean_parameters types them)."""
    lines = text.strip().splitlines()
    if not lines:
        return {}
    out: dict[str, Any] = {}
    tail = lines[-1]
    body = lines[:-1]
    if body and body[-1].startswith("Negative prompt: "):
        out["negative_prompt"] = body.pop()[len("Negative prompt: ") :]
    out["prompt"] = "\n".join(body)
    for part in tail.split(", "):
        key, _, value = part.partition(": ")
        key = key.strip().lower()
        if key == "steps":
            out["steps"] = value
        elif key == "cfg scale":
            out["guidance"] = value
        elif key == "seed":
            out["seed"] = value
        elif key == "size":
            w, _, h = value.partition("x")
            out["width"], out["height"] = w, h
        elif key == "model":
            out["model"] = value
    return out


# field -> (kind, low, high); text fields: (str, max length, None)
_FIELDS: dict[str, tuple[type, Any, Any]] = {
    "prompt": (str, 20_000, None),
    "negative_prompt": (str, 20_000, None),
    "model": (str, 500, None),
    "memory_mode": (str, 100, None),
    "device": (str, 200, None),
    "created": (str, 100, None),
    "generator": (str, 100, None),
    "seed": (int, 0, 2**32 - 1),
    "batch_seed": (int, -1, 2**32 - 1),
    "batch_count": (int, 1, 10_000),
    "width": (int, 1, MAX_PNG_SIDE),
    "height": (int, 1, MAX_PNG_SIDE),
    "steps": (int, 1, 10_000),
    "guidance": (float, 0.0, 1000.0),
}


def clean_parameters(raw: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Only known fields, each of its type and within sane bounds: (clean, ["width ('abc')", ...]).

    Metadata comes from files anyone can write; nothing downstream should meet a width of 'abc'."""
    clean: dict[str, Any] = {}
    dropped: list[str] = []
    for key, value in raw.items():
        spec = _FIELDS.get(key)
        if spec is None:
            if key == "timings" and isinstance(value, dict):
                clean["timings"] = _timings(value)
            continue
        kind, low, high = spec
        if kind is str:
            if isinstance(value, str) and len(value) <= low:
                clean[key] = value
            else:
                dropped.append(f"{key} ({_shown(value)})")
            continue
        number = _number(value, kind, low, high)
        if number is None:
            dropped.append(f"{key} ({_shown(value)})")
        else:
            clean[key] = number
    return clean, dropped


def _timings(value: dict[str, Any]) -> dict[str, Any]:
    """Stage times: numbers (or lists of numbers, or None) under short names; the rest is left out."""
    out: dict[str, Any] = {}
    for name, v in list(value.items())[:50]:
        if not isinstance(name, str) or len(name) > 40:
            continue
        if v is None:
            out[name] = None
        elif isinstance(v, list) and len(v) <= 10_000:
            numbers = [_number(x, float, 0.0, 1e9) for x in v]
            if None not in numbers:
                out[name] = numbers
        else:
            number = _number(v, float, 0.0, 1e9)
            if number is not None:
                out[name] = number
    return out


def _number(value: Any, kind: type, low: Any, high: Any) -> Any:
    if isinstance(value, bool):
        return None
    try:
        if kind is int:
            if isinstance(value, float):
                number = int(value) if value.is_integer() else None
            else:
                number = int(str(value).strip()) if isinstance(value, (int, str)) else None
        else:
            number = float(value) if isinstance(value, (int, float, str)) else None
            if number is not None and not math.isfinite(number):
                number = None
    except (ValueError, OverflowError):
        return None
    if number is None or not low <= number <= high:
        return None
    return number


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


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
