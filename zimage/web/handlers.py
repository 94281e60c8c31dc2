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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import anyio
import gradio as gr

from zimage.errors import UnreadableImage, ZImageError
from zimage.model.presets import ASPECT_RATIOS
from zimage.service.pngmeta import clean_parameters, read_parameters, read_parameters_checked
from zimage.service.request import GUIDANCE_MAX, GenerationRequest
from zimage.service.store import write_problem
from zimage.web import gqueue
from zimage.web.guard import INTERNAL_ERROR, Access, Refused, access_of
from zimage.web.history import History
from zimage.web.i18n import lang_of, t
from zimage.web.panels import (
    _s,
    parameters_markdown,
    render_banner,
    render_live,
    render_profiler,
    render_queue_note,
    render_tokens,
    summary_markdown,
)
from zimage.web.runs import Runs
from zimage.web.sizes import CUSTOM, match_preset, preset_size, ratio_label, size_note, size_tiers

log = logging.getLogger(__name__)

GPU_QUEUE = "gpu"  # the one concurrency group of every listener that runs the pipeline
PROGRESS_EVERY_S = 0.1  # at most ten progress updates a second to each browser
TOKEN_LIMIT = 512  # the text encoder reads this many tokens (the pipeline's max_sequence_length)
ASPECT_LABELS = tuple(ratio_label(r) for r in ASPECT_RATIOS)

# ------------------------------------------------------------------------------------------
# the handlers


def _who(request) -> str:
    """The logged-in user, else the client's address: the request log always says who asked."""
    user = getattr(request, "username", None)
    if user:
        return str(user)
    client = getattr(request, "client", None)
    return str(getattr(client, "host", "") or "") if client else ""


def _session(request) -> str:
    return getattr(request, "session_hash", None) or ""


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


@dataclass(frozen=True)
class FormValues:
    """The form's values as Gradio sends them (raw: the engine validates), in the API's argument order.
    None (an argument left out) means the model preset's default."""

    prompt: Any = ""
    negative_prompt: Any = ""
    width: Any = None
    height: Any = None
    steps: Any = None
    guidance: Any = 0.0
    seed: Any = -1
    count: Any = 1
    shift: Any = None

    def request(self, user: str, defaults: tuple[int, int, int], owner: str = "") -> GenerationRequest:
        w, h, steps = defaults
        return GenerationRequest(
            prompt=self.prompt if self.prompt is not None else "",
            negative_prompt=self.negative_prompt or "",
            width=_number(self.width, w),
            height=_number(self.height, h),
            steps=_number(self.steps, steps),
            guidance=self.guidance if self.guidance is not None else 0.0,
            seed=_number(self.seed, -1),
            count=_number(self.count, 1),
            shift=self.shift if self.shift not in (None, "") else None,
            user=user,
            owner=owner,
        )


