"""The History tab: saved outputs newest first, a page at a time, searchable by prompt, deletable.

Each PNG's parameters are read once (its text chunks, not its pixels) and cached by name and
modification time, so a search over a few thousand outputs reads each file at most once."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

from zimage.service.store import is_output_name, read_parameters, seed_in_name
from zimage.web.i18n import t

log = logging.getLogger(__name__)

PAGE = 24  # images per "load more"
ALL = 1_000_000


class History:
    """Reads the store's outputs for the page; `user` is who asks ("" without logins)."""

    def __init__(self, store: Any):
        self.store = store
        self._meta: dict[str, tuple[float, dict[str, Any]]] = {}  # path -> (mtime, parameters)
        self._lock = threading.Lock()

    def _files(self, user: str) -> list[Path]:
        """This user's outputs where the store keeps a space per user (history(limit, owner)), else
        the one shared outputs folder."""
        try:
            return self.store.history(ALL, user)
        except TypeError:
            return self.store.history(ALL)

    def _params(self, path: Path) -> dict[str, Any]:
        try:
            mtime = path.stat().st_mtime
        except OSError:
            return {}
        key = str(path)
        with self._lock:
            hit = self._meta.get(key)
        if hit and hit[0] == mtime:
            return hit[1]
        try:
            params = read_parameters(path)
        except Exception:  # noqa: BLE001 - a damaged file is listed without parameters
            params = {}
        with self._lock:
            self._meta[key] = (mtime, params)
        return params

    def entries(self, query: str, user: str) -> list[Path]:
        """Newest first; with a query, only those whose prompt contains every word of it (any case)."""
        words = [w for w in (query or "").lower().split() if w]
        files = self._files(user)
        if not words:
            return files
        out = []
        for path in files:
            params = self._params(path)
            if all(w in str(params.get("prompt", "")).lower() for w in words):
                out.append(path)
        return out

    def page(self, query: str, shown: int, user: str, lang: str, more: bool = False):
        """(gallery items, count line, how many are shown, the load-more button update)."""
        import gradio as gr

        entries = self.entries(query, user)
        n = max(PAGE, int(shown or 0) + (PAGE if more else 0))
        items = [(str(p), caption(p, self._params(p))) for p in entries[:n]]
        total = len(entries)
        if query and not total:
            line = t(lang, "history_none_match", q=query)
        elif not total:
            line = t(lang, "history_empty")
        else:
            line = t(lang, "history_count", shown=min(n, total), total=total)
        return items, line, min(n, total), gr.update(visible=total > n)

    def delete(self, shown_path: str, user: str) -> bool:
        """Delete one output by the name of the file the page showed (Gradio shows a cached copy of
        it): only a file this store named, inside this user's outputs, never through a link."""
        name = Path(shown_path).name
        if not is_output_name(name):
            return False
        for path in self._files(user):
            if path.name == name:
                try:
                    if path.is_symlink() or not path.is_file():
                        return False
                    path.unlink()
                except OSError as exc:
                    log.warning("could not delete %s: %s", path, exc)
                    return False
                log.info("deleted %s (user=%s)", path, user or "-")
                with self._lock:
                    self._meta.pop(str(path), None)
                return True
        return False


def caption(path: Path, params: dict[str, Any]) -> str:
    """Full seed, date and prompt: 'seed 3141592653 · 2026-11-21 17:45\\na red fox in the snow'."""
    seed = params.get("seed", seed_in_name(path.name))
    when = params.get("created") or ""
    if not when:
        try:
            when = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(path.stat().st_mtime))
        except OSError:
            when = ""
    when = when.replace("T", " ")[:16]
    prompt = " ".join(str(params.get("prompt", "")).split())
    if len(prompt) > 160:
        prompt = prompt[:157] + "…"
    head = " · ".join(x for x in (f"seed {seed}" if seed is not None else path.stem, when) if x)
    return f"{head}\n{prompt}" if prompt else head
