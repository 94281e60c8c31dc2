"""The web server: FastAPI with /health, /ready and /metrics, and the studio mounted at /.

uvicorn runs in the main thread (not `demo.launch()`), so a SIGTERM or SIGINT drains instead
of killing: the engine stops taking jobs, the running job gets `shutdown_grace_s` to finish
(then it is cancelled), queued PNG writes are flushed, and the process exits 0. A second
signal stops at once. `Operations.request_exit(code)` (the memory watchdog) takes the same
path and makes `run()` return its code, so Supervisor restarts the process.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from zimage.errors import EXIT_BAD_INPUT, EXIT_FAILED, SettingsError
from zimage.settings import Settings, parse_user

log = logging.getLogger(__name__)

AUTH_MESSAGE = "zimage studio: log in with the user name and password your admin gave you."
UVICORN_GRACE_S = 3.0  # after the engine drained: open browser streams get this long to close
# After the last result went out, its browser or client still fetches the image files: keep
# serving until no file was asked for during this long (at most DOWNLOAD_LINGER_MAX_S).
DOWNLOAD_QUIET_S = 2.0
DOWNLOAD_LINGER_MAX_S = 15.0


# ------------------------------------------------------------------------------------------
# auth and share policy (pure: tested without a server)


def read_users(settings: Settings) -> list[tuple[str, str]]:
    """(user, password) pairs from --auth / ZIMAGE_AUTH and the auth file; [] means no login."""
    entries: list[tuple[str, str]] = [(e, "--auth") for e in settings.auth]
    if settings.auth_file:
        path = Path(settings.auth_file).expanduser()
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise SettingsError(f"Setting 'auth_file': cannot read {path} ({exc.strerror or exc}).") from None
        for n, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if line and not line.startswith("#"):
                entries.append((line, f"line {n} of {path}"))
    return [parse_user(entry, where) for entry, where in entries]


def check_admins(settings: Settings, users: list[tuple[str, str]]) -> None:
    """Admins must be users who can log in."""
    if not settings.admins:
        return
    if not users:
        raise SettingsError(
            "Setting 'admins' needs logins: without --auth (or ZIMAGE_AUTH, or --auth-file) everyone shares "
            "one space anyway. Add logins or drop 'admins'."
        )
    names = {u for u, _ in users}
    unknown = [a for a in settings.admins if a not in names]
    if unknown:
        raise SettingsError(
            f"Setting 'admins' names {', '.join(map(repr, unknown))}, who cannot log in: add them to the logins."
        )


def check_share(settings: Settings, users: list[tuple[str, str]]) -> None:
    """A share link is public: refuse it without a login unless asked for on purpose."""
    if settings.share and not users and not settings.share_without_auth:
        raise SettingsError(
            "--share makes the studio reachable by anyone on the internet, so it needs a login: add "
            "--auth user:password (or ZIMAGE_AUTH, or --auth-file). To share without one on purpose, "
            "add --share-without-auth."
        )


def checkout_folder() -> Path:
    """The folder holding app.py and zimage/."""
    return Path(__file__).resolve().parents[2]


def check_outputs_dir(outputs_dir: str, config: str | None, auth_file: str | None) -> None:
    """Refuse an outputs folder that holds what must never be served: '/', the home folder, the
    checkout, or a folder holding the settings file, the auth file or the logs."""
    outputs = Path(outputs_dir).expanduser().resolve()
    checkout = checkout_folder()
    guarded: list[tuple[Path, str]] = [
        (Path("/"), "the root of the file system"),
        (Path.home().resolve(), "the home folder"),
        (checkout, "the checkout of zimage's own code"),
        (checkout / "logs", "the logs"),
        (checkout / "zimage.yaml", "the settings file"),
        (Path("zimage.yaml").resolve(), "the settings file zimage.yaml of the working folder"),
    ]
    if config:
        guarded.append((Path(config).expanduser().resolve(), "the settings file"))
    if auth_file:
        guarded.append((Path(auth_file).expanduser().resolve(), "the auth file"))
    for path, what in guarded:
        if path == outputs or path.is_relative_to(outputs):
            relation = "is" if path == outputs else "holds"
            raise SettingsError(
                f"Setting 'outputs_dir' is {outputs}, which {relation} {what}: the studio serves files from its "
                f"outputs folder, so give it a folder of its own (for example {checkout / 'outputs'})."
            )


def _never_served(settings: Settings) -> list[str]:
    """Gradio's blocked_paths: the settings file, the auth file and the logs, whatever else allows them."""
    paths = [checkout_folder() / "logs", checkout_folder() / "zimage.yaml", Path("zimage.yaml").resolve()]
    for name in (settings.config, settings.auth_file):
        if name:
            paths.append(Path(name).expanduser().resolve())
    return [str(p) for p in paths]


