"""Long-running duties beside the server: the purge thread and the memory watchdog.

The server creates one Operations object after the engine, calls start() once the app
serves and stop() on shutdown, and shows status() in the profiler panel.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable, MutableMapping, Sequence
from pathlib import Path
from typing import Any

from zimage.errors import SettingsError
from zimage.ops.purge import PurgePolicy, Purger
from zimage.ops.watchdog import WATCHDOG_EXIT_CODE, MemoryWatchdog
from zimage.units import human_bytes

log = logging.getLogger(__name__)

# After request_exit, how long beyond the shutdown grace the graceful path may take (cancel
# the job, flush PNGs, tear down) before the watchdog exits hard.
HARD_EXIT_MARGIN_S = 90.0

__all__ = ["Operations", "WATCHDOG_EXIT_CODE", "prepare_gradio_cache", "shared_folders"]

CHECKOUT = Path(__file__).resolve().parents[2]


def shared_folders() -> dict[Path, str]:
    """Folders that are never zimage's own cache (the purge cleans that folder), with why."""
    tmp = Path(tempfile.gettempdir()).resolve()
    return {
        tmp / "gradio": "Gradio's shared cache of every Gradio app on this machine",
        tmp: "the system's temp folder",
        Path.home().resolve(): "the home folder",
        CHECKOUT: "zimage's checkout",
    }


def prepare_gradio_cache(folder: str | os.PathLike, environ: MutableMapping[str, str] | None = None) -> Path:
    """Make zimage's own Gradio cache folder and point Gradio at it (GRADIO_TEMP_DIR).

    Called before Gradio is imported (Gradio reads the variable at import as well as later).
    Refuses with one SettingsError line a folder that is shared (Gradio's /tmp/gradio, the temp
    folder, a home or the checkout, or a parent of one) or that cannot be made or written."""
    environ = os.environ if environ is None else environ
    given = Path(folder).expanduser()
    path = given.resolve()
    shared = shared_folders()
    clash = next(((f, w) for f, w in shared.items() if path == f), None) or next(
        ((f, f"a folder above {w} ({f})") for f, w in shared.items() if path in f.parents), None
    )
    if clash is not None:
        raise SettingsError(
            f"Setting 'gradio_cache_dir' (GRADIO_TEMP_DIR) is {given}, {clash[1]}: give zimage a folder of "
            "its own, e.g. ~/.cache/zimage/gradio, since the purge cleans it."
        )
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise SettingsError(
            f"Setting 'gradio_cache_dir' (GRADIO_TEMP_DIR): cannot create {given} ({exc.strerror or exc}); "
            "give a folder zimage may write to."
        ) from None
    if not path.is_dir() or not os.access(path, os.W_OK | os.X_OK):
        raise SettingsError(
            f"Setting 'gradio_cache_dir' (GRADIO_TEMP_DIR): {given} is not a folder zimage may write to."
        )
    environ["GRADIO_TEMP_DIR"] = str(path)
    return path


class Operations:
    def __init__(
        self,
        engine: Any,
        settings: Any,
        request_exit: Callable[[int], None],
        cache_dirs: Sequence[str | os.PathLike] | None = None,
    ):
        """cache_dirs: folders cleaned the way Gradio's cache is laid out; None means zimage's own
        Gradio cache (settings.gradio_cache_dir), [] none."""
        self.engine = engine
        self.settings = settings
        self.request_exit = request_exit
        caches = [Path(settings.gradio_cache_dir).expanduser()] if cache_dirs is None else list(cache_dirs)
        self.purger = Purger(
            settings.outputs_dir,
            caches,
            PurgePolicy.from_settings(settings),
            every_s=max(0.0, float(settings.purge_every_minutes)) * 60.0,
            metrics=getattr(engine, "metrics", None),
        )
        self.watchdog = MemoryWatchdog(
            settings.watchdog_reserved_gib,
            settings.watchdog_strikes,
            request_exit,
            hard_exit_after_s=float(settings.shutdown_grace_s) + HARD_EXIT_MARGIN_S,
        )
        self.started = False

    def start(self) -> None:
        """Start the purge thread (unless purge_every_minutes is 0) and hook the watchdog to every job."""
        if self.started:
            return
        self.started = True
        self.purger.sweep_temp_files()  # a kill -9 during a PNG write left its temp file: gone at start
        self.purger.start()
        if self.watchdog not in self.engine.job_listeners:
            self.engine.job_listeners.append(self.watchdog)
        if self.watchdog.threshold_bytes:
            log.info(
                "watchdog: exit with code %d when reserved VRAM stays above %.1f GiB for %d job(s)",
                WATCHDOG_EXIT_CODE,
                self.settings.watchdog_reserved_gib,
                self.watchdog.strikes,
            )

    def stop(self) -> None:
        """Stop background duties; returns within about two seconds."""
        self.started = False
        self.purger.stop(timeout=2.0)
        try:
            self.engine.job_listeners.remove(self.watchdog)
        except ValueError:
            pass

    def status(self) -> dict[str, Any]:
        """Plain data for the profiler panel: the purge's last run and totals, the watchdog's state.

        A few flat rows of short text, so a generic key/value panel shows it as it is; the
        numbers are in /metrics, the nested records in purger.status() and watchdog.status()."""
        p = self.purger.status()
        w = self.watchdog.status()
        last = p["last"]
        totals = p["totals"]
        if last is None:
            last_run = "not yet" if p["enabled"] else "never (purge_every_minutes = 0)"
            removed, errors = "", ""
        else:
            last_run = (
                f"{_when(last['started'])}: {last['outcome']}, removed {last['files']} file(s), "
                f"{human_bytes(last['bytes'], 1)}, in {last['seconds']:.2f}s"
            )
            more = last["files"] - len(last["removed"])
            removed = ", ".join(Path(r).name for r in last["removed"]) + (f" (+{more} more)" if more > 0 else "")
            errors = "; ".join(last["errors"])
        if w["memory_check"]:
            watchdog = (
                f"exit {w['exit_code']} when reserved VRAM stays above {w['threshold_gib']:g} GiB for "
                f"{w['strikes']} job(s), or on an unrecoverable CUDA error"
            )
        else:
            watchdog = f"exit {w['exit_code']} on an unrecoverable CUDA error; memory check off"
        return {
            "purge": f"every {p['every_minutes']:g} min: {p['policy']['describe']}" if p["enabled"] else "off",
            "purge_folders": ", ".join(p["folders"]),
            "purge_last_run": last_run,
            "purge_last_removed": removed,
            "purge_last_errors": errors,
            "purge_next_run": _when(p["next_run"]),
            "purge_totals": (
                f"{totals['runs']} run(s), {totals['errors']} with errors; "
                f"{totals['files']} file(s), {human_bytes(totals['bytes'], 1)} removed"
            ),
            "watchdog": watchdog,
            "watchdog_reserved_gib": ", ".join("-" if v is None else f"{v:g}" for v in w["recent_reserved_gib"]),
            "watchdog_last": w["last_verdict"],
            "watchdog_exiting": w["exiting"],
        }


def _when(ts: float | None) -> str | None:
    return None if ts is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))
