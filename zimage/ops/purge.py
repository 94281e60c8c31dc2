"""The purge thread: keeps the outputs folder (and Gradio's cache) under an age, a count and a size.

It deletes files on a box nobody watches for weeks, so safety comes before everything:
- each folder is resolved once; every run opens it as a directory descriptor (O_NOFOLLOW)
  and makes every stat, unlink and rmdir relative to that descriptor without following
  symlinks, so neither a symlink inside nor a folder later swapped for a symlink can lead it
  outside;
- in the outputs folder only regular files named the way ``store.output_name`` names them
  are candidates, there and one level down in the users' folders (``outputs/<user>/``): a
  mis-set ``outputs_dir`` (".", a home folder) costs nobody their files;
- in Gradio's cache only regular files one level down, inside the hash-named folders Gradio
  makes (``<cache>/<sha256>/<name>``), are candidates;
- hidden files (Gradio's ``.name.xxxx`` staging copies) and files modified in the last few
  seconds are never touched: they may still be being written;
- the store's own temp files (``.tmp-<name>.<pid>.<thread>``) are removed once stale: a kill -9
  during a PNG write leaves one behind. Stale means older than scan.STALE_TMP_S, or older than a few
  seconds with its writer process gone; they are swept at start and by every run, whatever the
  limits;
- symlinks are neither followed, nor removed, nor counted;
- an error on one file is logged and the run goes on; an error of a whole run is logged and
  counted, and the thread waits for the next run.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zimage.ops.scan import DIR_FLAGS, FileInfo, scan_cache, scan_outputs, scan_temp
from zimage.units import human_bytes

log = logging.getLogger(__name__)

GiB = 1 << 30

FRESH_S = 10.0  # younger files may still be being written (Gradio writes its copies in place)
KEEP_REMOVED = 20  # names of removed files kept for the status panel
KEEP_ERRORS = 10


@dataclass(frozen=True)
class PurgePolicy:
    """What to keep. 0 means no limit."""

    max_age_s: float = 0.0
    max_count: int = 0
    max_bytes: int = 0
    fresh_s: float = FRESH_S

    @classmethod
    def from_settings(cls, settings: Any) -> PurgePolicy:
        return cls(
            max_age_s=max(0.0, float(settings.purge_max_age_hours)) * 3600.0,
            max_count=max(0, int(settings.purge_max_count)),
            max_bytes=int(max(0.0, float(settings.purge_max_gib)) * GiB),
        )

    def describe(self) -> str:
        parts = []
        if self.max_age_s:
            parts.append(f"older than {self.max_age_s / 3600:g} h")
        if self.max_count:
            parts.append(f"more than {self.max_count} files")
        if self.max_bytes:
            parts.append(f"more than {self.max_bytes / GiB:g} GiB")
        return "remove " + (", ".join(parts) if parts else "nothing (no limits set)")


def choose(files: Iterable[FileInfo], policy: PurgePolicy, now: float) -> list[tuple[FileInfo, str]]:
    """Which files to remove and why ('age', 'count' or 'size'), oldest first. Pure.

    Files younger than policy.fresh_s (or dated in the future) are never chosen, but they
    count towards the count and size caps: older files make room for them."""
    ordered = sorted(files, key=lambda f: (f.mtime, f.name))
    doomed: list[tuple[FileInfo, str]] = []
    kept: list[FileInfo] = []
    for f in ordered:
        age = now - f.mtime
        if age >= policy.fresh_s and policy.max_age_s and age > policy.max_age_s:
            doomed.append((f, "age"))
        else:
            kept.append(f)
    count = len(kept)
    size = sum(f.size for f in kept)
    for f in kept:
        over_count = bool(policy.max_count) and count > policy.max_count
        over_size = bool(policy.max_bytes) and size > policy.max_bytes
        if not (over_count or over_size):
            break
        if now - f.mtime < policy.fresh_s:
            continue
        doomed.append((f, "count" if over_count else "size"))
        count -= 1
        size -= f.size
    return doomed


@dataclass
class PurgeReport:
    """One run."""

    started: float
    seconds: float = 0.0
    outcome: str = "ok"  # ok, partial (some files could not be removed), error (the run failed)
    files: int = 0
    bytes: int = 0
    dirs: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)
    removed: list[str] = field(default_factory=list)  # the first KEEP_REMOVED paths
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "started": self.started,
            "seconds": round(self.seconds, 4),
            "outcome": self.outcome,
            "files": self.files,
            "bytes": self.bytes,
            "dirs": self.dirs,
            "by_reason": dict(self.by_reason),
            "removed": list(self.removed),
            "errors": list(self.errors),
        }


class Purger:
    """Runs the purge every ``every_s`` seconds on a daemon thread (0 = never); run_once() on demand."""

    def __init__(
        self,
        outputs_dir: str | os.PathLike,
        cache_dirs: Sequence[str | os.PathLike] = (),
        policy: PurgePolicy | None = None,
        every_s: float = 0.0,
        metrics: Any = None,
    ):
        # Resolved once: a symlink swapped in later for a folder cannot redirect the purge.
        self.outputs_dir = Path(outputs_dir).resolve()
        self.cache_dirs = [Path(d).resolve() for d in cache_dirs]
        self.policy = policy or PurgePolicy()
        self.every_s = max(0.0, float(every_s))
        self.metrics = metrics
        self.last: PurgeReport | None = None
        self.next_run: float | None = None
        self.totals = {"runs": 0, "errors": 0, "files": 0, "bytes": 0, "dirs": 0}
        self._run_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------------------
    # the thread

    def start(self) -> bool:
        """Start the thread (first run at once); False when every_s is 0 (purging is off)."""
        if not self.every_s or (self._thread is not None and self._thread.is_alive()):
            return False
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="purge", daemon=True)
        self._thread.start()
        log.info(
            "purge every %.4g min: %s in %s",
            self.every_s / 60,
            self.policy.describe(),
            ", ".join(str(d) for d in [self.outputs_dir, *self.cache_dirs]),
        )
        return True

    def stop(self, timeout: float = 2.0) -> None:
        """Ask the thread to stop; a run in progress stops between two files."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        self.next_run = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _loop(self) -> None:
        # Settings refuse an infinite or huge interval; the cap keeps Event.wait from raising (and the
        # thread from dying while the app runs on) whatever a caller passes.
        every_s = min(self.every_s, threading.TIMEOUT_MAX)
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception:  # noqa: BLE001 - run_once records its own errors; this is the last net
                log.exception("purge: unexpected error outside a run")
            self.next_run = time.time() + every_s
            if self._stop.wait(every_s):
                break

    # ------------------------------------------------------------------------------------
    # one run

    def run_once(self, now: float | None = None) -> PurgeReport:
        """Purge now. Never raises: a failed run is logged, counted and reported."""
        with self._run_lock:
            report = PurgeReport(started=time.time())
            t0 = time.perf_counter()
            now = time.time() if now is None else now
            for folder, cache in [(self.outputs_dir, False), *((d, True) for d in self.cache_dirs)]:
                try:
                    if not cache:
                        self._sweep_temp(folder, now, report)
                    self._purge_folder(folder, cache, now, report)
                except Exception as exc:  # noqa: BLE001 - one bad folder or run must not stop the others
                    report.outcome = "error"
                    report.errors.append(f"{folder}: {type(exc).__name__}: {exc}")
                    log.exception("purge: failed in %s", folder)
            if report.outcome == "ok" and report.errors:
                report.outcome = "partial"
            report.errors = report.errors[:KEEP_ERRORS]
            report.seconds = time.perf_counter() - t0
            self._record(report)
            return report

    def sweep_temp_files(self, now: float | None = None) -> int:
        """Remove the store's stale temp files now (at start); returns how many. Never raises."""
        report = PurgeReport(started=time.time())
        try:
            with self._run_lock:
                self._sweep_temp(self.outputs_dir, time.time() if now is None else now, report)
        except Exception:  # noqa: BLE001 - a sweep must never stop the start
            log.exception("purge: could not sweep temp files in %s", self.outputs_dir)
        return report.files

    def _sweep_temp(self, root: Path, now: float, report: PurgeReport) -> None:
        try:
            root_fd = os.open(root, DIR_FLAGS)
        except FileNotFoundError:
            return
        try:
            for info in scan_temp(root_fd, now, self.policy.fresh_s):
                self._remove(root, root_fd, info, "stale temp", now, report)
        finally:
            os.close(root_fd)

    def _record(self, report: PurgeReport) -> None:
        self.last = report
        self.totals["runs"] += 1
        self.totals["errors"] += 1 if report.outcome != "ok" else 0
        self.totals["files"] += report.files
        self.totals["bytes"] += report.bytes
        self.totals["dirs"] += report.dirs
        if self.metrics is not None:
            try:
                self.metrics.purge_runs.labels(report.outcome).inc()
                self.metrics.purged_files.inc(report.files)
                self.metrics.purged_bytes.inc(report.bytes)
            except Exception:  # noqa: BLE001 - metrics must never break the purge
                log.exception("purge: could not update metrics")
        if report.files or report.outcome != "ok":
            log.info(
                "purge: %s, removed %d file(s), %s, %d empty cache folder(s) in %.2fs%s",
                report.outcome,
                report.files,
                human_bytes(report.bytes, 1),
                report.dirs,
                report.seconds,
                f"; errors: {'; '.join(report.errors)}" if report.errors else "",
            )
        else:
            log.debug("purge: nothing to remove (%.3fs)", report.seconds)

    def _purge_folder(self, root: Path, cache: bool, now: float, report: PurgeReport) -> None:
        try:
            root_fd = os.open(root, DIR_FLAGS)
        except FileNotFoundError:
            return  # nothing written yet
        try:
            files, empty_dirs = scan_cache(root_fd, now, self.policy.fresh_s) if cache else (scan_outputs(root_fd), [])
            for info, reason in choose(files, self.policy, now):
                if self._stop.is_set():
                    return
                self._remove(root, root_fd, info, reason, now, report)
            for name in empty_dirs:
                if self._stop.is_set():
                    return
                try:
                    os.rmdir(name, dir_fd=root_fd)  # fails (and is left) if a file arrived meanwhile
                    report.dirs += 1
                except OSError:
                    pass
        finally:
            os.close(root_fd)

    def _remove(self, root: Path, root_fd: int, info: FileInfo, reason: str, now: float, report: PurgeReport) -> None:
        parent, _, name = info.name.rpartition("/")
        shown = root / info.name
        dir_fd = root_fd
        try:
            if parent:
                dir_fd = os.open(parent, DIR_FLAGS, dir_fd=root_fd)
            try:
                # Look again just before: the file must be the very one chosen, untouched since.
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                if (
                    not stat.S_ISREG(st.st_mode)
                    or (st.st_ino, st.st_dev) != (info.ino, info.dev)
                    or st.st_mtime != info.mtime
                    or time.time() - st.st_mtime < self.policy.fresh_s
                ):
                    log.debug("purge: %s changed since the scan; left alone", shown)
                    return
                os.unlink(name, dir_fd=dir_fd)
            finally:
                if dir_fd != root_fd:
                    os.close(dir_fd)
        except FileNotFoundError:
            return  # someone else removed it: fine
        except OSError as exc:
            report.errors.append(f"{shown}: {exc.strerror or exc}")
            log.warning("purge: could not remove %s: %s", shown, exc)
            return
        report.files += 1
        report.bytes += info.size
        report.by_reason[reason] = report.by_reason.get(reason, 0) + 1
        if len(report.removed) < KEEP_REMOVED:
            report.removed.append(str(shown))
        log.info(
            "purge: removed %s (%s, %.1f h old, %s)",
            shown,
            human_bytes(info.size, 1),
            (now - info.mtime) / 3600,
            reason,
        )

    # ------------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Plain data for the profiler panel."""
        p = self.policy
        return {
            "enabled": bool(self.every_s),
            "running": self.running,
            "every_minutes": self.every_s / 60,
            "folders": [str(self.outputs_dir), *(str(d) for d in self.cache_dirs)],
            "policy": {
                "max_age_hours": p.max_age_s / 3600,
                "max_count": p.max_count,
                "max_gib": p.max_bytes / GiB,
                "describe": p.describe(),
            },
            "last": self.last.as_dict() if self.last else None,
            "next_run": self.next_run,
            "totals": dict(self.totals),
        }