# ------------------------------------------------------------------------------------------
# the app


class _Watch:
    """ASGI middleware: counts queue refusals (503 full, 429 too many of one user's on .../queue/join)
    as 'rejected' requests,
    and notes when files were last downloaded (so a drain lets the last results be fetched)."""

    def __init__(self, app, on_refused, on_file):
        self.app = app
        self.on_refused = on_refused
        self.on_file = on_file

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if "/file=" in path:
            self.on_file()
            try:
                await self.app(scope, receive, send)
            finally:
                self.on_file()
            return
        if not path.endswith("/queue/join"):
            await self.app(scope, receive, send)
            return

        async def watch(message):
            if message["type"] == "http.response.start" and message["status"] in (503, 429):
                self.on_refused()
            await send(message)

        await self.app(scope, receive, watch)


class WebServer:
    """The engine, the operations and the page, behind one FastAPI app."""

    def __init__(self, settings: Settings, users: list[tuple[str, str]] | None = None, engine: Any = None):
        from zimage.ops.operations import Operations, prepare_gradio_cache

        prepare_gradio_cache(settings.gradio_cache_dir)  # zimage's own Gradio cache, before Gradio loads

        from zimage.service.engine import Engine

        self.settings = settings
        self.users = read_users(settings) if users is None else users
        check_outputs_dir(settings.outputs_dir, settings.config, settings.auth_file)
        check_admins(settings, self.users)
        self.engine = engine if engine is not None else Engine(settings)
        from zimage.web.page import build_ui  # Gradio: imported while the model loads (see run)

        self.ops = Operations(self.engine, settings, self.request_exit)
        self.blocks = build_ui(self.engine, self.ops, settings)
        self.engine.waiting_elsewhere = self._waiting_in_gradio  # load-aware steps count these too
        log.info("page built %.1fs after the process started", self.engine.timeline.elapsed())
        self.exit_code = 0
        self.draining = threading.Event()
        self.share_url: str | None = None
        self._lock = threading.Lock()
        self._uvicorn: Any = None
        self._gradio_app: Any = None
        self._drained = threading.Event()
        self._last_file = 0.0  # time.monotonic() of the last file download
        self._forced = False
        self.engine.metrics.on_scrape(self._refresh_queue_metric)
        self.app = self._build_app()

    # --- routes --------------------------------------------------------------------------

    def _build_app(self):
        import gradio as gr
        from fastapi import FastAPI
        from fastapi.responses import JSONResponse, Response
        from prometheus_client import CONTENT_TYPE_LATEST

        from zimage.web.api import ApiDefaults
        from zimage.web.page import page_options

        s = self.settings
        engine = self.engine

        @contextlib.asynccontextmanager
        async def lifespan(_app):
            engine.start_loading()  # the page is up meanwhile; /ready and the banner show progress
            self.ops.start()
            if s.share:
                threading.Thread(target=self._open_share, name="share-link", daemon=True).start()
            log.info("zimage studio serving on %s", self.local_url)
            yield
            self.ops.stop()

        from zimage.web.gate import Gate, GatePolicy
        from zimage.web.guard import Access, install

        app = FastAPI(title="zimage", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
        app.add_middleware(_Watch, on_refused=self._queue_refused, on_file=self._file_served)
        app.add_middleware(ApiDefaults, blocks=self.blocks)  # REST calls may leave out all but the prompt
        self.access = Access(engine.store, self.users, s.admins)
        # outermost: nothing reaches a route (ours or Gradio's) before the gate has looked at it
        app.add_middleware(Gate, policy=GatePolicy(self.access, s, lambda: self._gradio_app, AUTH_MESSAGE))

        @app.get("/health")
        def health():
            return {"status": "ok", "uptime_s": round(time.time() - engine.started, 1)}

        @app.get("/ready")
        def ready():
            body, code = self.readiness()
            return JSONResponse(body, status_code=code)

        @app.get("/metrics")
        def metrics():
            return Response(engine.metrics.render(), media_type=CONTENT_TYPE_LATEST)

        gr.mount_gradio_app(
            app,
            self.blocks,
            path="/",
            auth=self.users or None,
            auth_message=AUTH_MESSAGE,
            root_path=s.root_path or None,
            # Gradio's own file check (restored by guard.install) lets handlers hand out outputs and
            # never what sits next to the studio; zimage's rule on top keeps each user to their own.
            allowed_paths=[str(engine.store.root)],
            blocked_paths=_never_served(s),
            # a gr.Error's sentence still reaches the user; any other exception's text does not
            show_error=False,
            ssr_mode=False,
            footer_links=["api", "settings"],
            run_history=False,
            mcp_server=False,
            max_file_size=f"{s.max_upload_mb}mb",
            **page_options(),
        )
        from gradio.routes import App
        from starlette.routing import Mount

        self._gradio_app = next(r.app for r in app.routes if isinstance(r, Mount) and isinstance(r.app, App))
        install(self.blocks, self.access, s.max_jobs_per_user)
        return app

    def _end_streams(self) -> None:
        """End the browsers' heartbeat streams (on the event loop), so uvicorn need not cut them off."""
        stop = getattr(self._gradio_app, "stop_event", None)
        if stop is not None:
            stop.set()

    def readiness(self) -> tuple[dict[str, Any], int]:
        """(/ready body, status): 200 once loaded and warmed, else 503 and why."""
        engine = self.engine
        if self.draining.is_set():
            return {"ready": False, "reason": "shutting down: no new jobs"}, 503
        load = engine.timeline.snapshot()
        if engine.ready:
            storage = engine.storage()
            if not storage.ok:  # honest: new jobs are refused, or their images cannot be saved
                return {"ready": False, "reason": storage.reason, "outputs_free_bytes": storage.free_bytes}, 503
            st = engine.status()
            speed = st["speed"]
            return {
                "ready": True,
                "status": engine.speed_phrase(),
                "full_speed": bool(speed.get("full_speed")),
                "full_speed_in_s": speed.get("eta_s"),
                "compile": speed.get("state"),
                "model": st["model"],
                "device": st["device_name"] or st["device"],
                "memory_mode": st["memory_mode"],
                "load_seconds": load["ready_at_s"],
                "outputs_free_bytes": storage.free_bytes,
            }, 200
        if engine.load_error:
            return {"ready": False, "reason": f"the model failed to load: {engine.load_error}", "load": load}, 503
        return {
            "ready": False,
            "reason": f"loading the model: {load['current']} ({load['percent']:.0f}%), "
            f"{load['elapsed_s']:.1f}s since start",
            "stage": load["current"],
            "percent": load["percent"],
            "elapsed_s": load["elapsed_s"],
        }, 503

    @property
    def local_url(self) -> str:
        host = "localhost" if self.settings.host in ("0.0.0.0", "::", "") else self.settings.host
        return f"http://{host}:{self.settings.port}{self.settings.root_path or ''}/"

    def _waiting_in_gradio(self) -> int:
        queue = getattr(self.blocks, "_queue", None)
        try:
            return len(queue) if queue is not None else 0
        except Exception:  # noqa: BLE001 - Gradio internals; a reading must never break /metrics
            return 0

    def _refresh_queue_metric(self) -> None:
        # the engine only sees the job at its lock; people wait in Gradio's queue in front of it
        self.engine.metrics.queue_depth.set(self.engine.queue_depth + self._waiting_in_gradio())

    def _file_served(self) -> None:
        self._last_file = time.monotonic()

    def _queue_refused(self) -> None:
        self.engine.metrics.requests.labels("rejected").inc()
        log.info("queue full (%d waiting): request refused", self.settings.queue_size)

    def _open_share(self) -> None:
        """Ask Gradio for a public link; offline this fails softly and the studio serves locally."""
        try:
            from gradio import networking

            host = "127.0.0.1" if self.settings.host in ("0.0.0.0", "::", "") else self.settings.host
            self.share_url = networking.setup_tunnel(
                local_host=host,
                local_port=self.settings.port,
                share_token=self.blocks.share_token,
                share_server_address=None,
                share_server_tls_certificate=None,
            )
            log.warning("public share link: %s (login required: %s)", self.share_url, bool(self.users))
        except Exception as exc:  # noqa: BLE001 - no network is a normal case here
            log.warning("could not open a share link (%s); serving on %s only", exc, self.local_url)

    # --- shutdown ------------------------------------------------------------------------

    def request_exit(self, code: int = 0) -> None:
        """Drain and make run() return `code` (the watchdog uses it so Supervisor restarts us)."""
        self.begin_shutdown(f"exit requested with code {code}", code)

    def begin_shutdown(self, reason: str, code: int | None = None) -> bool:
        with self._lock:
            if code and not self.exit_code:
                self.exit_code = code
            if self.draining.is_set():
                return False
            self.draining.set()
        log.info(
            "shutting down (%s): taking no new jobs; the running job has %.0fs to finish",
            reason,
            self.settings.shutdown_grace_s,
        )
        threading.Thread(target=self._drain, name="drain", daemon=True).start()
        return True

    def _drain(self) -> None:
        try:
            finished = self.engine.shutdown(self.settings.shutdown_grace_s)
            log.info("engine stopped (%s); PNG files flushed", "job finished" if finished else "job cancelled")
            self._wait_gradio_idle(10.0)  # let the last result reach its browser
            self._linger_for_downloads()
        except Exception:  # noqa: BLE001 - shutting down must not hang on a bug
            log.exception("error while draining")
        finally:
            self._drained.set()
            if self._uvicorn is not None:
                self._uvicorn.should_exit = True

    def _wait_gradio_idle(self, timeout: float) -> None:
        end = time.time() + timeout
        queue = getattr(self.blocks, "_queue", None)
        while queue is not None and time.time() < end:
            try:
                if not any(queue.active_jobs) and len(queue) == 0:
                    return
            except Exception:  # noqa: BLE001 - Gradio internals changed: do not wait
                return
            time.sleep(0.05)

    def _linger_for_downloads(self) -> None:
        idle_since = time.monotonic()
        end = idle_since + DOWNLOAD_LINGER_MAX_S
        while time.monotonic() < end and not self._forced:
            if time.monotonic() - max(idle_since, self._last_file) >= DOWNLOAD_QUIET_S:
                return
            time.sleep(0.05)

    def force_stop(self) -> None:
        self._forced = True
        for job in self.engine.running_jobs:
            job.cancel()
        if self._uvicorn is not None:
            self._uvicorn.force_exit = True
            self._uvicorn.should_exit = True

    def serve(self) -> int:
        """Serve in this (main) thread until a signal or request_exit; returns the exit code."""
        import uvicorn

        owner = self

        class _Uvicorn(uvicorn.Server):
            def handle_exit(self, sig: int, frame: Any) -> None:
                # Not recorded in _captured_signals: uvicorn would re-raise it after shutting down,
                # and the process must exit with our code (0 after a clean drain).
                name = signal.Signals(sig).name
                if owner.draining.is_set():
                    log.warning("%s again: stopping now", name)
                    owner.force_stop()
                    return
                owner.begin_shutdown(name)

            async def shutdown(self, sockets: Any = None) -> None:
                owner._end_streams()
                await super().shutdown(sockets=sockets)

        config = uvicorn.Config(
            self.app,
            host=self.settings.host,
            port=self.settings.port,
            log_config=None,  # keep the root logging set up by the CLI
            log_level=self.settings.log_level.lower(),
            access_log=False,
            timeout_graceful_shutdown=UVICORN_GRACE_S,
        )
        self._uvicorn = _Uvicorn(config)
        logging.getLogger("uvicorn.error").addFilter(_QuietStreamCancel())
        try:
            self._uvicorn.run()
        except SystemExit as exc:  # uvicorn exits this way when it cannot bind the port
            code = exc.code if isinstance(exc.code, int) and exc.code else EXIT_FAILED
            log.error("the web server stopped at start-up (is %s:%d free?)", self.settings.host, self.settings.port)
            self.ops.stop()
            self.engine.store.close(wait=True)  # nothing ran; the loading thread is a daemon
            return self.exit_code or code
        if not self._drained.is_set():
            if not self.draining.is_set():
                self.draining.set()
                self._drain()
            else:
                self._drained.wait(self.settings.shutdown_grace_s + 60)
        log.info("zimage stopped (exit code %d)", self.exit_code)
        return self.exit_code


class _QuietStreamCancel(logging.Filter):
    """After our own drain, uvicorn cancels browser streams still open and logs that as an ERROR
    with a traceback: a normal stop, so it becomes one WARNING line."""

    PHRASE = "timeout graceful shutdown exceeded"

    def filter(self, record: logging.LogRecord) -> bool:
        if self.PHRASE in str(record.msg):
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.msg = "closed %s open browser stream(s) at shutdown"
            record.args = (record.args[0] if record.args else 0,)
            return True
        # the cancelled stream's own "Exception in ASGI application" traceback: drop it
        exc = record.exc_info[1] if record.exc_info else None
        return not (exc is not None and self.PHRASE in str(exc))


def create_app(settings: Settings, users: list[tuple[str, str]] | None = None, engine: Any = None) -> WebServer:
    """The app and its parts (server.app, .engine, .ops, .blocks); loading starts when it serves
    (or earlier, when `run` passes an engine already loading)."""
    return WebServer(settings, users, engine)


def run(settings: Settings) -> int:
    """`python app.py` / `python -m zimage serve`: check the policy, build, serve; the exit code."""
    try:
        users = read_users(settings)
        check_share(settings, users)
        check_admins(settings, users)
        check_outputs_dir(settings.outputs_dir, settings.config, settings.auth_file)
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if not users:
        log.warning(
            "no --auth given: anyone who can reach %s:%d can use the studio, and everyone shares one "
            "outputs folder and history",
            settings.host,
            settings.port,
        )
    from zimage.service.engine import Engine

    # The model loads from now on, on its own thread: Gradio's and FastAPI's imports and the page
    # build below overlap its weight reads.
    engine = Engine(settings)
    engine.start_loading()
    try:
        server = create_app(settings, users, engine)
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return server.serve()
