"""The gate: ASGI middleware in front of every route (ours and the mounted Gradio app's).

- With logins, every route but /health, /ready, /metrics and what the login page itself needs
  answers 401 without a login (Gradio leaves /cancel, /heartbeat, /stream and others open).
- A session (Gradio's `session_hash`) and a queued event belong to the user who first used them:
  nobody else may listen to, join, heartbeat or cancel them.
- File downloads (/gradio_api/file=...) pass `Access.check`: only the asker's own outputs and the
  cached copies and uploads granted to them; links, other users' images and everything else on the
  box are refused.
- Uploads count against a per-user quota (bytes and files per hour) and are granted to the uploader.
- Logins are throttled: after a few failures in a row for a user name or from an address, each
  next attempt must wait twice as long (up to a cap); every failure and refusal is logged.
- A direct call (/gradio_api/run/...) refused by zimage answers 400, not Gradio's 500.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any

from zimage.web.guard import REQUEST_MARKS, Access, Refused, Viewer
from zimage.web.limits import LoginThrottle, UploadQuota

log = logging.getLogger(__name__)

API = "/gradio_api"
# What the login page needs before anyone is logged in (it holds no one's data).
OPEN_PATHS = frozenset(
    {
        "/health",
        "/ready",
        "/metrics",
        "/",
        "/login",
        "/login/",
        "/logout",
        "/favicon.ico",
        "/robots.txt",
        "/manifest.json",
        "/theme.css",
        f"{API}/theme.css",
    }
)
# Gradio routes the studio never uses; process_recording is an unmetered upload running ffmpeg.
UNUSED_PREFIXES = (f"{API}/process_recording", f"{API}/proxy=", f"{API}/vibe-", "/monitoring")
OPEN_PREFIXES = ("/assets/", "/static/", "/svelte/", "/pwa_icon", f"{API}/assets/", f"{API}/static/")
MAX_JSON_BODY = 4 << 20  # a request's JSON (prompts, paths) is small; uploads go through /upload
MAX_LOGIN_BODY = 64 << 10

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class Gate:
    def __init__(self, app: Any, policy: GatePolicy):
        self.app = app
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        marks: dict[str, Any] = {}
        token = REQUEST_MARKS.set(marks)
        try:
            await self.policy.handle(self.app, scope, receive, send, marks)
        finally:
            REQUEST_MARKS.reset(token)


class GatePolicy:
    """What the gate decides; `gradio_app()` gives the mounted Gradio App (its login tokens and queue)."""

    def __init__(self, access: Access, settings: Any, gradio_app: Callable[[], Any], auth_message: str = ""):
        self.access = access
        self.settings = settings
        self.gradio_app = gradio_app
        self.auth_message = auth_message
        self.quota = UploadQuota(settings.upload_quota_mb * 1_000_000, settings.upload_quota_files)
        self.throttle = LoginThrottle(settings.login_max_delay_s)

    # --- who asks --------------------------------------------------------------------------

    def user(self, scope: Scope) -> str | None:
        app = self.gradio_app()
        if app is None:
            return None
        cookies = _cookies(scope)
        token = cookies.get(f"access-token-{app.cookie_id}") or cookies.get(f"access-token-unsecure-{app.cookie_id}")
        return app.tokens.get(token) if token else None

    # --- the routes --------------------------------------------------------------------------

    async def handle(self, app: Any, scope: Scope, receive: Receive, send: Send, marks: dict[str, Any]) -> None:
        path: str = scope["path"]
        method = scope.get("method", "GET")
        address = _client(scope)
        if method == "POST" and path in ("/login", "/login/"):
            await self._login(app, scope, receive, send, address)
            return
        user = self.user(scope)
        if self.access.logins and user is None and not _open(path):
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
            else:
                await _json(send, 401, {"detail": {"error": "Not authenticated", "auth_message": self.auth_message}})
            return
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        if path.startswith(UNUSED_PREFIXES):
            await _json(send, 404, {"detail": "Not Found"})
            return
        viewer = self.access.viewer_of(user, address)
        if path.startswith(f"{API}/file=") or path.startswith(f"{API}/file/"):
            await self._file(app, scope, receive, send, viewer, path)
            return
        if path == f"{API}/upload" and method == "POST":
            await self._upload(app, scope, receive, send, viewer)
            return
        if path.startswith(f"{API}/") and self.access.logins:
            refusal = self._foreign_path(path, scope, viewer)
            if refusal is None and method == "POST" and _is_json(scope):
                body, receive = await _buffered(receive, MAX_JSON_BODY)
                if body is None:
                    await _json(send, 413, {"detail": "The request is too large."})
                    return
                refusal = self._foreign_body(body, viewer)
            if refusal is not None:
                log.warning("refused %s %s to %s: %s", method, path, viewer.key, refusal)
                await _json(send, 403, {"detail": refusal})
                return
        if method == "POST" and (path.startswith(f"{API}/run/") or path.startswith(f"{API}/api/")):
            send = _user_errors_are_400(send, marks)
        await app(scope, receive, send)

    # --- sessions and events: whose are they ---------------------------------------------

    def _foreign_path(self, path: str, scope: Scope, viewer: Viewer) -> str | None:
        parts = path[len(API) + 1 :].split("/")
        session = _query(scope).get("session_hash")
        if parts[0] == "heartbeat" and len(parts) > 1:
            session = parts[1]
        elif parts[0] == "stream" and len(parts) > 3:  # stream/{session}/{run}/{component}/...
            session = parts[1]
        elif parts[0] == "stream" and len(parts) > 1:  # stream/{event_id}[/close]
            return self._foreign_event(parts[1], viewer)
        elif parts[0] == "call" and len(parts) > 2:
            return self._foreign_event(parts[-1], viewer)
        if session and not self.access.claim(session, viewer):
            return "That session belongs to another user."
        return None

    def _foreign_body(self, body: bytes, viewer: Viewer) -> str | None:
        try:
            data = json.loads(body) if body else {}
        except ValueError:
            return None  # Gradio answers malformed JSON itself
        if not isinstance(data, dict):
            return None
        session = data.get("session_hash")
        if isinstance(session, str) and session and not self.access.claim(session, viewer):
            return "That session belongs to another user."
        event_id = data.get("event_id")
        if isinstance(event_id, str) and event_id:
            return self._foreign_event(event_id, viewer)
        return None

    def _foreign_event(self, event_id: str, viewer: Viewer) -> str | None:
        app = self.gradio_app()
        try:
            event = app.get_blocks()._queue.event_ids_to_events.get(event_id) if app else None
        except Exception:  # noqa: BLE001 - Gradio internals: refuse nothing we cannot see
            event = None
        if event is not None and (getattr(event, "username", None) or "") != viewer.user:
            return "That job belongs to another user."
        return None

    # --- files ------------------------------------------------------------------------------

    async def _file(self, app: Any, scope: Scope, receive: Receive, send: Send, viewer: Viewer, path: str) -> None:
        named = path.split("=", 1)[1] if "=" in path else path[len(f"{API}/file/") :]
        try:
            self.access.check(named, viewer)
        except Refused as exc:
            log.warning("refused file %r to %s: %s", named[:200], viewer.key, exc.message)
            code = 404 if "does not exist" in exc.message else 403
            await _json(send, code, {"detail": exc.message})
            return
        await app(scope, receive, send)

    async def _upload(self, app: Any, scope: Scope, receive: Receive, send: Send, viewer: Viewer) -> None:
        length = _content_length(scope)
        refusal, room = self.quota.check(viewer.key, length or 0)
        if refusal is not None:
            log.warning("upload refused for %s: %s", viewer.key, refusal)
            await _json(send, 429, {"detail": refusal})
            return
        received = 0
        over = False

        async def counting() -> dict[str, Any]:
            nonlocal received, over
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > room:
                    over = True
                    return {"type": "http.disconnect"}
            return message

        status, headers, body = await _captured(app, scope, counting)
        if over:
            log.warning("upload refused for %s: over the hourly quota while receiving", viewer.key)
            await _json(send, 429, {"detail": self.quota.over_message(viewer.key)})
            return
        files: list[str] = []
        if status == 200:
            try:
                files = [p for p in json.loads(body) if isinstance(p, str)]
            except ValueError:
                files = []
            for p in files:
                self.access.grant(p, viewer)
            self.quota.record(viewer.key, received, len(files), files)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    # --- logins -----------------------------------------------------------------------------

    async def _login(self, app: Any, scope: Scope, receive: Receive, send: Send, address: str) -> None:
        body, replay = await _buffered(receive, MAX_LOGIN_BODY)
        if body is None:
            await _json(send, 413, {"detail": "The login request is too large."})
            return
        name = await _form_username(scope, body)
        keys = (f"user:{name.lower()}", f"address:{address}")
        wait = self.throttle.wait(keys)
        if wait > 0:
            self.throttle.log_refusal(name, address, wait)
            await _json(
                send,
                429,
                {"detail": f"Too many failed logins: wait {math.ceil(wait)} s before the next attempt."},
                [(b"retry-after", str(math.ceil(wait)).encode())],
            )
            return
        status: list[int] = []

        async def watch(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        await app(scope, replay, watch)
        if status and status[0] == 200:
            self.throttle.success(keys)
            log.info("login: %r from %s", name, address)
        elif status and 400 <= status[0] < 500:
            count, delay = self.throttle.failure(keys)
            log.warning(
                "login failed for %r from %s (%d failure(s) in a row)%s",
                name,
                address,
                count,
                f"; the next attempt must wait {delay:g} s" if delay else "",
            )


# ------------------------------------------------------------------------------------------
# ASGI helpers


def _open(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


def _client(scope: Scope) -> str:
    client = scope.get("client")
    return str(client[0]) if client else ""


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}


def _cookies(scope: Scope) -> dict[str, str]:
    from starlette.requests import cookie_parser

    return cookie_parser(_headers(scope).get("cookie", ""))


def _query(scope: Scope) -> dict[str, str]:
    from urllib.parse import parse_qsl

    return dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))


def _is_json(scope: Scope) -> bool:
    return _headers(scope).get("content-type", "").split(";")[0].strip() in ("application/json", "")


def _content_length(scope: Scope) -> int | None:
    try:
        return int(_headers(scope)["content-length"])
    except (KeyError, ValueError):
        return None


async def _buffered(receive: Receive, limit: int) -> tuple[bytes | None, Receive]:
    """The whole request body (None when over `limit`), and a receive that replays it."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None, receive
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    body = b"".join(chunks)
    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return body, replay


async def _captured(app: Any, scope: Scope, receive: Receive) -> tuple[int, list, bytes]:
    """Run the app and keep its (small) response: (status, headers, body)."""
    start: dict[str, Any] = {}
    chunks: list[bytes] = []

    async def keep(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            start.update(message)
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await app(scope, receive, keep)
    return start.get("status", 500), list(start.get("headers", [])), b"".join(chunks)


async def _form_username(scope: Scope, body: bytes) -> str:
    from starlette.requests import Request

    async def once() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(scope, once).form()
        return str(form.get("username") or "").strip()[:100]
    except Exception:  # noqa: BLE001 - a malformed form: Gradio refuses it; the throttle keys the address
        return ""


def _user_errors_are_400(send: Send, marks: dict[str, Any]) -> Send:
    async def rewrite(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start" and message["status"] == 500 and marks.get("user_error"):
            message = dict(message, status=400)
        await send(message)

    return rewrite


async def _json(send: Send, status: int, body: Any, extra: list[tuple[bytes, bytes]] | None = None) -> None:
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers + (extra or [])})
    await send({"type": "http.response.body", "body": data})