class Studio:
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
        values = FormValues(prompt, negative_prompt, width, height, steps, guidance, seed, count, shift)
        try:
            gallery, details = await anyio.to_thread.run_sync(
                self._generate, job, values, _who(request), owner, progress, abandon_on_cancel=True
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

    def _generate(self, job: Any, values: FormValues, user: str, owner: str, progress: gr.Progress):
        engine = self.engine
        feed = _Progress(progress)
        try:
            self._wait_for_model(progress, job)
            req = values.request(user, self.defaults, owner)
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
    ):
        """The page's Generate: yields (gallery, details, live, summary, download, last seed, note).

        Bad input is refused at once with the engine's own message; a cancelled run says so in
        words and leaves the previous result on the page."""
        lang = lang_of(request)
        values = FormValues(prompt, negative_prompt, width, height, steps, guidance, seed, count, shift)
        try:
            from zimage.service.request import validate

            validate(values.request("", self.defaults), self.engine.limits)
        except ZImageError as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        owner = self._owner(request)
        run = self.runs.start(
            values.request(_who(request), self.defaults, owner),
            client=str(client or ""),
            session=_session(request),
            user=owner,
            form=asdict(values),
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
            return gallery, details, live, summary_markdown(details, lang), download, details.get("seed", -1), ""
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

        Returns (client, gallery, details, live, summary, download, last seed, note, *form, follow)."""
        import uuid

        lang = lang_of(request)
        skip = gr.skip()
        nothing = (skip, skip, "", skip, skip, skip, skip, *([skip] * 11), skip)
        client = str(client or "")
        if not client:
            return (uuid.uuid4().hex, *nothing)
        run = self.runs.last_of_client(client, self._owner(request))
        if run is None:
            return (skip, *nothing)
        form = self.use_settings(run.form, keep_count=True)
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

    # --- history, parameters ------------------------------------------------------------

    def history(self, query: str = "", shown: int = 0, request: gr.Request = None):
        """(gallery items, count line, how many shown, load-more button) for this user."""
        lang = lang_of(request)
        return self.history_view.page(query, shown, self._space(request), lang)

    def history_if_open(self, query: str, shown: int, is_open: bool, request: gr.Request = None):
        if not is_open:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip()
        return self.history(query, shown, request)

    def more_history(self, query: str, shown: int, request: gr.Request = None):
        lang = lang_of(request)
        return self.history_view.page(query, shown, self._space(request), lang, more=True)

    def delete_image(
        self, params: dict[str, Any], query: str, shown: int, confirmed: str = "", request: gr.Request = None
    ):
        """Delete the selected image once the page asked and the answer was yes; its path was checked
        when it was selected, and only a file of the asker's own space is deleted."""
        lang = lang_of(request)
        space = self._space(request)
        path = (params or {}).get("_path") if isinstance(params, dict) else None
        if confirmed != "yes":
            return (gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip())
        if not path:
            note = t(lang, "delete_nothing")
        elif self.history_view.delete(path, space):
            note = t(lang, "deleted", name=Path(path).name)
        else:
            note = t(lang, "delete_refused")
        items = self.history_view.page(query, max(shown, 1), space, lang)
        return ({}, note, *items)

    def select_image(self, evt: gr.SelectData, request: gr.Request = None):
        lang = lang_of(request)
        value = evt.value if isinstance(evt.value, dict) else {}
        image = value.get("image")
        path = image.get("path") if isinstance(image, dict) else None
        if not path or not isinstance(path, str):
            return {}, t(lang, "select_an_image")
        try:  # the path comes from the browser: only the asker's own images and uploads
            real = self.access.check(path, self.access.viewer(request))
        except Refused:
            return {}, t(lang, "not_ours")
        try:
            params = read_parameters(real)
        except (UnreadableImage, OSError):
            params = {}
        return {**params, "_path": str(real)}, parameters_markdown(params, real.name, lang)

    def load_png(self, file: Any, request: gr.Request = None):
        """A PNG dropped on the page: the image, its parameters (ours or A1111-style), and the form
        filled with them. The file is an upload of this session (guard.py refused anything else
        before this runs); its chunks are read without decoding a pixel, and every field is checked."""
        lang = lang_of(request)
        path = getattr(file, "name", file)
        no_change = [gr.update()] * 11
        hidden = gr.update(value=None, visible=False)
        if not path:
            return [{}, "", hidden, *no_change]
        if not isinstance(path, (str, Path)):
            raise Refused("Drop a PNG file (from zimage, AUTOMATIC1111, Forge...) to load its settings.")
        name = Path(str(path)).name
        try:
            params, dropped = read_parameters_checked(path)
        except UnreadableImage as exc:
            return [{}, f"{t(lang, 'not_a_png', name=name)} {exc}", hidden, *no_change]
        except OSError:
            return [{}, t(lang, "not_a_png", name=name), hidden, *no_change]
        shown = gr.update(value=str(path), visible=True)
        if not params:
            return [{}, t(lang, "no_parameters", name=name), shown, *no_change]
        note = f"  \n{t(lang, 'left_out', fields=', '.join(dropped))}" if dropped else ""
        return [params, parameters_markdown(params, name, lang) + note, shown, *self.use_settings(params)]

    def use_settings(self, params: dict[str, Any], keep_count: bool = False):
        """Form values from a parameters dict: prompt, negative, width, height, steps, guidance, seed,
        count, shift, aspect, tier."""
        raw = params if isinstance(params, dict) else {}
        params = clean_parameters(raw)[0]
        for key in ("count", "shift"):  # the page's own form (a reload) keeps these as they were
            if key in raw and key not in params and keep_count:
                params[key] = raw[key]
        if not params:
            return [gr.update()] * 11
        keep = gr.update()
        w = _whole(params.get("width"))
        h = _whole(params.get("height"))
        aspect, tier = (
            match_preset(w, h, self.tiers, self.settings.min_size, self.settings.max_size)
            if w and h
            else (CUSTOM, None)
        )
        shift = params.get("shift")
        return [
            params.get("prompt", keep),
            params.get("negative_prompt", keep),
            w if w else keep,
            h if h else keep,
            params.get("steps", keep),
            params.get("guidance", keep),
            params.get("seed", keep),
            (params.get("count") or keep) if keep_count else 1,  # an image's own seed: one image
            shift if shift is not None else keep,
            aspect,
            tier if tier is not None else keep,
        ]

    # --- the prompt's length in tokens ------------------------------------------------------

    def count_tokens(self, prompt: Any) -> int | None:
        """Tokens the text encoder would see (with the chat template), None before the model is loaded.
        Uses its own copy of the tokenizer: a fast tokenizer must not be shared across threads."""
        pipe = self.engine.pipe
        if pipe is None or not isinstance(prompt, str):
            return None
        with self._tokenizer_lock:
            if self._tokenizer is None:
                import copy

                self._tokenizer = copy.deepcopy(pipe.tokenizer)
            tok = self._tokenizer
            text = tok.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True, enable_thinking=True
            )
            return len(tok(text, padding=False, truncation=False)["input_ids"])

    def tokens(self, prompt: Any, request: gr.Request = None) -> str:
        return render_tokens(self.count_tokens(prompt), TOKEN_LIMIT, lang_of(request))

    # --- small form helpers ---------------------------------------------------------------

    def pick_preset(self, aspect: str, tier: Any):
        if aspect == CUSTOM or tier is None:
            return gr.update(), gr.update(), gr.update()
        if aspect not in ASPECT_LABELS:
            raise Refused(f"Aspect ratio must be one of {', '.join(ASPECT_LABELS)} or {CUSTOM} (got {_short(aspect)}).")
        if _whole(tier) not in self.tiers:
            raise Refused(f"Resolution must be one of {', '.join(map(str, self.tiers))} (got {_short(tier)}).")
        w, h, note = preset_size(aspect, _whole(tier), self.settings.min_size, self.settings.max_size)
        return w, h, size_note(w, h, note)

    def custom_size(self, width: Any, height: Any):
        w, h = _whole(width), _whole(height)
        return CUSTOM, size_note(w, h) if w is not None and h is not None else ""

    @staticmethod
    def negative_state(guidance: float, request: gr.Request = None):
        lang = lang_of(request)
        try:
            guidance = float(guidance or 0.0)
        except (TypeError, ValueError, OverflowError):
            raise Refused(f"Guidance must be a number from 0 to {GUIDANCE_MAX:g} (got {_short(guidance)}).") from None
        if guidance > 0:
            return gr.update(
                interactive=True,
                info=t(lang, "negative_in_use", g=f"{float(guidance):g}"),
                elem_classes=["zi-negative"],
            )
        return gr.update(
            interactive=False,
            info=t(lang, "negative_inactive"),
            elem_classes=["zi-negative", "zi-inactive"],
        )

    # --- live panel ----------------------------------------------------------------------

    def tick(self, request: gr.Request = None):
        """(profiler, banner, queue note): the live panel, and this tab's place in the queue."""
        lang = lang_of(request)
        status = self.engine.status()
        try:
            ops_status = self.ops.status() if self.ops is not None else {}
        except Exception:  # noqa: BLE001 - the panel must keep answering
            log.exception("ops.status failed")
            ops_status = {"status": "unavailable (see log)"}
        waiting = gqueue.waiting(self.blocks, GPU_QUEUE)
        users: dict[str, int] = {}
        for w in waiting:
            users[w.user or "-"] = users.get(w.user or "-", 0) + 1
        queue = {"waiting": len(waiting), "users": users}
        return (
            render_profiler(status, ops_status, queue, lang),
            render_banner(status, lang),
            render_queue_note(self.place(_session(request), waiting), lang),
        )

    def place(self, session: str, waiting: list[gqueue.Waiting] | None = None) -> dict[str, Any] | None:
        """This tab's first waiting job: its place in line and an ETA from measured step times."""
        waiting = gqueue.waiting(self.blocks, GPU_QUEUE) if waiting is None else waiting
        mine = next((i for i, w in enumerate(waiting) if w.session == session), None)
        if mine is None:
            return None
        clock = self.runs.clock
        running = self.runs.running()
        busy = self.engine.running_job is not None or gqueue.running_count(self.blocks, GPU_QUEUE) > 0
        eta: float | None = 0.0
        if running is not None:
            eta = clock.remaining(running)
        elif busy:
            eta = None  # an API job: its size is not known here
        w0, h0, s0 = self.defaults
        for w in waiting[: mine + 1]:
            if eta is None:
                break
            est = clock.estimate(w.width or w0, w.height or h0, w.steps or s0, w.count or 1, like=running)
            eta = None if est is None else eta + est
        return {
            "place": mine + 1 + (1 if busy else 0),
            "eta_s": eta,
            "running_mine": bool(self.runs.active_of_session(session)),
        }

    def gradio_waiting(self) -> int:
        """Requests waiting in Gradio's queue (not yet handed to the engine)."""
        return len(gqueue.waiting(self.blocks, GPU_QUEUE))


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


def _whole(value: Any) -> int | None:
    """A whole number from a widget value, or None (junk, infinities, booleans)."""
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return int(number) if number == number and abs(number) < 1e9 and number.is_integer() else None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _number(value: Any, default: int | None = None) -> Any:
    """Whole numbers from Gradio widgets (which may send floats) stay exact; the engine validates the rest."""
    if value is None or value == "":
        return default if default is not None else value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value
