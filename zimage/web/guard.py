"""One rule for files, one owner for each session: the place every event handler goes through.

Gradio checks the files event handlers receive and return (`processing_utils._check_allowed`:
only uploads in; only `allowed_paths`, the working folder, the temp folder or its cache out; never
`blocked_paths`) only once `launch()` has set `blocks.has_launched`. `gr.mount_gradio_app` never
sets it, so a mounted app checks nothing: a client could name any file on the box as an input, and
a handler could hand any file out. `install()` restores Gradio's check and puts zimage's rule on
top of it, where every event passes, so a handler added later is covered without a thought:

- `Blocks.process_api` (every event, queued or not, from the page or the API): knows who asks;
  checks every file named in the payload and in the event data (a gallery's select names a
  path) before anything is read; refuses a session that belongs to another user; grants the
  files it hands out to the asker; turns any exception into a sentence (never exception text).
- `processing_utils._check_allowed` (every file Gradio moves into its cache, in or out): zimage's
  rule for the asker, then Gradio's own.
- the queue's `push`: at most `max_jobs_per_user` queued or running jobs per user.

The rule (`Access.check`): a path is made absolute without following links (a link anywhere
below the outputs folder or Gradio's cache is refused) and must be one of the asker's own outputs
or a file Gradio's cache holds for the asker (their upload, or a copy of their own image shown
to them). Admins see every space. Without logins everyone shares one space.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from zimage.service.store import OutputStore, is_output_name

log = logging.getLogger(__name__)

INTERNAL_ERROR = "Something went wrong inside the server (it is logged). The server is fine: please try again."
GRANT_TTL_S = 24 * 3600.0  # Gradio's cache keeps a shown image for hours (page.CACHE_SWEEP)
MAX_GRANTS = 200_000
MAX_SESSIONS = 100_000
MAX_DEPTH = 32  # how deep a payload is searched for file references


class Refused(gr.Error):
    """A request zimage will not serve; the message is one sentence for the user (a 4xx)."""

    def __init__(self, message: str):
        super().__init__(message, print_exception=False)


@dataclass(frozen=True)
class Viewer:
    """Who asks: a logged-in user ('' without logins), whether an admin, their session and address."""

    user: str = ""
    admin: bool = False
    session: str = ""
    address: str = ""

    @property
    def owner(self) -> str:
        """Whose space: the user's own ('' = the shared space of a studio without logins)."""
        return self.user

    @property
    def key(self) -> str:
        """Whom quotas and queue caps count: the user, else (no logins) the client address."""
        return f"user:{self.user}" if self.user else f"address:{self.address or '-'}"


SHARED = Viewer()
# Who the event being processed is for; set around Blocks.process_api.
CURRENT: ContextVar[Viewer | None] = ContextVar("zimage_viewer", default=None)
# A mutable box per HTTP request (set by the gate): a handler's refusal marks it so that the
# gate answers 400 instead of Gradio's 500 on direct calls.
REQUEST_MARKS: ContextVar[dict[str, Any] | None] = ContextVar("zimage_request_marks", default=None)


def mark_user_error() -> None:
    marks = REQUEST_MARKS.get()
    if marks is not None:
        marks["user_error"] = True


# ------------------------------------------------------------------------------------------
# the rule


