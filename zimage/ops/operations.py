"""Long-running duties beside the server: the purge thread and the memory watchdog.

The server creates one Operations object after the engine, calls start() once the app
serves and stop() on shutdown, and shows status() in the profiler panel.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from zimage.ops.purge import PurgePolicy, Purger
from zimage.ops.watchdog import WATCHDOG_EXIT_CODE, MemoryWatchdog
from zimage.units import human_bytes

log = logging.getLogger(__name__)

# After request_exit, how long beyond the shutdown grace the graceful path may take (cancel
# the job, flush PNGs, tear down) before the watchdog exits hard.
HARD_EXIT_MARGIN_S = 90.0

__all__ = ["Operations", "WATCHDOG_EXIT_CODE", "gradio_cache_dir"]


def gradio_cache_dir(environ: Mapping[str, str] | None = None) -> Path:
    """Where Gradio copies the files it serves: as gradio.utils.get_upload_folder() computes it.

    Copied rather than imported so this module does not pull in gradio; a test checks that
    both agree. Gradio reads GRADIO_TEMP_DIR itself, so that is the variable to set."""
    environ = os.environ if environ is None else environ
    return Path(environ.get("GRADIO_TEMP_DIR") or (Path(tempfile.gettempdir()) / "gradio")).resolve()


class Operations:
    def __init__(
        self,
        engine: Any,
        settings: Any,
        request_exit: Callable[[int], None],
        cache_dirs: Sequence[str | os.PathLike] | None = None,
    ):
        """cache_dirs: folders cleaned the way Gradio's cache is laid out; None means Gradio's
        own cache folder (GRADIO_TEMP_DIR or its default), [] none."""
        self.engine = engine
        self.settings = settings
        self.request_exit = request_exit
        caches = [gradio_cache_dir()] if cache_dirs is None else list(cache_dirs)
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
