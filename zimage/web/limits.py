"""Per-user limits kept in memory: the upload quota and the login throttle (pure, tested alone)."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict, deque

log = logging.getLogger("zimage.web.gate")  # one logger for what the gate decides

QUOTA_WINDOW_S = 3600.0
# Gradio stores an upload under the SHA-256 of its bytes, so sending the same file again adds
# nothing to the disk; Gradio's ImageEditor does exactly that on every page update while it holds
# strokes (the live profiler updates the page each second). Such repeats are free of the hourly
# quota but limited per minute, so that nobody streams one file at the server for free.
REPEATS_PER_MINUTE = 300
REPEAT_BYTES_PER_MINUTE = 512_000_000  # and bytes: about 8.5 MB a second, one 16 MB file every 2 s
FREE_LOGIN_FAILURES = 5  # a few typos cost nothing (fail2ban's default too)
MAX_TRACKED = 20_000  # keys remembered at most (an attacker may make up names)


class UploadQuota:
    """Bytes and files per key (a user, or an address without logins) over the last hour."""

    def __init__(self, max_bytes: int, max_files: int, window_s: float = QUOTA_WINDOW_S):
        self.max_bytes = max_bytes  # 0 = no limit
        self.max_files = max_files
        self.window_s = window_s
        self._used: dict[str, deque[tuple[float, int, int]]] = {}
        self._stored: dict[str, dict[str, float]] = {}  # key -> stored path -> when it was last sent
        self._repeats: dict[str, deque[tuple[float, int]]] = {}
        self._lock = threading.Lock()

    def _totals(self, key: str) -> tuple[int, int]:
        now = time.time()
        entries = self._used.get(key)
        if not entries:
            return 0, 0
        while entries and now - entries[0][0] > self.window_s:
            entries.popleft()
        return sum(e[1] for e in entries), sum(e[2] for e in entries)

    def check(self, key: str, incoming: int) -> tuple[str | None, float]:
        """(a refusal or None, how many more bytes this upload may bring)."""
        with self._lock:
            used_bytes, used_files = self._totals(key)
            repeats, repeat_bytes = self._recent_repeats(key)
        if repeats >= REPEATS_PER_MINUTE or repeat_bytes >= REPEAT_BYTES_PER_MINUTE:
            return (
                f"You sent {repeats} files ({repeat_bytes / 1e6:.0f} MB) again within a minute, the most "
                "allowed; try again later.",
                0,
            )
        if self.max_files and used_files >= self.max_files:
            return (
                f"You have uploaded {used_files} files in the last hour, the most allowed; try again later.",
                0,
            )
        room = self.max_bytes - used_bytes if self.max_bytes else math.inf
        if incoming > room:
            return self.over_message(key, incoming), 0
        return None, room

    def over_message(self, key: str, incoming: int = 0) -> str:
        with self._lock:
            used_bytes, _ = self._totals(key)
        size = f"this upload ({incoming / 1e6:.1f} MB)" if incoming else "this upload"
        return (
            f"The upload quota is {self.max_bytes / 1e6:.0f} MB per hour and you have used {used_bytes / 1e6:.1f} MB: "
            f"{size} does not fit; try again later."
        )

    def _recent_repeats(self, key: str) -> tuple[int, int]:
        entries = self._repeats.get(key)
        now = time.time()
        while entries and now - entries[0][0] > 60.0:
            entries.popleft()
        return (len(entries), sum(e[1] for e in entries)) if entries else (0, 0)

    def record(self, key: str, nbytes: int, nfiles: int, paths: list[str] | None = None) -> bool:
        """Count an upload; False when it only repeated files this key stored within the window
        (the same bytes land on the same path: nothing new on the disk), which counts as a repeat."""
        now = time.time()
        with self._lock:
            stored = self._stored.setdefault(key, {})
            for path, when in list(stored.items()):
                if now - when > self.window_s:
                    del stored[path]
            repeat = bool(paths) and all(p in stored for p in paths)
            for p in paths or ():
                stored[p] = now
            if repeat:
                self._repeats.setdefault(key, deque()).append((now, nbytes))
            else:
                self._used.setdefault(key, deque()).append((now, nbytes, nfiles))
            for table in (self._used, self._stored, self._repeats):
                if len(table) > MAX_TRACKED:
                    table.pop(next(iter(table)))
        return not repeat


class LoginThrottle:
    """Failed logins in a row per key: the first few are free, then each next attempt waits 1 s,
    2 s, 4 s, ... (up to max_delay_s) after the last failure. A success clears the keys."""

    def __init__(self, max_delay_s: float):
        self.max_delay_s = max_delay_s
        self._fails: OrderedDict[str, tuple[int, float]] = OrderedDict()
        self._logged: dict[str, float] = {}
        self._lock = threading.Lock()

    def delay(self, count: int) -> float:
        if not self.max_delay_s or count < FREE_LOGIN_FAILURES:
            return 0.0
        return min(self.max_delay_s, 2.0 ** (count - FREE_LOGIN_FAILURES))

    def wait(self, keys: tuple[str, ...]) -> float:
        now = time.monotonic()
        with self._lock:
            waits = [last + self.delay(n) - now for n, last in (self._fails.get(k, (0, 0.0)) for k in keys)]
        return max(0.0, *waits)

    def failure(self, keys: tuple[str, ...]) -> tuple[int, float]:
        """Count a failure; (failures in a row for the first key, the wait before its next attempt)."""
        now = time.monotonic()
        with self._lock:
            for k in keys:
                n, _ = self._fails.pop(k, (0, 0.0))
                self._fails[k] = (n + 1, now)
            while len(self._fails) > MAX_TRACKED:
                self._fails.popitem(last=False)
            count = self._fails[keys[0]][0]
            return count, max(self.delay(self._fails[k][0]) for k in keys)

    def success(self, keys: tuple[str, ...]) -> None:
        with self._lock:
            for k in keys:
                self._fails.pop(k, None)

    def log_refusal(self, name: str, address: str, wait: float) -> None:
        """One line per user and address per second at most: a flood of attempts is no flood of lines."""
        now = time.monotonic()
        key = f"{name}\0{address}"
        with self._lock:
            if now - self._logged.get(key, 0.0) < 1.0:
                return
            self._logged[key] = now
            if len(self._logged) > MAX_TRACKED:
                self._logged.clear()
        log.warning("login attempt for %r from %s refused: throttled for %.1f s more", name, address, wait)