class Access:
    """Who may see which file, and who owns which session."""

    def __init__(
        self,
        store: OutputStore,
        users: list[tuple[str, str]] | tuple = (),
        admins: tuple[str, ...] = (),
        cache_dir: str | os.PathLike | None = None,
    ):
        from gradio.utils import get_upload_folder

        self.store = store
        self.logins = bool(users)
        self.admins = frozenset(admins) if self.logins else frozenset()
        cache = Path(cache_dir or get_upload_folder())
        # (folder as written, the same folder with links resolved): Gradio writes either form
        self.outputs_roots = _roots(store.folder, store.root)
        self.cache_roots = _roots(cache, cache.resolve())
        # cached file -> (who was given it, when last): two users may upload the very same file
        self._grants: OrderedDict[str, tuple[frozenset[str], float]] = OrderedDict()
        self._sessions: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()

    # --- who asks --------------------------------------------------------------------------

    def viewer(self, request: Any) -> Viewer:
        """The Viewer of a gr.Request (None: the shared space, as in unit tests)."""
        if isinstance(request, list):
            request = request[0] if request else None
        if request is None:
            return SHARED
        user = str(getattr(request, "username", None) or "") if self.logins else ""
        session = str(getattr(request, "session_hash", None) or "")
        return Viewer(user, user in self.admins, session, _address(request))

    def viewer_of(self, user: str | None, address: str = "", session: str = "") -> Viewer:
        user = (user or "") if self.logins else ""
        return Viewer(user, user in self.admins, session, address)

    def claim(self, session: str | None, viewer: Viewer) -> bool:
        """A session belongs to the first logged-in user who uses it; False for anyone else."""
        if not self.logins or not session:
            return True
        with self._lock:
            owner = self._sessions.get(session)
            if owner is None:
                self._sessions[session] = viewer.user
                while len(self._sessions) > MAX_SESSIONS:
                    self._sessions.popitem(last=False)
                return True
            self._sessions.move_to_end(session)
            return owner == viewer.user

    # --- the path rule ---------------------------------------------------------------------

    def check(self, path: Any, viewer: Viewer) -> Path:
        """The real path of a file `viewer` may read, or Refused with a sentence saying why not."""
        text = os.fspath(path) if isinstance(path, (str, os.PathLike)) else ""
        if not text or "\0" in text:
            raise Refused("A file was expected here, but none was named.")
        name = _shown_name(text)
        if "://" in text[:24]:
            raise Refused(f"Files are taken as uploads only, never fetched from an address ({name}).")
        absolute = Path(os.path.abspath(text))  # '..' folded away; links are not followed
        for roots, outputs in self._places():
            real = _inside(absolute, roots, name)
            if real is None:
                continue
            if outputs:
                space = self.store.space_of(real)
                if space is None or not is_output_name(real.name) or not _regular(real):
                    raise Refused(f"{name} is not one of this studio's images.")
                if not (viewer.admin or space == self.store.space_name(viewer.owner)):
                    raise Refused(f"{name} is not one of your images.")
                return real
            if not (_regular(real) and self.granted(real, viewer)):
                raise Refused(f"{name} is not one of your images or uploads.")
            return real
        raise Refused(f"{name} is not one of your images or uploads; only those can be used here.")

    def _places(self) -> list[tuple[tuple[Path, ...], bool]]:
        # the deeper root first, should one folder lie inside the other
        places = [(self.outputs_roots, True), (self.cache_roots, False)]
        return sorted(places, key=lambda p: -len(p[0][-1].parts))

    def in_cache(self, path: str | os.PathLike) -> Path | None:
        try:
            return _inside(Path(os.path.abspath(os.fspath(path))), self.cache_roots, "")
        except Refused:
            return None

    def check_payload(self, value: Any, viewer: Viewer) -> None:
        """Check every file a payload (inputs, event data) names."""
        for path in file_references(value):
            self.check(path, viewer)

    # --- grants: which cached copies and uploads are whose ----------------------------------

    def grant(self, path: str | os.PathLike, viewer: Viewer) -> None:
        real = self.in_cache(path)
        if real is None:
            return  # outputs need no grant: their folder says whose they are
        with self._lock:
            owners, _ = self._grants.get(str(real), (frozenset(), 0.0))
            self._grants[str(real)] = (owners | {viewer.owner}, time.time())
            self._grants.move_to_end(str(real))
            while len(self._grants) > MAX_GRANTS:
                self._grants.popitem(last=False)

    def grant_all(self, value: Any, viewer: Viewer) -> None:
        for path in file_references(value):
            self.grant(path, viewer)

    def granted(self, real: Path, viewer: Viewer) -> bool:
        with self._lock:
            entry = self._grants.get(str(real))
        if entry is None or time.time() - entry[1] > GRANT_TTL_S:
            return False
        return viewer.admin or viewer.owner in entry[0]


