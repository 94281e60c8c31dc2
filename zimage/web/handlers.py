"""The page's event handlers: the Studio object holds the engine, the page's runs and the history.

Nothing here touches the GPU directly: every image goes through `engine.generate`, which holds
the one GPU lock. Form values arrive from Gradio and become one `FormValues`; the engine's
validation names the field, the value and what is allowed.

Two ways in: the API endpoint `generate` (gradio_client, REST: one call, the PNGs back) and the
page's Generate (a run on its own thread, followed with live previews, cancelled in words,
found again after a reload; see runs.py).

Every handler checks what it gets and answers a bad value with a sentence (gr.Error); guard.py
checks every file in and out for all of them, and each user sees only their own space
(`Access.viewer`)."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import anyio
import gradio as gr

from zimage.errors import ZImageError
from zimage.service.store import write_problem
from zimage.web import gqueue, toolbox
from zimage.web.form import TOKEN_LIMIT, FormHandlers, FormValues
from zimage.web.guard import INTERNAL_ERROR, Access, access_of
from zimage.web.history import History
from zimage.web.i18n import lang_of, t
from zimage.web.images import ImageHandlers
from zimage.web.livepanel import GPU_QUEUE, PanelHandlers, _session
from zimage.web.panels import _s, render_live, summary_markdown
from zimage.web.runs import Runs
from zimage.web.sizes import size_tiers

__all__ = ["GPU_QUEUE", "TOKEN_LIMIT", "FormValues", "Studio"]

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 0.1  # at most ten progress updates a second to each browser

# ------------------------------------------------------------------------------------------
# the handlers


def _who(request) -> str:
    """The logged-in user, else the client's address: the request log always says who asked."""
    user = getattr(request, "username", None)
    if user:
        return str(user)
    client = getattr(request, "client", None)
    return str(getattr(client, "host", "") or "") if client else ""


class _Progress:
    """Feeds gr.Progress from the engine's progress(phase, done, total) callback, with an ETA.

    The first call comes from inside the GPU lock, right after the run started: its time is
    when this job began using the pipeline."""

    def __init__(self, progress: gr.Progress):
        self.progress = progress
        self.started: float | None = None
        self.t0 = 0.0
        self.last_push = 0.0

    def __call__(self, phase: str, done: int, total: int) -> None:
        now = time.perf_counter()
        if self.started is None:
            self.started = time.time()
            self.t0 = now
        if phase == "text":
            self.progress(0.0, desc="Encoding the prompt…")
        elif phase == "denoise":
            if done < total and now - self.last_push < PROGRESS_EVERY_S:
                return
            per_step = (now - self.t0) / max(done, 1)
            eta = per_step * (total - done)
            self.progress((done, total), desc=f"Denoising · ~{_s(eta)} left", unit="steps")
        elif phase == "decode":
            self.progress((total, total), desc="Decoding with the VAE…", unit="steps")
        self.last_push = now


