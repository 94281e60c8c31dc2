"""What the purge may remove, found without following a link: the outputs (in the folder and in
each user's folder one level down), the store's abandoned temp files, and the files in Gradio's
hash-named cache folders. Every stat and open is relative to a directory descriptor opened with
O_NOFOLLOW (see zimage.ops.purge for why)."""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass

from zimage.service.store import is_output_name, is_temp_name, is_user_folder_name, temp_writer_pid

# Gradio names its cache folders by a sha256 hex digest of the content.
CACHE_DIR_NAME = re.compile(r"[0-9a-f]{32,128}")
STALE_TMP_S = 600.0  # a PNG write takes well under a second: a temp file this old was abandoned
DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0)


@dataclass(frozen=True)
class FileInfo:
    """One candidate: name relative to its root folder ('<hashdir>/<name>' in a cache)."""

    name: str
    size: int
    mtime: float
    ino: int = 0
    dev: int = 0


def scan_outputs(root_fd: int) -> list[FileInfo]:
    """Outputs in the folder and in each user's folder (one level down, never through a link)."""
    files = []
    users = []
    with os.scandir(root_fd) as it:
        for entry in it:
            if is_output_name(entry.name):
                info = _regular(entry.name, root_fd, entry.name)
                if info is not None:
                    files.append(info)
            elif is_user_folder_name(entry.name) and entry.is_dir(follow_symlinks=False):
                users.append(entry.name)
    for user in users:
        try:
            sub_fd = os.open(user, DIR_FLAGS, dir_fd=root_fd)
        except OSError:
            continue  # gone, or a link
        try:
            with os.scandir(sub_fd) as it:
                names = [e.name for e in it if is_output_name(e.name)]
            for name in names:
                info = _regular(name, sub_fd, f"{user}/{name}")
                if info is not None:
                    files.append(info)
        finally:
            os.close(sub_fd)
    return files


def scan_temp(root_fd: int, now: float, fresh_s: float) -> list[FileInfo]:
    """The store's temp files that no write will finish (old, or their writer process is gone),
    in the outputs folder and one level down in the users' folders (never through a link)."""
    stale = []
    with os.scandir(root_fd) as it:
        entries = [(e.name, e.is_dir(follow_symlinks=False)) for e in it]
    folders = [("", root_fd, [n for n, _ in entries])]
    opened = []
    try:
        for name, is_dir in entries:
            if is_dir and is_user_folder_name(name):
                try:
                    sub_fd = os.open(name, DIR_FLAGS, dir_fd=root_fd)
                except OSError:
                    continue  # gone, or a link
                opened.append(sub_fd)
                with os.scandir(sub_fd) as it:
                    folders.append((name + "/", sub_fd, [e.name for e in it]))
        for prefix, fd, names in folders:
            for name in names:
                if not is_temp_name(name):
                    continue
                try:
                    st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                except OSError:
                    continue
                if not stat.S_ISREG(st.st_mode):
                    continue
                age = now - st.st_mtime
                if age >= STALE_TMP_S or (age >= fresh_s and not _alive(temp_writer_pid(name))):
                    stale.append(FileInfo(prefix + name, st.st_size, st.st_mtime, st.st_ino, st.st_dev))
    finally:
        for fd in opened:
            os.close(fd)
    return stale


def _alive(pid: int | None) -> bool:
    """Whether the process that wrote a temp file still runs (this one counts as running)."""
    if not pid:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, but not ours to signal
    return True


def scan_cache(root_fd: int, now: float, fresh_s: float) -> tuple[list[FileInfo], list[str]]:
    """Files in Gradio's hash folders, and those folders that are empty and old."""
    files: list[FileInfo] = []
    empty: list[str] = []
    with os.scandir(root_fd) as it:
        dirs = [e.name for e in it if CACHE_DIR_NAME.fullmatch(e.name)]
    for d in dirs:
        try:
            st = os.stat(d, dir_fd=root_fd, follow_symlinks=False)
            if not stat.S_ISDIR(st.st_mode):
                continue
            sub_fd = os.open(d, DIR_FLAGS, dir_fd=root_fd)
        except OSError:
            continue  # gone, or not a real folder
        try:
            with os.scandir(sub_fd) as it:
                names = [e.name for e in it]
            for name in names:
                if name.startswith("."):
                    continue  # Gradio's staging copies (".name.xxxx") are being written
                info = _regular(name, sub_fd, f"{d}/{name}")
                if info is not None:
                    files.append(info)
        finally:
            os.close(sub_fd)
        # An empty folder is removed only once it has been left alone for a while: Gradio
        # creates the folder first and writes the file into it just after.
        if not names and now - st.st_mtime >= fresh_s:
            empty.append(d)
    return files, empty


def _regular(name: str, dir_fd: int, shown: str) -> FileInfo | None:
    """A FileInfo for a regular, non-hidden file; None for links, folders, hidden or vanished files."""
    if name.startswith("."):
        return None
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    return FileInfo(shown, st.st_size, st.st_mtime, st.st_ino, st.st_dev)