def _roots(written: Path, real: Path) -> tuple[Path, ...]:
    absolute = Path(os.path.abspath(os.fspath(written)))
    return (absolute, real) if absolute != real else (real,)


def _inside(absolute: Path, roots: tuple[Path, ...], name: str) -> Path | None:
    """The real path of `absolute` when it lies under one of `roots` (the last one is the real
    root); Refused when a link lies on the way; None when it is elsewhere."""
    real_root = roots[-1]
    for base in roots:
        try:
            rel = absolute.relative_to(base)
        except ValueError:
            continue
        here = real_root
        for part in rel.parts:
            here = here / part
            try:
                if stat.S_ISLNK(os.lstat(here).st_mode):
                    raise Refused(f"{name} is a link, and links are never followed.")
            except FileNotFoundError:
                raise Refused(f"{name} does not exist (any more).") from None
            except OSError:
                raise Refused(f"{name} cannot be read.") from None
        return here
    return None


def _regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _shown_name(text: str) -> str:
    name = os.path.basename(text.rstrip("/")) or text
    return repr(name if len(name) <= 60 else name[:57] + "...")


def _address(request: Any) -> str:
    try:
        client = getattr(request, "client", None)
        return str(getattr(client, "host", "") or "") if client else ""
    except Exception:  # noqa: BLE001 - gr.Request delegates to a request that may be gone
        return ""


def file_references(value: Any, depth: int = 0) -> Iterator[str]:
    """Every `path` a Gradio payload names ({"path": ...} dicts, nested in lists and dicts)."""
    if depth > MAX_DEPTH:
        raise Refused("The request is nested too deeply to be read.")
    if isinstance(value, dict):
        path = value.get("path")
        if path is not None:
            yield path if isinstance(path, str) else ""
        for v in value.values():
            if isinstance(v, (dict, list, tuple)):
                yield from file_references(v, depth + 1)
    elif isinstance(value, (list, tuple)):
        for v in value:
            if isinstance(v, (dict, list, tuple)):
                yield from file_references(v, depth + 1)


# ------------------------------------------------------------------------------------------
# hooks into Gradio


def access_of(blocks: Any, store: OutputStore) -> Access:
    """The Access installed on these Blocks, else one shared space (a page built without a server)."""
    access = getattr(blocks, "_zimage_access", None)
    return access if access is not None else Access(store)


def install(blocks: gr.Blocks, access: Access, max_jobs_per_user: int) -> None:
    """Restore Gradio's file checks on the mounted Blocks and add zimage's rule (see the module doc)."""
    blocks.has_launched = True  # what launch() sets, and _check_allowed waits for
    blocks._zimage_access = access
    _patch_gradio_check()
    _wrap_process_api(blocks, access)
    _wrap_preprocess(blocks)
    _cap_queue(blocks, access, max_jobs_per_user)


def _wrap_process_api(blocks: gr.Blocks, access: Access) -> None:
    original = blocks.process_api

    async def process_api(block_fn: Any, inputs: list[Any], *args: Any, **kwargs: Any) -> dict[str, Any]:
        if isinstance(block_fn, int):
            block_fn = blocks.fns[block_fn]
        viewer = access.viewer(kwargs.get("request"))
        token = CURRENT.set(viewer)
        try:
            if not access.claim(viewer.session, viewer):
                raise Refused("This session belongs to another user; reload the page to start your own.")
            access.check_payload(inputs, viewer)
            access.check_payload(getattr(kwargs.get("event_data"), "_data", None), viewer)
            output = await original(block_fn, inputs, *args, **kwargs)
        except gr.Error:
            mark_user_error()
            raise
        except Exception:
            log.exception("event handler %s failed", getattr(block_fn, "name", "?"))
            raise gr.Error(INTERNAL_ERROR, print_exception=False) from None
        finally:
            CURRENT.reset(token)
        access.grant_all(output.get("data"), viewer)
        return output

    blocks.process_api = process_api