class Studio(FormHandlers, ImageHandlers, PanelHandlers):
    """Holds the engine, the runs and the history; its methods are the page's event handlers."""

    def __init__(self, engine: Any, ops: Any, settings: Any):
        self.engine = engine
        self.ops = ops
        self.settings = settings
        self.blocks: gr.Blocks | None = None
        self.runs = Runs(engine)
        self.history_view = History(engine.store)
        self._jobs: dict[str, Any] = {}  # session hash -> its running API Job
        self._jobs_lock = threading.Lock()
        self._tokenizer: Any = None
        self._tokenizer_lock = threading.Lock()
        w, _h = engine.default_size
        self.tiers = size_tiers(w, settings.max_size)
        self.ui_fn_ids: set[int] = set()  # the page's own GPU listeners (page.py fills it)

    @property
    def access(self) -> Access:
        """Who may see what (installed on the Blocks by the server; one shared space without it)."""
        return access_of(self.blocks, self.engine.store)

    def _owner(self, request: Any) -> str:
        """Whose space this request works in: the logged-in user's own ('' = the shared space)."""
        return self.access.viewer(request).owner

    def _space(self, request: Any) -> str | None:
        """Whose images this request sees: its own space, or every space for an admin (None)."""
        viewer = self.access.viewer(request)
        return None if viewer.admin else viewer.owner

    def space_note_key(self) -> str:
        """Which line says whose images the history shows (i18n key)."""
        return "space_own" if self.settings.auth or self.settings.auth_file else "space_shared"

    def space_note(self, lang: str = "en") -> str:
        """One line on whose images the history shows."""
        return t(lang, self.space_note_key())

    def _files_of(self, request: Any):
        """guard.py's path rule for the files this request names (a source picture, a mask): the
        asker's uploads and own images only; anything else is refused with a sentence."""
        access, viewer = self.access, self.access.viewer(request)
        return lambda path: str(access.check(path, viewer))

    @property
    def defaults(self) -> tuple[int, int, int]:
        w, h = self.engine.default_size
        return w, h, self.settings.default_steps

    # --- the API: one call, the PNGs back ------------------------------------------------

    async def generate(
        self,
        prompt: str,
        negative_prompt: str = "",
        width: float | None = None,
        height: float | None = None,
        steps: float | None = None,
        guidance: float = 0.0,
        seed: float = -1,
        count: float = 1,
        shift: float | None = None,
        image: Any = None,
        mask: Any = None,
        strength: float | None = None,
        feather: float | None = None,
        outpaint_sides: list[str] | None = None,
        outpaint_px: float | None = None,
        loras: str | None = None,
        request: gr.Request = None,
        progress: gr.Progress = gr.Progress(),  # noqa: B008 - Gradio injects it through this default
    ):
        """Run the job on a worker thread. When Gradio cancels this task (gradio_client's
        Job.cancel(), the /cancel endpoint), the engine job is cancelled too, so the pipeline
        stops within a step instead of running on for nobody."""
        job = self.engine.new_job()
        owner = self._owner(request)
        session = _session(request)
        with self._jobs_lock:
            self._jobs[session] = job
        tools = (image, mask, strength, feather, outpaint_sides, outpaint_px, loras)
        values = FormValues(prompt, negative_prompt, width, height, steps, guidance, seed, count, shift, tools)
        check = self._files_of(request)
        try:
            gallery, details = await anyio.to_thread.run_sync(
                self._generate, job, values, _who(request), owner, progress, check, abandon_on_cancel=True
            )
            if details.get("save_error"):
                # the images kept in Gradio's cache are the asker's, as their uploads are
                viewer = self.access.viewer(request)
                for path, _caption in gallery:
                    self.access.grant(path, viewer)
                gr.Warning(details["save_error"], duration=None)  # stays until closed; the summary repeats it
            return gallery, details
        except anyio.get_cancelled_exc_class():
            job.cancel()
            raise
        finally:
            with self._jobs_lock:
                if self._jobs.get(session) is job:
                    del self._jobs[session]

    def _generate(self, job: Any, values: FormValues, user: str, owner: str, progress: gr.Progress, check: Any):
        engine = self.engine
        feed = _Progress(progress)
        try:
            req = values.request(user, self.defaults, owner, check)  # a bad file is refused before the wait
            self._wait_for_model(progress, job)
            result = engine.generate(req, job=job, progress=feed, save=True, wait_ready=30.0)
            progress(1.0, desc="Saving PNG…")
            paths = result.wait_saved(timeout=120)
        except ZImageError as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        except gr.Error:
            raise
        except Exception:  # noqa: BLE001 - never a traceback to a client; the log has it
            log.exception("generate failed")
            raise gr.Error(INTERNAL_ERROR, print_exception=False) from None
        details = result.details()
        self.runs.clock.observe(details)
        return _gallery(result, paths, details), details

    def _wait_for_model(self, progress: gr.Progress, job: Any) -> None:
        """A request made while loading holds its place and says what the model is doing."""
        engine = self.engine
        while not engine.ready:
            if job.cancelled:
                raise gr.Error("Cancelled while waiting for the model.", print_exception=False)
            if engine.load_error:
                raise gr.Error(f"The model failed to load: {engine.load_error}", print_exception=False)
            snap = engine.timeline.snapshot()
            progress(
                max(0.0, min(1.0, snap["percent"] / 100.0)),
                desc=f"Waiting for the model to load: {snap['current']} ({_s(snap['elapsed_s'])})",
            )
            time.sleep(0.25)

    # --- the page: a run followed with previews ------------------------------------------

    def generate_ui(
        self,
        prompt: Any,
        negative_prompt: Any,
        width: Any,
        height: Any,
        steps: Any,
        guidance: Any,
        seed: Any,
        count: Any,
        shift: Any,
        preview: Any,
        client: Any,
        request: gr.Request,
        *tools: Any,
    ):
        """The page's Generate: yields (gallery, details, live, summary, download, last seed, note).
        `tools`: the toolbox's values (toolbox.Toolbox.page_inputs: the API's seven, then "output at
        the source's size").

        Bad input is refused at once with the engine's own message; a cancelled run says so in
        words and leaves the previous result on the page."""
        lang = lang_of(request)
        api_tools, source_size = tuple(tools[:7]), (tools[7] if len(tools) > 7 else True)
        painted = tools[8] if len(tools) > 8 else None
        values = FormValues(prompt, negative_prompt, width, height, steps, guidance, seed, count, shift, api_tools)
        owner = self._owner(request)
        try:
            from dataclasses import replace

            from zimage.service.request import validate
            from zimage.web.toolbox import with_painting

            values_run = values
            if api_tools and not api_tools[1]:  # no mask file: the strokes painted on the source, if any
                values_run = replace(values, tools=(with_painting(api_tools[0], painted), *api_tools[1:]))
            req = values_run.request(_who(request), self.defaults, owner, self._files_of(request))
            if source_size and req.image is not None:  # the page's size fields are ignored (the note says so)
                req = replace(req, width=0, height=0)
            validate(req, self.engine.limits)
        except ZImageError as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        run = self.runs.start(
            req,
            client=str(client or ""),
            session=_session(request),
            user=owner,
            form={**asdict(values), "source_size": bool(source_size)},
            preview=bool(preview),
        )
        tokens = self.count_tokens(prompt)
        yield from self._follow(run, lang, tokens, first=True)

    def _follow(self, run: Any, lang: str, tokens: int | None = None, first: bool = False):
        skip = gr.skip()
        last_html = None
        if first:
            last_html = render_live(self._live_state(run), lang)
            yield skip, skip, last_html, skip, skip, skip, ""
        while not run.done.wait(PROGRESS_EVERY_S * 2):
            html = render_live(self._live_state(run), lang)
            if html != last_html:
                last_html = html
                yield skip, skip, html, skip, skip, skip, skip
        yield self._finished(run, lang, tokens)

    def _finished(self, run: Any, lang: str, tokens: int | None = None):
        skip = gr.skip()
        if run.state == "done":
            details = dict(run.details)
            if tokens is not None and tokens > TOKEN_LIMIT:
                details.setdefault("notes", []).append(t(lang, "prompt_was_cut", n=tokens, limit=TOKEN_LIMIT))
            gallery = [(p, f"seed {s}") for p, s in zip(run.paths, details.get("seeds", []))]
            files = [p for p in run.paths if Path(p).is_file() and not Path(p).is_symlink()]
            download = gr.update(value=files or None, visible=bool(files))
            live = render_live({"state": "done", "total_s": (details.get("timings") or {}).get("total_s")}, lang)
            summary = summary_markdown(details, lang) + toolbox.summary_line(details, lang)
            return gallery, details, live, summary, download, details.get("seed", -1), ""
        if run.state == "cancelled":
            live = render_live({"state": "cancelled", "reason": run.cancel_reason}, lang)
            return skip, skip, live, skip, skip, skip, skip
        raise gr.Error(run.error or INTERNAL_ERROR, print_exception=False)

    def _live_state(self, run: Any) -> dict[str, Any]:
        engine = self.engine
        state: dict[str, Any] = {"state": "running", "phase": run.phase, "step": run.step, "total": run.total}
        if run.phase == "waiting":
            if not engine.ready:
                snap = engine.timeline.snapshot()
                state.update(phase="loading", stage=snap["current"], percent=snap["percent"])
            elif engine.running_job is not None and engine.running_job is not run.job:
                state["phase"] = "gpu"
        state["eta_s"] = self.runs.clock.remaining(run)
        frame = run.job.preview
        if frame is not None:
            state["preview"] = frame
        return state

    async def cancel(self, request: gr.Request) -> str:
        """Cancel this session's own jobs: the running one stops within a step, the waiting ones leave
        the queue. Other people's jobs go on."""
        lang = lang_of(request)
        session = _session(request)
        with self._jobs_lock:
            api_job = self._jobs.get(session)
        stopped = self.runs.cancel_session(session)
        if api_job is not None:
            api_job.cancel()
            stopped += 1
        removed = await gqueue.drop(self.blocks, GPU_QUEUE, session, lambda fn_id: self._dropped(fn_id, lang))
        if not stopped and not removed:
            return t(lang, "cancel_nothing")
        parts = []
        if stopped:
            parts.append(t(lang, "cancel_running"))
        if removed:
            parts.append(t(lang, "cancel_removed", n=removed))
        return " ".join(parts)

    def _dropped(self, fn_id: int, lang: str) -> tuple[dict[str, Any], bool]:
        """What a removed waiting event's stream ends with: the page keeps its result and says so;
        an API client gets the error 'Cancelled…' as for a running job."""
        if fn_id in self.ui_fn_ids:  # the cancel note says it; the running run's own box says how it ended
            keep = {"__type__": "update"}
            return {"data": [keep] * 7, "is_generating": False}, True
        from gradio.utils import error_payload

        err = gr.Error("Cancelled before it started: removed from the queue.", print_exception=False)
        return error_payload(err, True), False

    def page_closed(self, request: gr.Request) -> None:
        """The tab is gone (closed or reloaded): its run is cancelled unless a reload takes it over."""
        self.runs.tab_closed(_session(request))

    def restore(self, client: Any, request: gr.Request):
        """Page load, off the queue (it answers even when the queue is full): a browser id for a new
        browser; for a known one, its last form and result, and a word if its last run was cancelled.
        A run still going is taken over by this page; the id returned last makes `follow` show it.

        Returns (client, gallery, details, live, summary, download, last seed, note, *form, *toolbox,
        follow)."""
        import uuid

        lang = lang_of(request)
        skip = gr.skip()
        nothing = (skip, skip, "", skip, skip, skip, skip, *([skip] * (11 + toolbox.RELOADED)), skip)
        client = str(client or "")
        if not client:
            return (uuid.uuid4().hex, *nothing)
        run = self.runs.last_of_client(client, self._owner(request))
        if run is None:
            return (skip, *nothing)
        form = [*self.use_settings(run.form, keep_count=True), *toolbox.reload(run.form, self._files_of(request))]
        done = self.runs.last_done_of_client(client, self._owner(request))
        shown = [skip] * 5
        if done is not None and done is not run:
            gallery, details, _live, summary, download, seed, _note = self._finished(done, lang)
            shown = [gallery, details, summary, download, seed]
        if run.active:
            self.runs.take_over(run, _session(request))
            live = render_live(self._live_state(run), lang)
            return (skip, shown[0], shown[1], live, shown[2], shown[3], shown[4], skip, *form, run.id)
        if run.state == "failed":
            return (skip, *shown[:2], "", *shown[2:], skip, *form, skip)
        gallery, details, live, summary, download, seed, _note = self._finished(run, lang)
        if run.state == "cancelled":
            gallery, details, summary, download, seed = shown
        return (skip, gallery, details, live, summary, download, seed, skip, *form, skip)

    def follow(self, run_id: Any, request: gr.Request):
        """After a reload: the run this page took over, followed to its end like the page's own."""
        run = self.runs.by_id(str(run_id or ""), _session(request))
        if run is None:
            return
        yield from self._follow(run, lang_of(request))


def _gallery(result: Any, paths: list[str], details: dict[str, Any]) -> list[tuple[str, str]]:
    """The result's images in order: saved ones from the outputs folder; ones that could not be
    saved (disk full, read-only) from their PNG bytes, put in Gradio's cache (zimage's own
    folder) so the user still sees and downloads them."""
    from gradio.processing_utils import save_bytes_to_cache
    from gradio.utils import get_upload_folder

    unsaved = {u.index: u for u in result.unsaved}
    saved = iter(paths)
    items: list[tuple[str, str]] = []
    for i, seed in enumerate(result.seeds):
        image = unsaved.get(i)
        if image is None:
            items.append((next(saved), f"seed {seed}"))
            continue
        try:
            items.append((save_bytes_to_cache(image.data, image.name, get_upload_folder()), f"seed {seed} · not saved"))
        except OSError as exc:
            log.error("could not keep unsaved image %s in Gradio's cache either: %s", image.name, exc)
            details["save_error"] = (
                f"{details['save_error']} Some could not be kept for download either, because {write_problem(exc)}."
            )
    return items