def _wrap_preprocess(blocks: gr.Blocks) -> None:
    """Values Gradio cannot take (too few, wrong shape) become one sentence, not Gradio's text
    (which prints component objects and the values received)."""
    original = blocks.preprocess_data

    async def preprocess_data(block_fn: Any, inputs: list[Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return await original(block_fn, inputs, *args, **kwargs)
        except Refused:
            raise
        except gr.Error as exc:  # a component's own check ("Value: 'x' is not in the list of choices: [...]")
            raise Refused(_PYTHON_TYPE.sub("", exc.message)) from None
        except Exception as exc:  # noqa: BLE001 - the client sent something Gradio could not take
            log.info("refused the values sent to %s: %s", getattr(block_fn, "name", "?"), str(exc)[:300])
            raise Refused(_bad_values(block_fn, inputs)) from None

    blocks.preprocess_data = preprocess_data


_PYTHON_TYPE = re.compile(r" \(type: <class '[^']*'>\)")


def _bad_values(block_fn: Any, inputs: Any) -> str:
    wanted = [b for b in getattr(block_fn, "inputs", []) if not getattr(b, "stateful", False)]
    labels = ", ".join(str(getattr(b, "label", None) or type(b).__name__).lower() for b in wanted)
    got = len(inputs) if isinstance(inputs, list) else 0
    if got < len(getattr(block_fn, "inputs", [])):
        return (
            f"This action takes {len(wanted)} value(s) ({labels}) but got {got}: send all of them "
            "(the API page lists them with their defaults)."
        )
    return f"The values sent could not be used: this action takes {len(wanted)} value(s) ({labels})."


_GRADIO_CHECK: Callable[..., None] | None = None
_PATCH_LOCK = threading.Lock()


def _patch_gradio_check() -> None:
    """Every file Gradio moves into its cache (handler inputs and outputs) passes the asker's rule,
    then Gradio's own check; Gradio's refusal text (server paths, launch() advice) becomes a sentence."""
    global _GRADIO_CHECK
    from gradio import processing_utils
    from gradio.context import LocalContext
    from gradio.exceptions import InvalidPathError

    with _PATCH_LOCK:
        if _GRADIO_CHECK is not None:
            return
        _GRADIO_CHECK = gradio_check = processing_utils._check_allowed

        def _check_allowed(path: str | Path, check_in_upload_folder: bool) -> None:
            blocks = LocalContext.blocks.get(None)
            access = getattr(blocks, "_zimage_access", None)
            viewer = CURRENT.get()
            if access is not None and viewer is not None:
                access.check(path, viewer)
            try:
                gradio_check(path, check_in_upload_folder)
            except InvalidPathError:
                raise Refused(f"{_shown_name(os.fspath(path))} is not one of your images or uploads.") from None

        processing_utils._check_allowed = _check_allowed


def _cap_queue(blocks: gr.Blocks, access: Access, limit: int) -> None:
    """At most `limit` queued or running jobs per user (address without logins): one person
    cannot fill the queue, and everyone else keeps their place. The 429 counts as 'rejected' in
    /metrics (server._Watch)."""
    from fastapi import HTTPException

    queue = blocks._queue
    original = queue.push
    lock: list[asyncio.Lock] = []

    async def push(body: Any, request: Any, username: str | None) -> Any:
        if not lock:
            lock.append(asyncio.Lock())
        viewer = access.viewer_of(username, _address(request))
        async with lock[0]:  # counting and joining are one step: two calls cannot both slip in
            mine = sum(1 for event in _queued_events(queue) if _event_key(event, access) == viewer.key)
            if mine >= limit:
                log.info("queue: %s already has %d job(s) queued or running; refused one more", viewer.key, mine)
                raise HTTPException(
                    status_code=429,
                    detail=f"You already have {mine} job(s) queued or running, the most one person may have "
                    "at once. Wait for one to finish (or cancel one), then try again.",
                )
            return await original(body, request, username)

    queue.push = push


def _queued_events(queue: Any) -> Iterator[Any]:
    for event_queue in list(queue.event_queue_per_concurrency_id.values()):
        yield from list(event_queue.queue)
    for batch in list(queue.active_jobs):
        if batch:
            yield from list(batch)


def _event_key(event: Any, access: Access) -> str:
    return access.viewer_of(getattr(event, "username", None), _address(getattr(event, "request", None))).key
